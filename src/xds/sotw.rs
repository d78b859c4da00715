//! State-of-the-world (SotW) xDS on a stream: requests (ACK/NACK by nonce, subscription changes, the
//! stale-nonce rule) and responses (the full state of CDS/LDS, the changed names of EDS/RDS).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use tonic::Status;
use tracing::debug;

use super::codec::{Response, SotwRequest};
use super::stream::{Stream, StreamResult};
use super::subscription;
use super::type_state::{TypeState, hand_over_superseded, rollback};
use crate::cache::Resource;
use crate::type_url::ResourceType;

impl Stream {
    pub(super) async fn on_sotw_request(&mut self, request: SotwRequest) -> StreamResult {
        let req = &request.head;
        self.init(req.node.as_ref()).await?;
        let Some(t) = self.request_type(&req.type_url)? else {
            // Unknown types get an empty response, so the client is not left waiting. Only the first
            // request of a type on the stream is answered, whatever nonce it carries (istioctl's client sets
            // one on every request, the first included, as istiod allows): a later request ACKs (or NACKs)
            // that response, and answering it would start an endless ACK / response exchange.
            if !self.first_of_other_type(&req.type_url) {
                return Ok(());
            }
            debug!(type_url = %req.type_url, "unknown type URL");
            let nonce = self.next_nonce();
            // istioctl-style debug types (istio.io/debug/syncz, istio.io/debug/config_dump) get their
            // answer; any other unknown type an empty one.
            let names = request.names().map_err(|e| Status::invalid_argument(format!("malformed xDS request: {e}")))?;
            let resources = self.debug_resources(&req.type_url, &names)?.into_iter().map(|(_, any)| any).collect();
            let raw = envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
                type_url: req.type_url.clone(),
                nonce,
                resources,
                control_plane: Some(super::codec::control_plane_message()),
                ..Default::default()
            };
            let bytes = prost::Message::encode_to_vec(&raw);
            return self.out.send(Response::Raw(bytes.into())).await;
        };
        let first = self.types[t.index()].is_none();
        let ts = self.types[t.index()].get_or_insert_with(|| Box::new(TypeState::new()));
        // A nonce on the first request of a type is from an earlier stream (a reconnect): the request is
        // an initial one. Otherwise only a request answering the latest response counts; every request
        // after that response carries its nonce, also after its ACK.
        if !first && !req.response_nonce.is_empty() {
            // The answer to a response still in flight: an ACK or NACK of an older response arrives after
            // a newer one was sent when a push races the client. The client applied (or rejected) that
            // response, and every older one before it; a rejection is recorded even then.
            if let Some(i) = ts.pending.iter().position(|(n, _)| *n == req.response_nonce) {
                let (nonce, inflight) = ts.pending.remove(i).expect("found");
                ts.pending.drain(..i);
                match &req.error_detail {
                    Some(err) => {
                        let inflight = hand_over_superseded(ts, 0, inflight);
                        rollback(ts, inflight);
                        let msg = err.message.clone();
                        self.record_nack(t, &nonce, &msg);
                    }
                    None => self.record_ack(t, &nonce),
                }
            }
            // Only a request answering the latest response can change the subscription.
            let ts = self.types[t.index()].as_mut().expect("inserted");
            if ts.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
                debug!(type_url = t.short(), nonce = %req.response_nonce, "stale nonce: subscription ignored");
                return Ok(());
            }
        }
        let ts = self.types[t.index()].as_mut().expect("inserted");
        // Subscription: the first request's empty list (or "*") means wildcard; afterwards an empty
        // list unsubscribes everything named, unless the stream is wildcard.
        let star = request.has_star;
        let no_names = request.name_count == 0;
        let wildcard = if first { no_names || star } else { star || (ts.wildcard && no_names) };
        // Most requests repeat the subscription (every SotW ACK lists all names again): the decoder
        // fingerprinted the names without decoding them; they become strings only when it differs.
        let fingerprint = request.names_fingerprint;
        if !first && wildcard == ts.wildcard && fingerprint == ts.names_fingerprint {
            return Ok(());
        }
        let requested = request.names().map_err(|e| Status::invalid_argument(format!("malformed xDS request: {e}")))?;
        // names the snapshot has share its strings (one copy per server, not per stream)
        let current = self.current(t);
        let names: subscription::Names = requested
            .iter()
            .filter(|n| *n != "*")
            .map(|n| current.get_key_value(n.as_str()).map(|(k, _)| k.clone()).unwrap_or_else(|| Arc::from(n.as_str())))
            .collect();
        let names = subscription::intern(names);
        let ts = self.types[t.index()].as_mut().expect("inserted");
        ts.names_fingerprint = fingerprint;
        let changed = first || wildcard != ts.wildcard || !Arc::ptr_eq(&names, &ts.names);
        if !changed {
            return Ok(());
        }
        ts.wildcard = wildcard;
        ts.names = names;
        // Forget what is no longer subscribed.
        let dropped: Vec<Arc<str>> =
            ts.held.keys().filter(|n| !ts.wants(n, current.get(*n).map(|r| &**r))).cloned().collect();
        for n in dropped {
            ts.set_held(n, None);
        }
        self.update_subscription_status(t);
        self.sotw_respond(t, None, true).await
    }

    /// Sends what type `t`'s subscription needs from the current snapshot. `candidates` limits the
    /// names considered (None: all); `requested` is true when answering a request (full state).
    pub(super) async fn sotw_respond(
        &mut self,
        t: ResourceType,
        candidates: Option<&BTreeSet<Arc<str>>>,
        requested: bool,
    ) -> StreamResult {
        let current = self.current(t);
        let (from, generation) = (self.pushed_from, self.snapshot.generation);
        let Some(ts) = self.types[t.index()].as_mut() else { return Ok(()) };
        let full_state = t.sotw_full_state();
        let mut changed = requested;
        let mut to_send: Vec<Arc<Resource>> = Vec::new();
        if full_state {
            // Has anything this subscription covers changed?
            if !changed {
                let check = |n: &Arc<str>| {
                    let r = current.get(n);
                    let wanted = ts.wants(n, r.map(|r| &**r));
                    match (r, ts.held.get(n)) {
                        (Some(r), _) if wanted => ts.needs(r),
                        (None, Some(_)) => true,
                        (Some(_), Some(_)) => true, // no longer wanted
                        _ => false,
                    }
                };
                changed = match candidates {
                    Some(c) => c.iter().any(check),
                    None => current.keys().any(check) || ts.held.keys().any(|n| !current.contains_key(n)),
                };
            }
            if !changed {
                ts.unchanged(&current, candidates, from, generation);
                return Ok(());
            }
            for (name, r) in current.iter() {
                if !ts.wants(name, Some(r)) {
                    continue;
                }
                // The complete state must include everything wanted, a rejected resource too: its
                // rejection alone never triggers a response, but omitting it would delete it.
                to_send.push(r.clone());
            }
        } else {
            let mut consider = |r: &Arc<Resource>, held: Option<&Arc<Resource>>| {
                if ts.wants(&r.name, Some(r))
                    && (requested || ts.needs_given(r, held))
                    && ts.rejected.get(&r.name).is_none_or(|v| *v != r.version)
                {
                    to_send.push(r.clone());
                }
            };
            match candidates {
                Some(c) => {
                    let held = super::type_state::lookup_all(&ts.held, c.iter());
                    for (r, h) in super::type_state::lookup_all(&current, c.iter()).into_iter().zip(held) {
                        if let Some(r) = r {
                            consider(r, h);
                        }
                    }
                }
                None => current.values().for_each(|r| consider(r, ts.held.get(&r.name))),
            }
            if to_send.is_empty() {
                ts.unchanged(&current, candidates, from, generation);
                return Ok(());
            }
        }
        // Record what the client will hold.
        let removed: Vec<Arc<str>> = if full_state {
            let sent: HashSet<&Arc<str>> = to_send.iter().map(|r| &r.name).collect();
            ts.held.keys().filter(|n| !sent.contains(n)).cloned().collect()
        } else {
            Vec::new()
        };
        let changed_names: Vec<Arc<str>> = to_send
            .iter()
            .filter(|r| ts.held.get(&r.name).is_none_or(|p| p.version != r.version))
            .map(|r| r.name.clone())
            .collect();
        let inflight = ts.record(&to_send, &removed, &current, candidates, from, generation);
        if t == ResourceType::Cluster {
            self.mark_endpoints_dirty(&changed_names);
        }
        self.send_update(t, inflight, to_send.into(), Vec::new()).await
    }
}
