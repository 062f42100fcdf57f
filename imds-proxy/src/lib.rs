//! imds-proxy: per-container IAM credentials on EC2 hosts.
//!
//! One module per concern; the binary in `main.rs` wires them together.
pub mod ebpf;
pub mod identity;
pub mod imds;
pub mod netdev;
