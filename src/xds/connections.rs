//! Connected proxies and the per-type sync state the debug surface reports (istiod's syncz fields).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::proxy::Proxy;
use crate::translate::View;
use crate::type_url::ResourceType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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

/// Sync state of one resource type on one stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeStatus {
    pub subscribed: bool,
    pub wildcard: bool,
    pub subscribed_names: usize,
    /// the names subscribed (besides the wildcard), shared with the stream
    pub names: Arc<super::subscription::NameSet>,
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
}

/// One connected stream.
#[derive(Debug)]
pub struct Connection {
    pub id: u64,
    pub proxy: Proxy,
    pub flavor: Flavor,
    /// the scopes of the resources the proxy is served (see [`Connection::view`])
    view: Mutex<View>,
    pub connected_at: SystemTime,
    /// `connected_at` on the monotonic clock
    pub connected: Instant,
    pub status: Mutex<[TypeStatus; 4]>,
}

impl Connection {
    pub fn update(&self, t: ResourceType, f: impl FnOnce(&mut TypeStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s[t.index()]);
        }
    }

    pub fn status(&self) -> [TypeStatus; 4] {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
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
    pub fn register(self: &Arc<Self>, proxy: Proxy, flavor: Flavor, view: View) -> ConnectionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Arc::new(Connection {
            id,
            proxy,
            flavor,
            view: Mutex::new(view),
            connected_at: SystemTime::now(),
            connected: Instant::now(),
            status: Mutex::new(Default::default()),
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
