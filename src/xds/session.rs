//! The proxy a stream serves, once identified: its parsed node, resolved network, view (the scopes of
//! what it is served), attachment to the push loop and its entry in the connection status.
//!
//! An ADS stream has a session of its own. The per-type EDS streams of one proxy share one: beside
//! istiod, Envoy opens one `StreamEndpoints`/`DeltaEndpoints` stream per cluster whose EDS comes from
//! meshfed, all on one HTTP/2 connection and all with the same node. The first stream of a node on a
//! connection makes the session; the others find it in the connection's [`Sessions`] and cost only their
//! subscription, their per-type state and their line in the session's status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use envoy_types::pb::envoy::config::core::v3::Node;

use super::connections::{Connection, ConnectionGuard, Connections, Flavor, XdsService};
use crate::model::NetworkId;
use crate::proxy::Proxy;
use crate::push::{Attachment, PushHandle};
use crate::translate::{View, ViewKeys};

/// A proxy served by one or more streams.
#[derive(Debug)]
pub struct ProxySession {
    pub proxy: Proxy,
    /// the proxy's network: node metadata NETWORK, else its cluster's network
    pub network: NetworkId,
    /// the view, the view keys it was built with and the attachment that keeps its scopes translated;
    /// replaced when the view keys change (failoverPriority rules read other labels, DestinationRules make
    /// other namespaces or labels matter)
    attached: Mutex<(View, Arc<ViewKeys>, Arc<Attachment>)>,
    /// the proxy's entry in the connection status (`/debug/syncz`, `/debug/adsz`)
    entry: ConnectionGuard,
    /// the snapshot the latest attach returned: it holds the view's scopes, possibly before any snapshot
    /// published to every stream does (a stream joining the session starts from it)
    attached_snapshot: Mutex<Arc<crate::cache::Snapshot>>,
}

impl ProxySession {
    /// Attaches `proxy` to the push loop and registers it; returns the session and the snapshot the attach
    /// returned (it holds the proxy's scopes). None when the push loop is gone.
    pub async fn attach(
        proxy: Proxy,
        push: &PushHandle,
        connections: &Arc<Connections>,
        flavor: Flavor,
        service: XdsService,
    ) -> Option<(Arc<ProxySession>, Arc<crate::cache::Snapshot>)> {
        let snap = push.snapshot();
        let network = if proxy.network.is_empty() {
            proxy
                .cluster_id
                .as_ref()
                .and_then(|c| snap.clusters_summary.iter().find(|s| &s.id == c))
                .map(|s| s.network.clone())
                .unwrap_or_default()
        } else {
            proxy.network.clone()
        };
        let view_keys = snap.view_keys.clone();
        let view = View::with_network(&proxy, network.clone(), &view_keys);
        let (attachment, attached) = push.attach(view.clone()).await?;
        let entry = connections.register(proxy.clone(), flavor, service, view.clone());
        let session = ProxySession {
            proxy,
            network,
            attached: Mutex::new((view, view_keys, Arc::new(attachment))),
            entry,
            attached_snapshot: Mutex::new(attached.clone()),
        };
        Some((Arc::new(session), attached))
    }

