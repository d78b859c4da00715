//! The push log: the last pushes of the push loop, what triggered them and what they changed
//! (`/debug/push_status` shows it).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::cache::Changes;
use crate::type_url::ResourceType;

/// How many pushes `/debug/push_status` keeps.
pub const PUSH_LOG_SIZE: usize = 100;

/// One push of the push loop.
#[derive(Clone, Debug)]
pub struct PushRecord {
    pub generation: u64,
    /// what caused it (the services and gateways that changed)
    pub trigger: String,
    /// resources changed, by type (CDS, EDS, LDS, RDS); types without changes are absent
    pub types: BTreeMap<&'static str, usize>,
    pub time: SystemTime,
    /// translation and publication
    pub duration: Duration,
}

/// The last [`PUSH_LOG_SIZE`] pushes, oldest first. Cloning shares the log.
#[derive(Clone, Debug, Default)]
pub struct PushLog(Arc<Mutex<VecDeque<PushRecord>>>);

impl PushLog {
    /// The number of changed resources per type of a push (types without changes left out).
    pub fn counts(changes: &Changes) -> Vec<(ResourceType, usize)> {
        ResourceType::ALL
            .iter()
            .filter_map(|t| changes.get(*t).map(|c| (*t, c.0.len())))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn record(&self, generation: u64, trigger: String, counts: Vec<(ResourceType, usize)>, duration: Duration) {
        let record = PushRecord {
            generation,
            trigger,
            types: counts.into_iter().map(|(t, n)| (t.short(), n)).collect(),
            time: SystemTime::now(),
            duration,
        };
        if let Ok(mut log) = self.0.lock() {
            log.push_back(record);
            while log.len() > PUSH_LOG_SIZE {
                log.pop_front();
            }
        }
    }

    pub fn list(&self) -> Vec<PushRecord> {
        self.0.lock().map(|l| l.iter().cloned().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_log_is_bounded() {
        let log = PushLog::default();
        for g in 0..(PUSH_LOG_SIZE as u64 + 10) {
            log.record(g, "t".into(), vec![(ResourceType::Endpoint, 1)], Duration::ZERO);
        }
        let l = log.list();
        assert_eq!(l.len(), PUSH_LOG_SIZE);
        assert_eq!(l[0].generation, 10);
    }
}
