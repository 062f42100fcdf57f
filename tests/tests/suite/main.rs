//! Every integration and end-to-end test of imds-proxy, in one test binary (one link, not one per
//! suite): a module per suite, so a test is named `<suite>::<test>` (`attacks::…`, `faults::…`),
//! as `tests/README.md` names them. They share the machine (routes, cgroups, bpffs pins, the
//! Docker engine): `cargo xtask test` runs them one at a time (cargo-nextest,
//! `.config/nextest.toml`).
mod attacks;
mod cgroup_mode;
mod cri;
mod daemonset;
mod e2e;
mod ebpf_object;
mod faults;
mod hop_limit;
mod manifests;
mod podman;
mod proxy;
mod scene;
mod simulator;
mod tc_mode;
mod tc_packets;