    /// The snapshot the latest attach of the session's view returned.
    pub fn attached_snapshot(&self) -> Arc<crate::cache::Snapshot> {
        self.attached_snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The proxy's entry in the connection status.
    pub fn entry(&self) -> &Arc<Connection> {
        &self.entry.conn
    }

    /// The current view and the view keys it was built with.
    pub fn view(&self) -> (View, Arc<ViewKeys>) {
        let guard = self.lock();
        (guard.0.clone(), guard.1.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (View, Arc<ViewKeys>, Arc<Attachment>)> {
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The view for the view keys `keys`: the current one if it was built with them,
    /// else a new view attached to the push loop (the first stream of the session to see new keys makes
    /// it; the others take it). Returns the view and, when it is new, the snapshot the attach returned.
    pub async fn view_for(
        &self,
        keys: &Arc<ViewKeys>,
        push: &PushHandle,
    ) -> Option<(View, Option<Arc<crate::cache::Snapshot>>)> {
        {
            let guard = self.lock();
            if *guard.1 == **keys {
                return Some((guard.0.clone(), None));
            }
        }
        let view = View::with_network(&self.proxy, self.network.clone(), keys);
        let (attachment, snapshot) = push.attach(view.clone()).await?;
        let mut guard = self.lock();
        *guard = (view.clone(), keys.clone(), Arc::new(attachment));
        self.entry.conn.set_view(view.clone());
        drop(guard);
        *self.attached_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = snapshot.clone();
        Some((view, Some(snapshot)))
    }
}

/// The sessions of one connection's per-type streams, by node: the node's id and a fingerprint of its
/// encoding (a stream with the same id but other metadata, locality or labels gets a session of its own).
#[derive(Debug, Default)]
pub struct Sessions(Mutex<HashMap<SessionKey, Weak<ProxySession>>>);

/// A node's key in [`Sessions`]: its id and a fingerprint of the whole node.
pub type SessionKey = (Arc<str>, u64);

impl Sessions {
    /// The key of `node` in the table. (Its metadata is a map, with maps nested in it (`LABELS`,
    /// `PLATFORM_METADATA`, ...): prost encodes them in an order that differs between two decodings of the
    /// same bytes, so the node is hashed in its canonical encoding, every map sorted by key.)
    pub fn key(node: &Node) -> SessionKey {
        let h = xxhash_rust::xxh3::xxh3_64(&crate::canonical::encode_canonical(node));
        (Arc::from(node.id.as_str()), h)
    }

    /// The live session of `key`, if a stream still holds it.
    pub fn find(&self, key: &SessionKey) -> Option<Arc<ProxySession>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key).and_then(Weak::upgrade) {
            Some(s) => Some(s),
            None => {
                map.remove(key);
                None
            }
        }
    }

    /// Records `session` under `key` (replacing a dead one) and forgets sessions no stream holds any more;
    /// returns the session to use: one another stream inserted meanwhile wins.
    pub fn insert(&self, key: SessionKey, session: Arc<ProxySession>) -> Arc<ProxySession> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.strong_count() > 0);
        if let Some(existing) = map.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        map.insert(key, Arc::downgrade(&session));
        session
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use prost::Message;

    use super::*;

    fn string(s: &str) -> Value {
        Value { kind: Some(Kind::StringValue(s.into())) }
    }

    #[test]
    fn a_node_has_one_key_however_its_nested_metadata_was_decoded() {
        // LABELS and PLATFORM_METADATA are maps inside the metadata map, as istio-agent writes them
        let labels = Struct { fields: (0..24).map(|i| (format!("label-{i}"), string(&i.to_string()))).collect() };
        let platform = Struct { fields: (0..8).map(|i| (format!("p{i}"), string("x"))).collect() };
        let meta = Struct {
            fields: [
                ("LABELS".to_string(), Value { kind: Some(Kind::StructValue(labels)) }),
                ("PLATFORM_METADATA".to_string(), Value { kind: Some(Kind::StructValue(platform)) }),
                ("NAMESPACE".to_string(), string("shop")),
            ]
            .into_iter()
            .collect(),
        };
        let node = Node {
            id: "sidecar~10.0.0.1~a.shop~shop.svc.cluster.local".into(),
            metadata: Some(meta),
            ..Default::default()
        };
        let bytes = node.encode_to_vec();
        // every decoding builds its maps afresh (another hash seed, another iteration order)
        let key = Sessions::key(&node);
        for _ in 0..16 {
            let again = Node::decode(bytes.as_slice()).expect("decodes");
            assert_eq!(Sessions::key(&again), key);
        }
        // another label value is another node
        let mut other = node.clone();
        let Some(Kind::StructValue(l)) = &mut other.metadata.as_mut().unwrap().fields.get_mut("LABELS").unwrap().kind
        else {
            panic!("labels")
        };
        l.fields.insert("label-0".into(), string("changed"));
        assert_ne!(Sessions::key(&other), key);
    }
}
