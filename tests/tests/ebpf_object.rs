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
