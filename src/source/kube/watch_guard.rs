//! The watch guard: the layer of each cluster's client that notices watch streams cut short, and
//! delays the next watch of a resource whose last one was cut (see [`WatchCuts`]).
//!
//! Uses the retry timing and the watched kinds (to name a resource in errors); used by the client
//! (which installs the layer) and the cluster loop (which reads the cuts).

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use super::backoff::{Backoff, WATCH_BACKOFF};
use super::kinds::WatchedKind;

/// Watch streams of one cluster that end in an error (the connection dropped mid-body, without the
/// chunked body's end; possibly mid-way through an event line). kube-rs treats such an end as a watch
/// that timed out and watches again at once, without telling its caller, so an API server (or a proxy in
/// front of it) that keeps cutting watches would be asked again in a tight loop, and nothing would show
/// that the cluster's changes no longer arrive. Every watch request of the cluster's client passes
/// through the `WatchGuardLayer` below, which records cuts here, per resource (its plural): a watch of a
/// resource whose last watch was cut waits [`WATCH_BACKOFF`] first, and the cut is reported as the
/// kind's watch error (in the cluster's `lastError`) until a watch of it delivers a whole line again.
/// Deliveries are also what clears a kind's earlier watch error (say, from the API server being down)
/// when its watch resumes without a relist and nothing changes (only BOOKMARKs arrive).
#[derive(Debug)]
pub struct WatchCuts {
    state: std::sync::Mutex<BTreeMap<String, CutState>>,
    /// resources whose watches delivered a whole line since [`Self::take_delivered`]
    delivered: std::sync::Mutex<BTreeSet<String>>,
    /// bumped when an error appears or clears, or a resource is added to `delivered`
    pub(super) changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct CutState {
    backoff: Backoff,
    error: Option<String>,
}

impl WatchCuts {
    pub fn new() -> Arc<WatchCuts> {
        Arc::new(WatchCuts {
            state: std::sync::Mutex::default(),
            delivered: std::sync::Mutex::default(),
            changed: watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, CutState>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long a new watch of `plural` waits first (its last watch was cut).
    fn delay(&self, plural: &str) -> Option<Duration> {
        let mut st = self.lock();
        let s = st.get_mut(plural)?;
        s.error.is_some().then(|| s.backoff.next_delay())
    }

    fn cut(&self, plural: &str, error: String) {
        let mut st = self.lock();
        let s = st
            .entry(plural.to_string())
            .or_insert_with(|| CutState { backoff: Backoff::new(WATCH_BACKOFF), error: None });
        if s.error.is_none() {
            warn!(resource = plural, %error, "watch stream cut short; watching again after a backoff");
        }
        s.error = Some(error);
        drop(st);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn delivered(&self, plural: &str) {
        let mut changed = false;
        if let Some(s) = self.lock().get_mut(plural)
            && s.error.take().is_some()
        {
            s.backoff.reset();
            changed = true;
        }
        changed |= self.delivered.lock().unwrap_or_else(|e| e.into_inner()).insert(plural.to_string());
        if changed {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The kinds whose watches delivered a whole line since the last call.
    pub(super) fn take_delivered(&self) -> Vec<WatchedKind> {
        let plurals = std::mem::take(&mut *self.delivered.lock().unwrap_or_else(|e| e.into_inner()));
        WatchedKind::ALL.into_iter().filter(|k| plurals.contains(&k.api_resource().plural)).collect()
    }

    /// The current errors, as `Kind watch: ...` lines.
    pub(super) fn errors(&self) -> Vec<String> {
        let st = self.lock();
        st.iter()
            .filter_map(|(plural, s)| {
                let e = s.error.as_ref()?;
                let kind = WatchedKind::ALL
                    .iter()
                    .find(|k| k.api_resource().plural == *plural)
                    .map_or(plural.as_str(), |k| k.name());
                Some(format!("{kind} watch: the API server cut the watch stream short ({e})"))
            })
            .collect()
    }
}

/// The plural of a watch request (`...?watch=true` or `watch=1`), None for other requests.
fn watch_resource(uri: &http::Uri) -> Option<String> {
    let watching = uri.query()?.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
    watching.then(|| uri.path().rsplit('/').next().unwrap_or_default().to_string())
}

/// See [`WatchCuts`].
#[derive(Clone, Debug)]
pub(super) struct WatchGuardLayer {
    pub(super) cuts: Arc<WatchCuts>,
}

impl<S> tower::Layer<S> for WatchGuardLayer {
    type Service = WatchGuard<S>;

    fn layer(&self, inner: S) -> WatchGuard<S> {
        WatchGuard { inner, cuts: self.cuts.clone() }
    }
}

pub(super) struct WatchGuard<S> {
    inner: S,
    cuts: Arc<WatchCuts>,
}

impl<S, B> tower::Service<http::Request<kube::client::Body>> for WatchGuard<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    type Response = http::Response<WatchBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let resource = watch_resource(req.uri());
        let delay = resource.as_deref().and_then(|r| self.cuts.delay(r));
        // the inner future does nothing until polled: the request waits out the delay
        let response = self.inner.call(req);
        let cuts = self.cuts.clone();
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let response = response.await?;
            Ok(response.map(|inner| WatchBody { inner, watch: resource.map(|r| (r, cuts)) }))
        })
    }
}

/// A response body; for a watch, reports a cut (the body failing) and delivery (a whole line).
pub(super) struct WatchBody<B> {
    inner: B,
    watch: Option<(String, Arc<WatchCuts>)>,
}

impl<B> http_body::Body for WatchBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, B::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some((resource, cuts)) = &this.watch {
            match &frame {
                Some(Ok(f)) if f.data_ref().is_some_and(|d| d.contains(&b'\n')) => cuts.delivered(resource),
                Some(Err(e)) => cuts.cut(resource, e.to_string()),
                _ => {}
            }
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_requests_and_cuts_are_recognised() {
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        assert_eq!(
            watch_resource(&uri("https://k:6443/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion=7")),
            Some("endpointslices".into())
        );
        assert_eq!(watch_resource(&uri("/api/v1/namespaces/a/pods?timeoutSeconds=290&watch=1")), Some("pods".into()));
        assert_eq!(watch_resource(&uri("/api/v1/pods?limit=500")), None);
        assert_eq!(watch_resource(&uri("/api/v1/pods?watch=false")), None);

        let cuts = WatchCuts::new();
        assert_eq!(cuts.delay("endpointslices"), None, "no cut, no delay");
        cuts.cut("endpointslices", "error reading a body from connection".into());
        let first = cuts.delay("endpointslices").unwrap();
        let second = cuts.delay("endpointslices").unwrap();
        assert!(first <= WATCH_BACKOFF.initial.mul_f64(1.2) && second > first, "{first:?} then {second:?}");
        assert_eq!(
            cuts.errors(),
            vec![
                "EndpointSlice watch: the API server cut the watch stream short (error reading a body from connection)"
            ]
        );
        assert_eq!(cuts.delay("pods"), None, "per resource");
        cuts.delivered("endpointslices");
        assert!(cuts.errors().is_empty());
        assert_eq!(cuts.delay("endpointslices"), None);
        assert_eq!(cuts.take_delivered(), vec![WatchedKind::EndpointSlice]);
        assert!(cuts.take_delivered().is_empty());
    }
}
