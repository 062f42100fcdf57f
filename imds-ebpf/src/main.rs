//! Kernel programs of imds-proxy.
//!
//! Placeholder for the foundation: a `cgroup/connect4` program that lets every connect through
//! unchanged. The redirect programs replace it in cgroup mode.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

    /// Verdict of a `cgroup/connect*` program that lets the connect proceed.
    const ALLOW: i32 = 1;

    #[cgroup_sock_addr(connect4)]
    pub fn imds_connect4(_ctx: SockAddrContext) -> i32 {
        // Placeholder: never rewrite, never refuse.
        ALLOW
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // The verifier rejects any program that could reach here; there is nothing to unwind to.
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// On the host (clippy, `cargo test --workspace`) this crate is an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
