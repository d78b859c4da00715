//! Delta (incremental) xDS on a stream: subscribe/unsubscribe, `initial_resource_versions` on reconnect,
//! ACK/NACK by nonce, and responses carrying only what changed and what was removed.

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tracing::debug;

use super::codec::Response;
use super::stream::{Stream, StreamResult};
use super::subscription;
use super::type_state::{TypeState, hand_over_superseded, rollback};
use crate::cache::Resource;
use crate::type_url::ResourceType;

impl Stream {
    pub(super) async fn on_delta_request(&mut self, req: DeltaDiscoveryRequest) -> StreamResult {
        self.init(req.node.as_ref()).await?;
        let Some(t) = self.request_type(&req.type_url)? else {
            // istioctl-style debug types are answered: the first request of the type on the stream,
            // whatever nonce it carries (see the SotW side)
            if crate::type_url::is_debug_type(&req.type_url) && self.first_of_other_type(&req.type_url) {
                let resources = self.debug_resources(&req.type_url, &req.resource_names_subscribe)?;
                let raw = envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse {
                    type_url: req.type_url.clone(),
                    nonce: self.next_nonce(),
                    resources: resources
                        .into_iter()
                        .map(|(name, any)| envoy_types::pb::envoy::service::discovery::v3::Resource {
                            name,
                            resource: Some(any),
                            ..Default::default()
                        })
                        .collect(),
                    control_plane: Some(super::codec::control_plane_message()),
                    ..Default::default()
                };
                let bytes = prost::Message::encode_to_vec(&raw);
                return self.out.send(Response::Raw(bytes.into())).await;
            }
            debug!(type_url = %req.type_url, "unknown type URL ignored (delta)");
            return Ok(());
        };
        let first = self.types[t.index()].is_none();
        let ts = self.types[t.index()].get_or_insert_with(|| Box::new(TypeState::new()));
        if !req.response_nonce.is_empty() {
            match ts.pending.iter().position(|(n, _)| *n == req.response_nonce) {
                None => debug!(type_url = t.short(), nonce = %req.response_nonce, "unknown or stale nonce ignored"),
                Some(i) => {
                    let (nonce, inflight) = ts.pending.remove(i).expect("found");
                    match &req.error_detail {
                        Some(err) => {
                            let inflight = hand_over_superseded(ts, i, inflight);
                            rollback(ts, inflight);
                            let msg = err.message.clone();
                            self.record_nack(t, &nonce, &msg);
                        }
                        None => self.record_ack(t, &nonce),
                    }
                }
            }
        }
        let ts = self.types[t.index()].as_mut().expect("inserted");
        let mut newly: BTreeSet<Arc<str>> = BTreeSet::new();
        let mut sub_changed = first;
        if first {
            // An empty first subscribe list (or "*") is a wildcard subscription.
            if req.resource_names_subscribe.is_empty() {
                ts.wildcard = true;
            }
            for (name, version) in &req.initial_resource_versions {
                ts.set_held(Arc::from(name.as_str()), Some(Resource::reported(name, version)));
            }
        }
        if !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty() {
            sub_changed = true;
            let mut names = ts.names.to_set();
            for n in &req.resource_names_subscribe {
                if n == "*" {
                    ts.wildcard = true;
                } else if !names.contains(n.as_str()) {
                    let n: Arc<str> = Arc::from(n.as_str());
                    names.insert(n.clone());
                    newly.insert(n);
                }
            }
            for n in &req.resource_names_unsubscribe {
                if n == "*" {
                    ts.wildcard = false;
                } else {
                    names.remove(n.as_str());
                }
            }
            ts.names = subscription::intern(names);
        }
        if !sub_changed {
            return Ok(());
        }
        // Forget what is no longer subscribed (the client drops it on unsubscribe).
        let current = self.current(t);
        let ts = self.types[t.index()].as_mut().expect("inserted");
        let dropped: Vec<Arc<str>> = ts
            .held
            .keys()
            .filter(|n| {
                !ts.wants(n, current.get(*n).map(|r| &**r)) && !req.initial_resource_versions.contains_key(&***n)
            })
            .cloned()
            .collect();
        for n in dropped {
            ts.set_held(n, None);
        }
        self.update_subscription_status(t);
        let result = if first {
            self.delta_respond(t, None, true).await
        } else if !newly.is_empty() {
            self.delta_respond(t, Some(&newly), true).await
        } else {
            Ok(())
        };
        // the subscription changed: does the client now hold exactly its scope's resources?
        let generation = self.snapshot.generation;
        if let Some(ts) = self.types[t.index()].as_mut()
            && ts.synced != Some(generation)
        {
            ts.resync(&current, generation);
        }
        result
    }

    pub(super) async fn delta_respond(
        &mut self,
        t: ResourceType,
        candidates: Option<&BTreeSet<Arc<str>>>,
        requested: bool,
    ) -> StreamResult {
        let current = self.current(t);
        let (from, generation) = (self.pushed_from, self.snapshot.generation);
        let Some(ts) = self.types[t.index()].as_mut() else { return Ok(()) };
        let mut to_send: Vec<Arc<Resource>> = Vec::new();
        let mut removed: Vec<Arc<str>> = Vec::new();
        // a name, what the scope has of it, what the client holds of it
        let mut consider =
            |name: &Arc<str>, r: Option<&Arc<Resource>>, held: Option<&Arc<Resource>>, ts: &TypeState| match r {
                Some(r) if ts.wants(name, Some(r)) => {
                    if ts.needs_given(r, held) {
                        to_send.push(r.clone());
                    }
                }
                _ => {
                    if held.is_some() {
                        removed.push(name.clone());
                    }
                }
            };
        match candidates {
            Some(c) => {
                let now = super::type_state::lookup_all(&current, c.iter());
                let held = super::type_state::lookup_all(&ts.held, c.iter());
                for ((n, r), h) in c.iter().zip(now).zip(held) {
                    consider(n, r, h, ts);
                }
            }
            None => {
                current.iter().for_each(|(n, r)| consider(n, Some(r), ts.held.get(n), ts));
                ts.held
                    .iter()
                    .filter(|(n, _)| !current.contains_key(*n))
                    .for_each(|(n, h)| consider(n, None, Some(h), ts));
            }
        }
        // A name subscribed that meshfed does not serve (nor the client holds) is answered as the protocol
        // answers a resource that does not exist: in `removed_resources`, so the client stops waiting for it
        // (beside istiod: its cluster warms without endpoints instead of blocking the listeners for
        // `initial_fetch_timeout`); never an invented empty resource.
        if requested {
            let absent = |n: &&Arc<str>| !current.contains_key(&***n) && !ts.held.contains_key(&***n);
            match candidates {
                Some(c) => removed.extend(c.iter().filter(absent).cloned()),
                None => removed.extend(ts.names.iter().filter(absent).cloned()),
            }
        }
        // An empty answer is sent only to a stream's first request, so that its initial fetch completes.
        if to_send.is_empty() && removed.is_empty() && !(requested && candidates.is_none()) {
            ts.unchanged(&current, candidates, from, generation);
            return Ok(());
        }
        let changed_names: Vec<Arc<str>> = to_send.iter().map(|r| r.name.clone()).collect();
        let inflight = ts.record(&to_send, &removed, &current, candidates, from, generation);
        if t == ResourceType::Cluster {
            self.mark_endpoints_dirty(&changed_names);
        }
        self.send_update(t, inflight, to_send.into(), removed).await
    }
}
