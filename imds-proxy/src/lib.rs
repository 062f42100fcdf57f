//! imds-proxy: per-container IAM credentials on EC2 hosts.
//!
//! One module per concern; [`daemon`] wires them together for `imds-proxy run`. A request's path:
//! [`serve`] accepts, [`identity`] decides who is calling (the kernel's record from
//! [`redirect`], or the source address), [`imds`] routes it, [`roles`] names the role and
//! [`credentials`] assumes it.
//!
//! The public modules are what the binary and the integration tests use: the configuration, the
//! daemon, and the kernel-facing parts the tests drive directly (the redirect, cgroups, the
//! attestor and the Docker index it asks, the listen interface). The HTTP service is reached
//! through the binary only.
pub mod cgroup;
pub mod config;
pub(crate) mod credentials;
pub mod daemon;
pub mod explain;
pub mod gate;
pub mod identity;
pub(crate) mod imds;
pub(crate) mod metrics;
pub mod netdev;
pub(crate) mod notify;
pub(crate) mod ops;
pub mod process;
pub mod redirect;
pub mod runtime;
pub(crate) mod serve;
pub mod supervisor;
pub(crate) mod upstream;

pub use imds_policy::roles;
pub(crate) use imds_policy::{limits, tokens};
