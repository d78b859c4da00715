//! `meshfed traffic status | whatif`: reads a running meshfed's `/debug/trafficz` and `/debug/whatif`
//! (plain HTTP on the debug address, with an optional bearer token) and prints them as tables.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to meshfed's debug server {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("meshfed's debug server {addr}: {reason}")]
    Http { addr: String, reason: String },
    #[error("meshfed answered {path} with status {status}: {body}")]
    Status { path: String, status: u16, body: String },
    #[error("meshfed's answer to {path} is not JSON: {source}")]
    Json { path: String, source: serde_json::Error },
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// GET `path` on the debug server at `addr` (`HOST:PORT`), as JSON.
pub fn get_json(addr: &str, path: &str, token: Option<&str>) -> Result<Value, Error> {
    let connect = |source| Error::Connect { addr: addr.into(), source };
    let http = |reason: String| Error::Http { addr: addr.into(), reason };
    let sock = addr
        .to_socket_addrs()
        .map_err(connect)?
        .next()
        .ok_or_else(|| connect(std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))?;
    let mut stream = TcpStream::connect_timeout(&sock, TIMEOUT).map_err(connect)?;
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| http(e.to_string()))?;
    let mut response = Vec::new();
    stream.take(64 << 20).read_to_end(&mut response).map_err(|e| http(e.to_string()))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| http("no HTTP response".into()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| http(format!("bad status line {:?}", head.lines().next().unwrap_or(""))))?;
    if status != 200 {
        return Err(Error::Status { path: path.into(), status, body: body.trim().into() });
    }
    serde_json::from_str(body).map_err(|source| Error::Json { path: path.into(), source })
}

/// Percent-encodes a query value.
pub fn encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn pct(v: &Value) -> String {
    v.as_f64().map(|f| format!("{f:.1}%")).unwrap_or_else(|| "-".into())
}

