//! Process figures from /proc: resident memory and CPU time, of the server under test and of the load
//! client itself (so that the two are reported separately).

/// Resident set size in KiB (`VmRSS` of /proc/PID/status); 0 if unreadable.
pub fn rss_kb(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

/// Peak resident set size in KiB (`VmHWM`).
pub fn peak_rss_kb(pid: u32) -> u64 {
    status_field(pid, "VmHWM:")
}

/// Threads of the process.
pub fn threads(pid: u32) -> u64 {
    status_field(pid, "Threads:")
}

fn status_field(pid: u32, key: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) of the process in nanoseconds: the sum over its threads of
/// /proc/PID/task/TID/schedstat (nanosecond resolution), falling back to /proc/PID/stat's
/// utime + stime (clock ticks of 10 ms).
pub fn cpu_ns(pid: u32) -> u64 {
    let mut total = 0u64;
    let mut any = false;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat"))
                && let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok())
            {
                total += ns;
                any = true;
            }
        }
    }
    if any {
        // threads that exited are counted in the process's stat only: take the larger of the two
        return total.max(stat_cpu_ns(pid));
    }
    stat_cpu_ns(pid)
}

/// utime and stime of /proc/PID/stat, in clock ticks (10 ms): CPU in user space and in the kernel.
pub fn user_sys_ticks(pid: u32) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return (0, 0) };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else { return (0, 0) };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(14), ticks(15))
}

/// utime + stime of /proc/PID/stat, in nanoseconds (USER_HZ is 100 on Linux).
pub fn stat_cpu_ns(pid: u32) -> u64 {
    let (user, sys) = user_sys_ticks(pid);
    (user + sys) * 10_000_000
}

/// A short description of the machine (CPU model, cores, memory) for reports.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().trim_end_matches(" kB").to_string()))
        })
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores, {:.1} GiB", mem_kb as f64 / 1024.0 / 1024.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(super::rss_kb(pid) > 0);
        assert!(super::threads(pid) >= 1);
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(super::cpu_ns(pid) > 0);
        assert!(!super::machine().is_empty());
    }
}
