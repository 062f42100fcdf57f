//! Rebuild the programs when bpf-linker changes (a new LLVM means new code generation).
use which::which;

fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (it installs bpf-linker built against the nightly's LLVM)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
