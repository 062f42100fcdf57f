//! Types shared by the kernel programs (`imds-ebpf`) and userspace (`imds-proxy`).
//!
//! Everything here is `no_std`, `#[repr(C)]` and free of padding surprises, because the same bytes
//! are written by one side of a BPF map and read by the other.
#![no_std]

/// The IPv4 address of the EC2 instance metadata service, 169.254.169.254, in host byte order.
pub const IMDS_V4: u32 = u32::from_be_bytes([169, 254, 169, 254]);

/// The IPv6 address of the EC2 instance metadata service, fd00:ec2::254.
pub const IMDS_V6: [u8; 16] = [
    0xfd, 0x00, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
];

/// The TCP port of the instance metadata service.
pub const IMDS_PORT: u16 = 80;

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn imds_addresses_match_their_text_form() {
        assert_eq!(
            Ipv4Addr::from(IMDS_V4),
            "169.254.169.254".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(
            Ipv6Addr::from(IMDS_V6),
            "fd00:ec2::254".parse::<Ipv6Addr>().unwrap()
        );
    }
}
