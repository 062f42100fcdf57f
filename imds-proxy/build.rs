//! Builds the kernel programs (`imds-ebpf`) for the BPF target and leaves the object in OUT_DIR,
//! from where `src/redirect/object.rs` embeds it in the binary. Needs the nightly toolchain with
//! rust-src and bpf-linker: `cargo xtask setup` installs both.
//!
//! `IMDS_EBPF_OBJECT=<path>`: take that object instead of building one. `cargo xtask test` sets it
//! to the object its first build made, so that the later builds of the same run (unit tests, the
//! debug and the static binary) do not each compile the programs and `core` for BPF again.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=IMDS_EBPF_OBJECT");
    if let Some(prebuilt) = std::env::var_os("IMDS_EBPF_OBJECT") {
        let prebuilt = std::path::PathBuf::from(prebuilt);
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
        let target = out.join("imds-ebpf");
        let err =
            |err: std::io::Error| anyhow::anyhow!("IMDS_EBPF_OBJECT={}: {err}", prebuilt.display());
        // The object may be this very OUT_DIR's (a check and a build share a build script's
        // run): copying a file onto itself would empty it.
        if std::fs::canonicalize(&target).ok()
            != Some(std::fs::canonicalize(&prebuilt).map_err(err)?)
        {
            std::fs::copy(&prebuilt, &target).map_err(err)?;
        }
        return Ok(());
    }
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
