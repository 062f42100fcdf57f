//! imds-proxy: per-container IAM credentials on EC2 hosts.
//!
//! One module per concern; the binary in `main.rs` wires them together.
pub mod config;
pub mod credentials;
pub mod docker;
pub mod ebpf;
pub mod filter;
pub mod identity;
pub mod imds;
pub mod metrics;
pub mod netdev;
pub mod ops;
pub mod peer_addresses;
pub mod serve;
pub mod sources;
pub mod tc;
pub mod upstream;

pub use imds_policy::{limits, paths, roles, tokens};
