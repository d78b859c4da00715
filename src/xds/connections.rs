//! Connected proxies and the per-type sync state the debug surface reports (istiod's syncz fields).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::proxy::{ClientKind, Proxy};
use crate::translate::View;
use crate::type_url::ResourceType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Flavor {
    #[serde(rename = "sotw")]
    Sotw,
    #[serde(rename = "delta")]
    Delta,
}

impl Flavor {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Sotw => "sotw",
            Flavor::Delta => "delta",
        }
    }
}

/// The gRPC service a proxy's streams use: ADS (every type on one stream), or the per-type
/// `EndpointDiscoveryService` (one stream per cluster, beside istiod).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum XdsService {
    #[serde(rename = "ads")]
    Ads,
    #[serde(rename = "eds")]
    Endpoints,
}

impl XdsService {
    pub fn as_str(self) -> &'static str {
        match self {
            XdsService::Ads => "ads",
            XdsService::Endpoints => "eds",
        }
    }
}

/// Sync state of one resource type on one stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeStatus {
    pub subscribed: bool,
    pub wildcard: bool,
    pub subscribed_names: usize,
    /// the names subscribed (besides the wildcard), shared with the stream
    pub names: Arc<super::subscription::NameSet>,
    /// names subscribed that meshfed does not serve (as of the last subscription change)
    pub missing: Vec<Arc<str>>,
    pub sent_nonce: String,
    pub sent_version: String,
    #[serde(skip)]
    pub sent_at: Option<SystemTime>,
    pub acked_nonce: String,
    pub last_error: Option<String>,
    /// resources the proxy holds (or is being sent)
    pub resources: usize,
    pub responses_sent: u64,
    pub bytes_sent: u64,
    pub nacks: u64,
    /// when the push loop first saw the change the latest response carries (for the convergence
    /// metric; None when the response answered a request rather than a change)
    #[serde(skip)]
    pub sent_change_seen: Option<Instant>,
    /// the snapshot generation of the latest response sent
    #[serde(skip)]
    pub sent_generation: u64,
    /// the newest snapshot generation the stream has looked at
    #[serde(skip)]
    pub seen_generation: u64,
    /// the latest ACKs of the latest response: (its generation, when), oldest first, at most [`ACKS_KEPT`]
    /// (drill reports: when every proxy had a push)
    #[serde(skip)]
    pub acks: std::collections::VecDeque<(u64, SystemTime)>,
}

/// ACKs kept per type status ([`TypeStatus::acks`]).
pub const ACKS_KEPT: usize = 32;

/// A proxy's sync state for one type, as `istioctl proxy-status` computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ConfigState {
    #[serde(rename = "SYNCED")]
    Synced,
    #[serde(rename = "STALE")]
    Stale,
    #[serde(rename = "NOT SENT")]
    NotSent,
    #[serde(rename = "ERROR")]
    Error,
}

impl ConfigState {
    /// ERROR if the last response was NACKed, NOT SENT if nothing was sent, SYNCED if the latest
    /// response was ACKed, else STALE.
    pub fn of(s: &TypeStatus) -> ConfigState {
        if s.last_error.is_some() {
            ConfigState::Error
        } else if s.sent_nonce.is_empty() {
            ConfigState::NotSent
        } else if s.acked_nonce == s.sent_nonce {
            ConfigState::Synced
        } else {
            ConfigState::Stale
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConfigState::Synced => "SYNCED",
            ConfigState::Stale => "STALE",
            ConfigState::NotSent => "NOT SENT",
            ConfigState::Error => "ERROR",
        }
    }
}

