//! The eBPF object embedded in imds-proxy was built from source by `cargo build` and the running
//! kernel's verifier accepts its programs.
use aya::programs::CgroupSockAddr;

#[test]
fn embedded_programs_load_into_the_kernel() {
    use aya::programs::Program;
    let mut bpf = imds_proxy::redirect::load().expect("the embedded object parses");
    let mut loaded = Vec::new();
    for (name, program) in bpf.programs_mut() {
        let result = match program {
            Program::CgroupSockAddr(p) => p.load(),
            Program::SockOps(p) => p.load(),
            Program::CgroupSkb(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            other => panic!("{name}: a program type the proxy does not attach: {other:?}"),
        };
        result.unwrap_or_else(|e| panic!("the verifier refuses {name}: {e:?}"));
        loaded.push(name.to_owned());
    }
    loaded.sort();
    // Every program the proxy attaches, the PID-namespace wall's compat twins included.
    let mut expected: Vec<&str> = imds_proxy::redirect::cgroup::PROGRAMS.to_vec();
    expected.extend([
        imds_common::PROG_CONNECT4_COMPAT,
        imds_common::PROG_CONNECT6_COMPAT,
        "imds_tc_ingress",
        "imds_tc_egress",
        "imds_tc_source_guard",
        "imds_tc_forward_guard",
        "imds_tc_reply_guard",
        "imds_tc_routed_ingress",
        "imds_tc_routed_egress",
    ]);
    expected.sort();
    assert_eq!(loaded, expected);
    let program: &CgroupSockAddr = bpf
        .program("imds_connect4")
        .expect("imds_connect4 is in the object")
        .try_into()
        .expect("it is a cgroup/sock_addr program");
    assert!(
        program.info().is_ok(),
        "the kernel lists the loaded program"
    );
}

/// Nothing the kernel keeps per connection grows without bound, even with the proxy gone: the
/// record maps and the NAT table are LRU hashes of a fixed size (the oldest entry goes when full).
#[test]
fn per_connection_maps_are_bounded_lru_hashes() {
    use aya::maps::Map;
    use imds_common::{MAP_CONNS, MAP_NAT, MAP_PENDING, MAX_CONNS, MAX_NAT};
    let bpf = imds_proxy::redirect::load().expect("the embedded object parses");
    for (name, capacity) in [
        (MAP_PENDING, MAX_CONNS),
        (MAP_CONNS, MAX_CONNS),
        (MAP_NAT, MAX_NAT),
    ] {
        let map = bpf
            .map(name)
            .unwrap_or_else(|| panic!("{name} is in the object"));
        let Map::LruHashMap(data) = map else {
            panic!("{name} is not an LRU hash: {map:?}");
        };
        let info = data.info().expect("the kernel describes the map");
        assert_eq!(info.max_entries(), capacity, "{name}");
    }
}
