//! Kernel programs of imds-proxy: `cgroup.rs` (cgroup mode), `tc.rs` (tc mode).
//!
//! A container's TCP connect to the instance metadata service (169.254.169.254:80 or
//! [fd00:ec2::254]:80) is rewritten, at connect time, to the proxy's dedicated listen address, and
//! the kernel records which cgroup (so which container) made it:
//!
//! 1. `imds_connect4` / `imds_connect6` (cgroup/connect4, cgroup/connect6): rewrite the
//!    destination and store a [`ConnRecord`] under the socket's cookie in `IMDS_PENDING`.
//! 2. `imds_sock_ops` (sockops): when that socket is established, move the record to `IMDS_CONNS`
//!    under the client's (address, port) — what the proxy sees as its accepted peer. When the
//!    socket closes, drop whatever is left of its records.
//! 3. `imds_getpeername4` / `imds_getpeername6`: the client sees 169.254.169.254:80 as its peer.
//! 4. `imds_egress_guard` (cgroup_skb/egress): the backstop. Any packet a container's socket
//!    sends to an IMDS address is dropped: every legitimate connection was rewritten at connect
//!    time, so what still carries the IMDS address on the wire went around the connect hooks (a
//!    raw socket, UDP, an address form not rewritten). It is never passed on.
//!
//! Address forms: an AF_INET6 socket reaches IPv4 through v4-mapped addresses
//! (`::ffff:169.254.169.254`), and only connect6 runs for it (dual-stack clients such as the JVM
//! do exactly this). connect6 rewrites it to the IPv4 listen address in v4-mapped form; the
//! connection is IPv4 on the wire, so its record is keyed and read as IPv4.
//!
//! The proxy takes (reads and deletes) the record of each connection it accepts. Both record maps
//! are LRU-bounded, so nothing grows without bound even if the proxy is gone.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

/// cgroup mode's programs (socket hooks); tc mode attaches them too, for host-network containers.
#[cfg(target_arch = "bpf")]
mod cgroup;
/// tc mode's programs (packet rewrite on container interfaces); they share `IMDS_CONFIG`.
#[cfg(target_arch = "bpf")]
mod tc;

#[cfg(target_arch = "bpf")]
mod runtime {
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