impl TypeStatus {
    /// One status standing for several streams of a type (a proxy's per-type EDS streams): the names of
    /// all of them, the worst state (an error, else a response not ACKed, else all ACKed), the latest
    /// nonces and sums of the counters.
    pub fn summary<'a>(streams: impl IntoIterator<Item = &'a TypeStatus>) -> TypeStatus {
        let mut out = TypeStatus::default();
        let mut names = super::subscription::Names::default();
        let mut stale: Option<&TypeStatus> = None;
        let mut latest: Option<&TypeStatus> = None;
        let mut seen: Option<u64> = None;
        for s in streams {
            seen = Some(seen.map_or(s.seen_generation, |g| g.min(s.seen_generation)));
            out.subscribed |= s.subscribed;
            out.wildcard |= s.wildcard;
            names.extend(s.names.iter().cloned());
            out.resources += s.resources;
            out.responses_sent += s.responses_sent;
            out.bytes_sent += s.bytes_sent;
            out.nacks += s.nacks;
            out.missing.extend(s.missing.iter().cloned());
            if out.last_error.is_none() && s.last_error.is_some() {
                out.last_error = s.last_error.clone();
            }
            if !s.sent_nonce.is_empty() && s.acked_nonce != s.sent_nonce && stale.is_none() {
                stale = Some(s);
            }
            if s.sent_at > latest.and_then(|l| l.sent_at) {
                latest = Some(s);
            }
        }
        // the state follows the stream that decides it: one not ACKed, else the latest sent
        if let Some(s) = stale.or(latest) {
            out.sent_nonce = s.sent_nonce.clone();
            out.acked_nonce = s.acked_nonce.clone();
            out.sent_version = s.sent_version.clone();
            out.sent_at = s.sent_at;
            out.sent_generation = s.sent_generation;
            out.acks = s.acks.clone();
        }
        // the generation every stream has looked at
        out.seen_generation = seen.unwrap_or_default();
        out.subscribed_names = names.len();
        out.names = super::subscription::intern(names);
        out
    }

    /// The client ACKed `nonce`: recorded, and its last error cleared. Returns when the push loop first saw
    /// the change the ACKed response carried, if it is the latest response and carried one (the change has
    /// converged on this proxy; once per response).
    pub fn ack(&mut self, nonce: &str) -> Option<Instant> {
        let converged = if self.sent_nonce == nonce { self.sent_change_seen.take() } else { None };
        if self.sent_nonce == nonce && self.acks.back().is_none_or(|(g, _)| *g < self.sent_generation) {
            if self.acks.len() >= ACKS_KEPT {
                self.acks.pop_front();
            }
            self.acks.push_back((self.sent_generation, SystemTime::now()));
        }
        self.acked_nonce = nonce.to_string();
        self.last_error = None;
        converged
    }
}

/// One connected proxy: its ADS stream, or its per-type EDS streams on one connection.
#[derive(Debug)]
pub struct Connection {
    pub id: u64,
    pub proxy: Proxy,
    pub flavor: Flavor,
    pub service: XdsService,
    /// the scopes of the resources the proxy is served (see [`Connection::view`])
    view: Mutex<View>,
    pub connected_at: SystemTime,
    /// `connected_at` on the monotonic clock
    pub connected: Instant,
    /// per type, of the ADS stream
    pub status: Mutex<[TypeStatus; 4]>,
    /// per-type streams (EDS beside istiod): each stream's status, by stream id
    pub streams: Mutex<BTreeMap<u64, TypeStatus>>,
}

