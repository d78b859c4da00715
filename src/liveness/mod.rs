//! Data-plane evidence about each network: meshfed probes every network's east-west gateway addresses
//! ([`probe`]) and keeps per-address evidence with hysteresis ([`evidence`], pure). The verdict — which
//! gateway addresses are down, which networks are fenced (all their gateway addresses down) — goes to the
//! push loop as translation context: a fenced network's endpoints become last resort for proxies on other
//! networks, a down address leaves its network's gateway list, and an API server that does not answer no
//! longer demotes a cluster whose network has gateways to probe (their evidence decides instead).

pub mod evidence;
pub mod probe;

pub use evidence::{Evidence, Verdict};
pub use probe::Report;
