//! Test support for imds-proxy: the simulated EC2 host, images, HTTP client and fault injector come from
//! [`ec2sim`] (re-exported here); hand-made containers ([`kernel`]), Docker containers
//! ([`containers`]) and the proxy binary under test ([`proxy`]) are the tests' own.
pub mod containers;
pub mod cri;
pub mod kernel;
pub mod podman;
pub mod proxy;

pub use ec2sim::{faults, http, images, scene, sim};
