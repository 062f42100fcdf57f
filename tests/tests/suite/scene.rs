//! The simulated EC2 host leaves nothing behind: after a clean teardown, after a test that panics
//! with a scene up, and after its owner is killed outright.
use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
};

use imds_tests::{
    http::Request,
    scene::{self, SceneConfig},
};

/// A scene with an STS of its own: these tests check that its moto goes with it.
fn config() -> SceneConfig {
    SceneConfig::new(env!("CARGO_BIN_EXE_imds-sim"))
        .with_sts()
        .own_sts()
}

/// The processes a scene started, so the test can check they are gone.
fn scene_pids(sts: SocketAddr) -> Vec<i32> {
    let mut pids: Vec<i32> = scene::ip(&["netns", "pids", scene::NETNS])
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let moto = std::fs::read_to_string(format!("{}/moto.pid", scene::STATE_DIR)).unwrap();
    pids.push(moto.trim().parse().unwrap());
    assert_eq!(pids.len(), 2, "the simulator and moto, listening on {sts}");
    pids
}

fn assert_gone(pids: &[i32]) {
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived its scene"
        );
    }
}

#[test]
fn teardown_leaves_nothing() {
    let scene = config().start().unwrap();
    let pids = scene_pids(scene.sts_endpoint().unwrap());
    assert_eq!(scene::leftovers().len(), 4 + 1, "{:?}", scene::leftovers());
    drop(scene);
    assert_eq!(scene::leftovers(), Vec::<String>::new());
    assert_gone(&pids);
    // With the scene gone the guard refuses again: the IMDS address is no longer the simulator.
    let refused = scene::ensure_imds_is_simulated().unwrap_err();
    assert!(
        refused.to_string().contains("refusing to talk to"),
        "{refused}"
    );
}

#[test]
fn a_failing_test_still_tears_down() {
    let mut pids = Vec::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let scene = config().start().unwrap();
        pids = scene_pids(scene.sts_endpoint().unwrap());
        let r = Request::get("/latest/meta-data/instance-id")
            .send(scene.imds_v4().unwrap())
            .unwrap();
        assert_eq!(r.status, 999, "this assertion fails on purpose");
    }));
    assert!(outcome.is_err());
    assert_eq!(scene::leftovers(), Vec::<String>::new());
    assert_gone(&pids);
}

#[test]
fn a_killed_owner_is_cleaned_up_by_the_next_scene() {
    let mut holder = Command::new(env!("CARGO_BIN_EXE_imds-scene"))
        .args(["--sts", "--sim-bin", env!("CARGO_BIN_EXE_imds-sim")])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("scene up"), "{first:?}");
    holder.kill().unwrap(); // SIGKILL: no teardown runs
    holder.wait().unwrap();
    let left = scene::leftovers();
    assert!(
        left.iter().any(|l| l.contains("network namespace")),
        "the killed owner left its network: {left:?}"
    );
    let scene = config().start().unwrap();
    scene.imds_v4().unwrap();
    drop(scene);
    assert_eq!(scene::leftovers(), Vec::<String>::new());
}
