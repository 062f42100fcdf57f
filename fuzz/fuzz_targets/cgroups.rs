//! Cgroup classification is default-deny whatever the path: no input panics, and a path with a
//! container's marker (an engine's name, a container id) below it is never the host's, even under
//! an operator glob that matches everything.
#![no_main]
use imds_policy::cgroups::{HostCgroups, Owner};
use libfuzzer_sys::fuzz_target;

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fuzz_target!(|path: &str| {
    let plain = HostCgroups::default();
    let everything = HostCgroups::parse(["/*"]).unwrap();
    let _ = plain.classify(path);
    let _ = everything.classify(path);
    let base = path.trim_end_matches('/');
    for marked in [
        format!("{base}/docker-x.scope"),
        format!("{base}/{ID}"),
        format!("{base}/kubepods.slice"),
        format!("{base}/buildkit/x"),
        format!("{base}/lxc.payload.x"),
    ] {
        assert_eq!(plain.classify(&marked), Owner::Container, "{marked:?}");
        assert_eq!(everything.classify(&marked), Owner::Container, "{marked:?}");
    }
});
