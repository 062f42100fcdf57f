//! Empty library target: it lets `imds-proxy` name this crate as a build-dependency, so cargo
//! rebuilds the eBPF object when the programs' dependencies change. The programs are the binary.
#![no_std]
