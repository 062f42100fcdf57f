//! Loading the kernel programs built from `imds-ebpf`.

/// The eBPF object built from `imds-ebpf` by build.rs, embedded at compile time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imds-ebpf"));

/// Parse the embedded object and load its programs into the kernel (without attaching them).
pub fn load() -> Result<aya::Ebpf, aya::EbpfError> {
    aya::Ebpf::load(OBJECT)
}
