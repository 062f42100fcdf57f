//! Builds the kernel programs (`imds-ebpf`) for the BPF target and leaves the object in OUT_DIR,
//! from where `src/ebpf.rs` embeds it in the binary. Needs the nightly toolchain with rust-src and
//! bpf-linker: `cargo xtask setup` installs both.
fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../imds-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "imds-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
