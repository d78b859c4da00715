//! Resolves east-west gateway hostnames (AWS ELBs publish hostnames, not IPs) and re-resolves them
//! periodically: the answers go to the push loop, so translation itself stays free of I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use tracing::{debug, warn};

use crate::push::PushHandle;

/// How often gateway hostnames are resolved again.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves every gateway hostname in the current snapshot now, then every `interval` or whenever the
/// set of gateways changes. Runs until the push loop goes away.
pub async fn run(push: PushHandle, interval: Duration) {
    let mut snapshots = push.subscribe();
    let mut last: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    loop {
        let hosts: Vec<(String, u16)> = {
            let snap = snapshots.borrow_and_update();
            let mut h: Vec<(String, u16)> = snap
                .gateways
                .iter()
                .filter(|g| g.address.parse::<IpAddr>().is_err())
                .map(|g| (g.address.to_string(), g.port))
                .collect();
            h.sort();
            h.dedup_by(|a, b| a.0 == b.0);
            h
        };
        let mut resolved = BTreeMap::new();
        for (host, port) in hosts {
            match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host.clone(), port))).await {
                Ok(Ok(addrs)) => {
                    let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                    ips.sort();
                    ips.dedup();
                    debug!(%host, ?ips, "gateway hostname resolved");
                    resolved.insert(host, ips);
                }
                Ok(Err(e)) => {
                    warn!(%host, "cannot resolve gateway hostname: {e}; keeping the previous addresses");
                    if let Some(prev) = last.get(&host) {
                        resolved.insert(host, prev.clone());
                    }
                }
                Err(_) => {
                    warn!(%host, "resolving gateway hostname timed out; keeping the previous addresses");
                    if let Some(prev) = last.get(&host) {
                        resolved.insert(host, prev.clone());
                    }
                }
            }
        }
        if resolved != last {
            push.set_resolved_gateways(resolved.clone());
            last = resolved;
        }
        // Wait for the interval, or for the set of gateways to change.
        let gateways = snapshots.borrow().gateways.clone();
        let changed = async {
            loop {
                if snapshots.changed().await.is_err() {
                    return false;
                }
                if *snapshots.borrow().gateways != *gateways {
                    return true;
                }
            }
        };
        tokio::select! {
            alive = changed => if !alive { return },
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
