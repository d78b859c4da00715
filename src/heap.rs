//! The heap: meshfed's binaries allocate with jemalloc, which returns freed memory to the system
//! (background purging) instead of keeping it as glibc's malloc does after a burst of short-lived
//! per-stream buffers (a fleet connecting or reconnecting at once). Its statistics tell live memory
//! from resident memory, for the metrics and the benchmarks.

/// The options meshfed's binaries start jemalloc with: freed pages go back to the system after about a
/// second unused (`dirty_decay_ms`, jemalloc's default is 10 s), so the memory a burst of connections or
/// of initial responses used is returned soon after; the background threads do the purging. (0 would
/// purge on every free: measured at 3x the CPU per push.) `_RJEM_MALLOC_CONF` in the environment adds to
/// these.
pub const MALLOC_CONF: &[u8] = b"dirty_decay_ms:1000,background_thread:true\0";

/// jemalloc's counters, in bytes: `allocated` is live memory, `resident` what the allocator maps and
/// touches (close to the process RSS). None when this process does not allocate with jemalloc (tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HeapStats {
    pub allocated: u64,
    pub resident: u64,
}

/// The current counters (refreshed from jemalloc's per-thread caches first).
#[cfg(feature = "jemalloc")]
pub fn stats() -> Option<HeapStats> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().ok()? as u64;
    let resident = tikv_jemalloc_ctl::stats::resident::read().ok()? as u64;
    (resident > 0).then_some(HeapStats { allocated, resident })
}

#[cfg(not(feature = "jemalloc"))]
pub fn stats() -> Option<HeapStats> {
    None
}
