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
pub mod limits;
pub mod metrics;
pub mod netdev;
pub mod roles;
pub mod serve;
pub mod tc;
pub mod tokens;
pub mod upstream;
