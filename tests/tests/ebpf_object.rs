//! The eBPF object embedded in imds-proxy was built from source by `cargo build` and the running
//! kernel's verifier accepts its programs.
use aya::programs::CgroupSockAddr;

#[test]
fn embedded_programs_load_into_the_kernel() {
    let mut bpf = imds_proxy::redirect::load().expect("the embedded object parses");
    let names: Vec<String> = bpf.programs().map(|(name, _)| name.to_owned()).collect();
    assert!(!names.is_empty(), "the object has programs");
    let program: &mut CgroupSockAddr = bpf
        .program_mut("imds_connect4")
        .expect("imds_connect4 is in the object")
        .try_into()
        .expect("it is a cgroup/sock_addr program");
    program.load().expect("the verifier accepts imds_connect4");
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
