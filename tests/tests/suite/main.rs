//! Every integration and end-to-end test of imds-proxy, in one test binary (one link, not one per
//! suite): a module per suite, so a test is named `<suite>::<test>` (`attacks::…`, `faults::…`),
//! as `tests/README.md` names them. They share the machine (routes, cgroups, bpffs pins, the
//! Docker engine): `cargo xtask test` runs them one at a time (cargo-nextest,
//! `.config/nextest.toml`).
use imds_tests::{
    scene::{Scene, SceneConfig},
    sim::HttpTokens,
};

/// The simulated EC2 host most suites stand on: this binary's IMDS simulator, the instance's
/// `HttpTokens` as given, and STS (the run's shared moto, reset for the scene).
fn sim_host_config(tokens: HttpTokens) -> SceneConfig {
    SceneConfig::new(env!("CARGO_BIN_EXE_imds-sim"))
        .http_tokens(tokens)
        .with_sts()
}

/// That host, started: a test cannot go on without it.
fn sim_host(tokens: HttpTokens) -> Scene {
    sim_host_config(tokens)
        .start()
        .expect("the simulated EC2 host starts")
}

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
