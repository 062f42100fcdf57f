//! Test support for imds-proxy: the simulated EC2 host, images and HTTP client come from
//! [`ec2sim`] (re-exported here); hand-made containers ([`kernel`]), a fault injector ([`faults`]), Docker containers
//! ([`containers`]) and the proxy binary under test ([`proxy`]) are the tests' own.
pub mod containers;
pub mod faults;
pub mod kernel;
pub mod proxy;

pub use ec2sim::{http, images, scene, sim};
