//! Recording drill aborts in the `TrafficPolicy` custom resource, so that an abort outlives the replica
//! that decided it.
//!
//! The push loop aborts a drill by itself when the clusters taking its traffic fall below
//! `abortBelowHealthy` ([`crate::traffic::drill`]); that decision lives in the loop's [`crate::traffic::Status`]. While the
//! policy in force comes from the custom resource ([`super::owner::Origin::CustomResource`]), this task
//! writes each such abort into the object: the drill's drain gets `drill.aborted: {at, reason}`
//! (server-side apply, field manager [`FIELD_MANAGER`], the edit of [`super::kube_edit`]). Every replica
//! watching the object then drops that drain ([`crate::traffic::effective_policy`]) and reports the drill aborted
//! with the recorded time and reason, also after a restart, and `meshfed traffic status` and the
//! operator see it in the object. Replicas that abort the same drill write the same record (the second
//! write changes nothing).
//!
//! It reads the push loop's published snapshots (as the debug surface does) and writes only to the
//! Kubernetes API; the watch brings the record back like any edit. A failed write (API unreachable) is
//! retried every [`RETRY`] while the abort is still unrecorded. With the file's `traffic:` in force
//! nothing is written here: the file is the operator's (often a read-only ConfigMap). The abort is then
//! kept, per replica, in the last-known state file when `lastKnownState` is on (`drillAborts`,
//! [`crate::source::last_known`]; the app hands it over from the push loop's snapshots and back at start),
//! and in memory only otherwise.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::owner::{Origin, TrafficOwner};
use super::{edit, kube_edit};
use crate::mesh_config::TrafficPolicyRef;
use crate::push::PushHandle;
use crate::source::kube::{ClientSpec, build_client};
use crate::traffic::drill::{self, Abort};
use crate::traffic::policy::{Drain, DrainTarget};

/// The field manager of the records' server-side applies.
pub const FIELD_MANAGER: &str = "meshfed-drill-abort";

/// How long after a failed write the next attempt is made.
pub const RETRY: Duration = Duration::from_secs(5);

/// The recording task (stopped when dropped).
pub struct AbortRecorder {
    task: JoinHandle<()>,
}

impl Drop for AbortRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AbortRecorder {
    pub fn spawn(
        client: ClientSpec,
        allow_exec_auth: bool,
        reference: TrafficPolicyRef,
        owner: TrafficOwner,
        push: PushHandle,
    ) -> AbortRecorder {
        AbortRecorder { task: tokio::spawn(run(client, allow_exec_auth, reference, owner, push)) }
    }
}

/// The aborts of the policy in force that the policy does not record yet: (drain, abort).
pub fn unrecorded(status: &crate::traffic::Status) -> Vec<(Drain, Abort)> {
    status
        .policy
        .drains
        .iter()
        .filter(|d| d.drill.as_ref().is_some_and(|x| x.aborted.is_none()))
        .filter_map(|d| {
            let abort = status.drills.get(&drill::key(d))?.aborted.clone()?;
            Some((d.clone(), abort))
        })
        .collect()
}

/// Sets `drill.aborted` on the drain of `drains` that is `d` (same target and start); a drain already
/// recorded is left as it is. No such drain (removed meanwhile): [`edit::Error::NoDrain`], nothing is
/// written.
pub fn mark_aborted(drains: &mut [serde_yaml::Value], d: &Drain, abort: &Abort) -> Result<(), edit::Error> {
    use serde_yaml::Value;
    let (key, name) = match &d.target {
        DrainTarget::Cluster(c) => ("cluster", c.as_str()),
        DrainTarget::Region(r) => ("region", &**r),
    };
    let start_of = |m: &serde_yaml::Mapping| {
        let s = m.get("start")?.as_str()?;
        s.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
    };
    for entry in drains.iter_mut() {
        let Some(m) = entry.as_mapping_mut() else { continue };
        if m.get(key).and_then(Value::as_str) != Some(name) || start_of(m) != d.start {
            continue;
        }
        let Some(drill) = m.get_mut("drill").and_then(Value::as_mapping_mut) else { continue };
        if !drill.contains_key("aborted") {
            let mut record = serde_yaml::Mapping::new();
            record.insert("at".into(), crate::traffic::decide::time_str(abort.at).into());
            record.insert("reason".into(), abort.reason.clone().into());
            drill.insert("aborted".into(), Value::Mapping(record));
        }
        return Ok(());
    }
    Err(edit::Error::NoDrain(drill::key(d)))
}