/// Rows as aligned columns (the first row is the header).
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|x| x.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::from("  ");
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < r.len() {
                line.push_str(&" ".repeat(width[c] - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `/debug/trafficz`, readable.
pub fn format_status(v: &Value) -> String {
    let mut out = String::new();
    if let Some(m) = v.get("meshConfig") {
        out.push_str(&format!("Mesh config: {}\n", s(&m["path"])));
        match &m["error"] {
            Value::Null => out.push_str(&format!("  last reload: {}\n", s(&m["lastSuccess"]))),
            e => out.push_str(&format!("  LAST EDIT REFUSED ({}): {}\n", s(&m["lastError"]), s(e))),
        }
        if let Some(p) = m["restartPending"].as_array().filter(|p| !p.is_empty()) {
            let names: Vec<String> = p.iter().map(s).collect();
            out.push_str(&format!("  changed, takes effect at restart: {}\n", names.join(", ")));
        }
    }
    match v.get("trafficPolicy").filter(|t| !t.is_null()) {
        Some(t) if t["inForce"] == true => out.push_str(&format!(
            "Policy in force: TrafficPolicy {} (resourceVersion {})\n",
            s(&t["object"]),
            s(&t["resourceVersion"])
        )),
        Some(t) => out.push_str(&format!(
            "Policy in force: the mesh config's traffic: (TrafficPolicy {} absent or never valid)\n",
            s(&t["object"])
        )),
        None => out.push_str("Policy in force: the mesh config's traffic:\n"),
    }
    if let Some(t) = v.get("trafficPolicy").filter(|t| !t.is_null()) {
        for (what, e) in [("REFUSED", &t["error"]), ("NOT WATCHED", &t["watchError"])] {
            if !e.is_null() {
                out.push_str(&format!("  {what}: {}\n", s(e)));
            }
        }
    }
    let drains = v["drains"].as_array().cloned().unwrap_or_default();
    out.push_str("Drains:\n");
    if drains.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut rows =
            vec![["TARGET", "CAPACITY", "NOW", "RAMP", "START", "EXPIRES", "REASON"].map(String::from).to_vec()];
        for d in &drains {
            let now = if d["expired"].as_bool() == Some(true) {
                "expired".into()
            } else {
                format!("{}%", s(&d["capacityNow"]))
            };
            rows.push(vec![
                s(&d["target"]),
                format!("{}%", s(&d["capacity"])),
                now,
                s(&d["ramp"]),
                s(&d["start"]),
                s(&d["expires"]),
                s(&d["reason"]),
            ]);
        }
        out.push_str(&table(&rows));
    }
    if let Some(drills) = v["drills"].as_array().filter(|d| !d.is_empty()) {
        out.push_str("Drills:\n");
        let mut rows = vec![["DRILL", "STATE", "STEPS", "LAST STEP", "ALL ACKED"].map(String::from).to_vec()];
        for d in drills {
            let state = if !d["aborted"].is_null() {
                format!("aborted at {}: {}", s(&d["aborted"]["at"]), s(&d["aborted"]["reason"]))
            } else if !d["ended"].is_null() {
                format!("ended ({})", s(&d["ended"]["how"]))
            } else {
                "in progress".into()
            };
            let steps = d["stepAcks"].as_array().cloned().unwrap_or_default();
            let last = steps.last();
            let acked = match last.map(|l| &l["acks"]) {
                None | Some(Value::Null) => "-".to_string(),
                Some(a) if !a["allAckedAt"].is_null() => s(&a["allAckedAt"]),
                Some(a) => format!("{} pending", a["pending"].as_array().map_or(0, Vec::len)),
            };
            rows.push(vec![
                s(&d["key"]),
                state,
                steps.len().to_string(),
                last.map_or("-".into(), |l| format!("{}%", s(&l["capacity"]))),
                acked,
            ]);
        }
        out.push_str(&table(&rows));
    }
    out.push_str("Decisions:\n");
    let services = v["decisions"]["services"].as_object().cloned().unwrap_or_default();
    if services.is_empty() {
        out.push_str("  no service is covered by a traffic policy\n");
    } else {
        let mut rows =
            vec![["SERVICE", "SOURCE REGION", "CLUSTER", "SHARE", "SPLIT", "WHY"].map(String::from).to_vec()];
        for (host, d) in &services {
            for (region, shares) in d["byRegion"].as_object().into_iter().flatten() {
                for (cluster, share) in shares.as_object().into_iter().flatten() {
                    rows.push(vec![
                        host.clone(),
                        region.clone(),
                        cluster.clone(),
                        pct(&share["share"]),
                        format!("{}%", s(&share["split"])),
                        s(&share["reason"]),
                    ]);
                }
            }
        }
        out.push_str(&table(&rows));
        for (host, d) in &services {
            for n in d["notes"].as_array().into_iter().flatten() {
                out.push_str(&format!("  note ({host}): {}\n", s(n)));
            }
        }
    }
    for (host, clusters) in v["status"]["failover"].as_object().into_iter().flatten() {
        for (cluster, f) in clusters.as_object().into_iter().flatten() {
            out.push_str(&format!("Failed over: {host} in {cluster} since {}\n", s(&f["since"])));
        }
    }
    if let Some(u) = v["unknownClusters"].as_array().filter(|u| !u.is_empty()) {
        let names: Vec<String> = u.iter().map(s).collect();
        out.push_str(&format!("Clusters the policy names that meshfed does not know: {}\n", names.join(", ")));
    }
    out.push_str(&format!("Next change by itself: {}\n", s(&v["status"]["nextChange"])));
    out
}

/// `/debug/whatif`, as a table of each cluster's share now and under the hypothesis.
pub fn format_whatif(v: &Value) -> String {
    let mut out = format!(
        "{} ({}) from region {:?}, network {:?}\n",
        s(&v["host"]),
        s(&v["cluster"]),
        s(&v["sourceRegion"]),
        s(&v["network"])
    );
    let hypothesis = v.get("hypothesis").filter(|h| !h.is_null());
    if let Some(h) = hypothesis {
        out.push_str(&format!("What if: {}\n", s(h)));
    }
    let now = &v["now"]["byCluster"];
    let then = &v["whatIf"]["byCluster"];
    let mut clusters: std::collections::BTreeSet<String> =
        now.as_object().into_iter().flatten().map(|(k, _)| k.clone()).collect();
    clusters.extend(then.as_object().into_iter().flatten().map(|(k, _)| k.clone()));
    let mut header = vec!["CLUSTER".to_string(), "NOW".into()];
    if hypothesis.is_some() {
        header.push("WHAT IF".into());
    }
    header.push("WHY (NOW)".into());
    let mut rows = vec![header];
    for c in &clusters {
        let mut row = vec![c.clone(), pct(&now[c])];
        if hypothesis.is_some() {
            row.push(pct(&then[c]));
        }
        row.push(s(&v["now"]["decision"][c]["reason"]));
        rows.push(row);
    }
    out.push_str(&table(&rows));
    out.push_str("Localities (now):\n");
    let mut rows = vec![["LOCALITY", "PRIORITY", "WEIGHT", "SHARE"].map(String::from).to_vec()];
    for l in v["now"]["localities"].as_array().into_iter().flatten() {
        rows.push(vec![s(&l["locality"]), s(&l["priority"]), s(&l["weight"]), pct(&l["share"])]);
    }
    out.push_str(&table(&rows));
    for n in v["notes"].as_array().into_iter().flatten() {
        out.push_str(&format!("note: {}\n", s(n)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_show_what_the_debug_pages_say() {
        let status = json!({
            "meshConfig": {"path": "/etc/mesh.yaml", "error": "mesh config /etc/mesh.yaml: traffic.policies[0].split.r1: the shares add up to 90, not 100", "lastError": "2026-12-05T00:00:00Z", "restartPending": ["clusters"]},
            "drains": [{"target": "cluster azure", "capacity": 0, "capacityNow": 50, "ramp": "-25% every 30s", "start": "2026-12-05T00:00:00Z", "expires": "2026-12-05T02:00:00Z", "expired": false, "reason": "DR drill"}],
            "decisions": {"services": {"ratings.shop": {"byRegion": {"r1": {"aws": {"share": 85.0, "split": 70, "reason": "split"}, "azure": {"share": 15.0, "split": 30, "reason": "drain 50%"}}}, "notes": []}}},
            "status": {"failover": {}, "nextChange": "2026-12-05T00:00:30Z"},
            "unknownClusters": ["gke"],
            "trafficPolicy": {"object": "aws-use1/istio-system/default", "inForce": true, "resourceVersion": "42", "error": null, "watchError": "watching: connection refused"},
            "drills": [{"key": "cluster azure @ 2026-12-05T00:00:00Z", "aborted": {"at": "2026-12-05T00:01:00Z", "reason": "aws below 50%"}, "stepAcks": [{"capacity": 50, "acks": {"allAckedAt": "2026-12-05T00:00:01Z", "proxies": 2, "pending": []}}, {"capacity": 100, "acks": {"allAckedAt": null, "proxies": 2, "pending": ["a.shop"]}}]}],
        });
        let text = format_status(&status);
        for words in [
            "Policy in force: TrafficPolicy aws-use1/istio-system/default (resourceVersion 42)",
            "NOT WATCHED: watching: connection refused",
            "cluster azure @ 2026-12-05T00:00:00Z",
            "aborted at 2026-12-05T00:01:00Z: aws below 50%",
            "1 pending",
            "LAST EDIT REFUSED",
            "shares add up to 90",
            "takes effect at restart: clusters",
            "cluster azure",
            "50%",
            "DR drill",
            "ratings.shop",
            "85.0%",
            "drain 50%",
            "does not know: gke",
            "2026-12-05T00:00:30Z",
        ] {
            assert!(text.contains(words), "{words}:\n{text}");
        }
        let whatif = json!({
            "host": "ratings.shop", "cluster": "outbound|9080||ratings.shop", "sourceRegion": "r1", "network": "n1",
            "hypothesis": "drain azure",
            "now": {"byCluster": {"aws": 70.0, "azure": 30.0}, "localities": [{"locality": "r1/z1", "priority": 0, "weight": 70, "share": 70.0}], "decision": {"aws": {"reason": "split"}}},
            "whatIf": {"byCluster": {"aws": 100.0, "azure": 0.0}},
            "notes": ["n"],
        });
        let text = format_whatif(&whatif);
        let azure = text.lines().find(|l| l.trim_start().starts_with("azure")).unwrap();
        assert!(azure.contains("30.0%") && azure.contains("0.0%"), "{text}");
        assert!(text.contains("What if: drain azure") && text.contains("r1/z1"), "{text}");
        assert_eq!(encode("sidecar~1.2.3.4~a.b"), "sidecar~1.2.3.4~a.b");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