impl Connection {
    pub fn update(&self, t: ResourceType, f: impl FnOnce(&mut TypeStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s[t.index()]);
        }
    }

    /// Updates the status of the per-type stream `stream` (created on first use).
    pub fn update_stream(&self, stream: u64, f: impl FnOnce(&mut TypeStatus)) {
        if let Ok(mut s) = self.streams.lock() {
            f(s.entry(stream).or_default());
        }
    }

    /// The per-type stream `stream` ended.
    pub fn remove_stream(&self, stream: u64) {
        if let Ok(mut s) = self.streams.lock() {
            s.remove(&stream);
        }
    }

    /// Per type: the ADS stream's status; for a proxy on per-type streams, the EDS status summarises its
    /// streams ([`TypeStatus::summary`]).
    /// The proxy's EDS ACKs as a drill's report counts them ([`crate::traffic::drill::ProxyAcks`]).
    pub fn eds_acks(&self) -> crate::traffic::drill::ProxyAcks {
        let eds = &self.status()[ResourceType::Endpoint.index()];
        crate::traffic::drill::ProxyAcks {
            proxy: self.proxy.key.to_string(),
            connected_at: Some(self.connected_at),
            acked: eds.acks.iter().copied().collect(),
            seen_generation: eds.seen_generation,
            sent_generation: eds.sent_generation,
            in_sync: eds.acked_nonce == eds.sent_nonce,
        }
    }

    pub fn status(&self) -> [TypeStatus; 4] {
        let mut out = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        if self.service == XdsService::Endpoints {
            let streams = self.stream_status();
            out[ResourceType::Endpoint.index()] = TypeStatus::summary(streams.values());
        }
        out
    }

    /// The per-type streams' statuses, by stream id.
    pub fn stream_status(&self) -> BTreeMap<u64, TypeStatus> {
        self.streams.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The scopes of the resources the proxy is served.
    pub fn view(&self) -> View {
        match self.view.lock() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The stream re-attached the proxy with another view.
    pub fn set_view(&self, view: View) {
        match self.view.lock() {
            Ok(mut v) => *v = view,
            Err(poisoned) => *poisoned.into_inner() = view,
        }
    }
}

/// Every connected stream, by connection id.
#[derive(Debug, Default)]
pub struct Connections {
    next_id: AtomicU64,
    inner: Mutex<BTreeMap<u64, Arc<Connection>>>,
}

impl Connections {
    pub fn register(
        self: &Arc<Self>,
        proxy: Proxy,
        flavor: Flavor,
        service: XdsService,
        view: View,
    ) -> ConnectionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Arc::new(Connection {
            id,
            proxy,
            flavor,
            service,
            view: Mutex::new(view),
            connected_at: SystemTime::now(),
            connected: Instant::now(),
            status: Mutex::new(Default::default()),
            streams: Mutex::new(BTreeMap::new()),
        });
        if let Ok(mut m) = self.inner.lock() {
            m.insert(id, conn.clone());
        }
        ConnectionGuard { conn, connections: self.clone() }
    }

    pub fn list(&self) -> Vec<Arc<Connection>> {
        self.inner.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most recent connection of the proxy `<pod>.<namespace>`.
    pub fn find(&self, key: &str) -> Option<Arc<Connection>> {
        self.inner.lock().ok()?.values().rev().find(|c| &*c.proxy.key == key).cloned()
    }

    /// Proxies, not debug clients (istioctl) connected to ask questions.
    pub fn proxies(&self) -> Vec<Arc<Connection>> {
        self.list().into_iter().filter(|c| c.proxy.client != ClientKind::Debug).collect()
    }

    /// Connected proxies by kind and flavor (`sotw`, `delta`), debug clients not counted: every combination,
    /// zeros included (the `pilot_xds` gauge).
    pub fn proxy_counts(&self) -> Vec<(crate::proxy::ProxyKind, &'static str, usize)> {
        let proxies = self.proxies();
        let mut out = Vec::new();
        for kind in crate::proxy::ProxyKind::ALL {
            for flavor in [Flavor::Sotw, Flavor::Delta] {
                let n = proxies.iter().filter(|c| c.proxy.kind == kind && c.flavor == flavor).count();
                out.push((kind, flavor.as_str(), n));
            }
        }
        out
    }

    /// The connection of `proxy_id` (`POD.NS`, or a full node id).
    pub fn find_proxy(&self, proxy_id: &str) -> Option<Arc<Connection>> {
        if proxy_id.contains('~') {
            self.list().into_iter().rev().find(|c| &*c.proxy.id == proxy_id)
        } else {
            self.find(proxy_id)
        }
    }
}

/// Removes the connection when the stream ends.
#[derive(Debug)]
pub struct ConnectionGuard {
    pub conn: Arc<Connection>,
    connections: Arc<Connections>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.connections.inner.lock() {
            m.remove(&self.conn.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convergence_ends_once_with_the_latest_response() {
        let mut st =
            TypeStatus { sent_nonce: "2".into(), sent_change_seen: Some(Instant::now()), ..Default::default() };
        assert!(st.ack("1").is_none(), "an older nonce does not end the convergence");
        assert!(st.sent_change_seen.is_some());
        assert!(st.ack("2").is_some());
        assert!(st.ack("2").is_none(), "observed once");
        assert_eq!(st.acked_nonce, "2");
    }

    #[test]
    fn states_follow_istioctl() {
        let mut s = TypeStatus::default();
        assert_eq!(ConfigState::of(&s), ConfigState::NotSent);
        s.sent_nonce = "1".into();
        assert_eq!(ConfigState::of(&s), ConfigState::Stale);
        s.acked_nonce = "1".into();
        assert_eq!(ConfigState::of(&s), ConfigState::Synced);
        s.sent_nonce = "2".into();
        assert_eq!(ConfigState::of(&s), ConfigState::Stale);
        s.last_error = Some("bad".into());
        assert_eq!(ConfigState::of(&s), ConfigState::Error);
    }
}
