//! Durations as Istio writes them (`10s`, `100ms`, `1m`, `1.5s`): in the mesh config (`debounce`,
//! `readyTimeout`, `unreachableGracePeriod`), in DestinationRules (outlier detection's `interval` and
//! `baseEjectionTime`) and in meshfed's command-line options. Uses nothing else of meshfed.

use std::time::Duration;

/// Durations in Istio's form (`10s`, `100ms`, `1m`, `1.5s`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    if !(n.is_finite() && n >= 0.0) {
        return None;
    }
    let secs = match unit {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    // (beyond what a Duration holds: not a duration, not a panic)
    Duration::try_from_secs_f64(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_fractions() {
        for (text, want) in [
            ("10s", Duration::from_secs(10)),
            ("100ms", Duration::from_millis(100)),
            ("1m", Duration::from_secs(60)),
            ("2h", Duration::from_secs(7200)),
            ("1.5s", Duration::from_millis(1500)),
            ("250us", Duration::from_micros(250)),
            ("40ns", Duration::from_nanos(40)),
            ("0s", Duration::ZERO),
            (" 3s ", Duration::from_secs(3)),
        ] {
            assert_eq!(parse_duration(text), Some(want), "{text:?}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for text in [
            "",
            "10",
            "s",
            "-1s",
            "1d",
            "10 s",
            "1e3s",
            "inf",
            "NaNs",
            "1.5.2s",
            "ten seconds",
            "100000000000000000000000s",
        ] {
            assert_eq!(parse_duration(text), None, "{text:?}");
        }
    }
}