async fn run(
    spec: ClientSpec,
    allow_exec_auth: bool,
    reference: TrafficPolicyRef,
    owner: TrafficOwner,
    push: PushHandle,
) {
    let object = format!("{}/{}/{}", reference.cluster, reference.namespace, reference.name);
    let mut snapshots = push.subscribe();
    let mut client: Option<kube::Client> = None;
    // the drills recorded (or found gone) by this replica: written once
    let mut done: BTreeSet<String> = BTreeSet::new();
    loop {
        let pending: Vec<(Drain, Abort)> = {
            let snapshot = snapshots.borrow_and_update();
            unrecorded(&snapshot.traffic).into_iter().filter(|(d, _)| !done.contains(&drill::key(d))).collect()
        };
        let mut failed = false;
        if !pending.is_empty() && owner.origin() == Origin::CustomResource {
            if client.is_none() {
                match build_client(&spec, allow_exec_auth).await {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        warn!(%object, error = %e, "cannot record drill aborts in the TrafficPolicy yet");
                        failed = true;
                    }
                }
            }
            for (d, abort) in pending.iter().filter(|_| client.is_some()) {
                let key = drill::key(d);
                let c = client.clone().expect("checked");
                let result = kube_edit::edit_with(c, &reference.namespace, &reference.name, FIELD_MANAGER, |drains| {
                    mark_aborted(drains, d, abort)
                })
                .await;
                match result {
                    Ok(_) => {
                        info!(%object, drill = %key, "drill abort recorded in the TrafficPolicy");
                        done.insert(key);
                    }
                    Err(kube_edit::Error::Edit { source: edit::Error::NoDrain(_), .. }) => {
                        debug!(%object, drill = %key, "the aborted drill is no longer in the TrafficPolicy");
                        done.insert(key);
                    }
                    Err(e) => {
                        warn!(%object, drill = %key, error = %e, "recording the drill abort failed; retrying");
                        failed = true;
                    }
                }
            }
        }
        if failed {
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY) => {}
            }
        } else if snapshots.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClusterId;

    fn drain(start: &str) -> Drain {
        let t: jiff::Timestamp = start.parse().unwrap();
        Drain {
            target: DrainTarget::Cluster(ClusterId::new("azure-weu")),
            capacity: 0,
            ramp: None,
            start: Some(SystemTime::from(t)),
            expires: SystemTime::from(t) + Duration::from_secs(3600),
            reason: "drill".into(),
            drill: Some(crate::traffic::policy::Drill { abort_below_healthy: 50, aborted: None }),
        }
    }

    fn drains(yaml: &str) -> Vec<serde_yaml::Value> {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_drill_with_the_same_target_and_start_gets_the_record_once() {
        let d = drain("2026-12-05T10:00:00Z");
        let abort = Abort { at: d.start.unwrap() + Duration::from_secs(90), reason: "aws-use1 below 50%".into() };
        let mut list = drains(
            "- {cluster: azure-weu, start: '2026-12-05T09:00:00Z', drill: {abortBelowHealthy: 50}}\n\
             - {region: azure-weu, start: '2026-12-05T10:00:00Z', drill: {abortBelowHealthy: 50}}\n\
             - {cluster: azure-weu, capacity: 50}\n\
             - {cluster: azure-weu, start: '2026-12-05T10:00:00+00:00', drill: {abortBelowHealthy: 50}}\n",
        );
        mark_aborted(&mut list, &d, &abort).unwrap();
        let recorded: Vec<bool> = list.iter().map(|e| e["drill"].get("aborted").is_some()).collect();
        assert_eq!(recorded, [false, false, false, true], "{list:?}");
        assert_eq!(list[3]["drill"]["aborted"]["at"].as_str(), Some("2026-12-05T10:01:30Z"));
        assert_eq!(list[3]["drill"]["aborted"]["reason"].as_str(), Some("aws-use1 below 50%"));
        // again (another replica): unchanged
        let before = list.clone();
        let other = Abort { at: abort.at + Duration::from_secs(1), reason: "later".into() };
        mark_aborted(&mut list, &d, &other).unwrap();
        assert_eq!(list, before);
        // the drill removed meanwhile: nothing to write
        let mut gone = drains("- {cluster: azure-weu, capacity: 50}\n");
        assert!(matches!(mark_aborted(&mut gone, &d, &abort), Err(edit::Error::NoDrain(_))));
    }

    #[test]
    fn only_unrecorded_aborts_of_listed_drills_are_pending() {
        let mut aborted = drain("2026-12-05T10:00:00Z");
        let mut recorded = drain("2026-12-05T11:00:00Z");
        recorded.drill.as_mut().unwrap().aborted =
            Some(crate::traffic::policy::RecordedAbort { at: recorded.start.unwrap(), reason: "r".into() });
        let active = drain("2026-12-05T12:00:00Z");
        let mut status = crate::traffic::Status::default();
        status.policy.drains = vec![aborted.clone(), recorded.clone(), active.clone()];
        for d in [&aborted, &recorded, &active] {
            status.drills.insert(drill::key(d), drill::Report::new(d, d.start.unwrap()));
        }
        let abort = Abort { at: aborted.start.unwrap(), reason: "below".into() };
        for d in [&aborted, &recorded] {
            status.drills.get_mut(&drill::key(d)).unwrap().aborted = Some(abort.clone());
        }
        let pending = unrecorded(&status);
        assert_eq!(pending.len(), 1);
        aborted.drill = pending[0].0.drill.clone();
        assert_eq!(pending[0], (aborted, abort));
    }
}
