//! Measurements of imds-proxy, outside the test suite: `cargo xtask bench` ([`bench`]: the cost
//! of the proxy and of each redirect, under load and with many containers → docs/benchmarks.md)
//! and `cargo xtask soak` ([`soak`]: mixed load, then its peers' faults → docs/reliability.md).
//! xtask sets the machine up and builds the release binaries, then calls these with their
//! directory. Nothing here asserts a time.
pub mod bench;
pub mod process;
pub mod soak;
