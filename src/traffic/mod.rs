//! Traffic control (the mesh config's `traffic:` section): active-active splits of a service's traffic
//! between clusters by source region, failover of a cluster whose healthy endpoints fall below a
//! threshold (and failback after a delay), and drains that ramp a cluster's share down.
//!
//! - [`policy`]: the `traffic:` model and its validation against the mesh's clusters;
//! - [`decide`]: pure: policy, per-cluster health of a service, `now` and the previous failover state ->
//!   the share each cluster gets per source region, why, and when that changes next;
//! - [`lb`]: Envoy's load-balancing math (priority load with the overprovisioning factor, locality
//!   weights times availability), to predict what Envoy does with an assignment (`/debug/whatif`).
//!
//! Translation ([`crate::translate::endpoint`]) turns the decisions into priority-0 locality weights; the
//! push loop ([`crate::push`]) owns the policy and the failover state and re-decides on registry changes
//! and at the next change time.

pub mod decide;
pub mod lb;
pub mod policy;

pub use decide::{Decision, Decisions, FailoverState, ServiceHealth};
pub use policy::TrafficPolicy;
