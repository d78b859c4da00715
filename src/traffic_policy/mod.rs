//! The traffic policy in force, where it comes from and who changes it — the moving parts around the
//! pure model and decisions of [`crate::traffic`]:
//!
//! - [`owner`]: which policy the push loop gets, the mesh config file's `traffic:` or the `TrafficPolicy`
//!   custom resource;
//! - [`watch`]: the custom resource's watch (every replica reads one object);
//! - [`edit`], [`kube_edit`]: the drain edits of `meshfed traffic drain | undrain | drill`, in the file
//!   or in the object; [`cli`] and [`client`] (the commands, and `status`/`whatif` through a running
//!   meshfed's debug server);
//! - [`abort_record`]: the drill aborts meshfed writes back into the object.
//!
//! Data flows one way through the push loop: these hand it policies; only [`abort_record`] reads its
//! published state, to write to the Kubernetes API (the watch brings the record back like any edit).

pub mod abort_record;
pub mod cli;
pub mod client;
pub mod edit;
pub mod kube_edit;
pub mod owner;
pub mod watch;
