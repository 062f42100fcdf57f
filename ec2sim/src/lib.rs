//! The simulated EC2 host the tests, `cargo xtask run` and `cargo xtask bench` stand on: an IMDS
//! simulator ([`sim`]) in a network namespace of its own that 169.254.169.254 and fd00:ec2::254
//! are routed to, an STS peer (moto), the scene that sets it all up and takes it down
//! ([`scene`]), locally built container images and the Docker daemon ([`images`]), a
//! byte-exact HTTP client ([`http`]), a fault injector to put between the proxy and a peer
//! ([`faults`]), and the one launcher of the proxy under test ([`launch`]). No dependency on the
//! proxy: xtask builds on it before the eBPF toolchain is installed.
pub mod faults;
pub mod http;
pub mod images;
pub mod launch;
pub mod scene;
pub mod sim;
