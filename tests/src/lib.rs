//! Test support for imds-proxy: the simulated EC2 host ([`scene`], [`sim`]), locally built
//! container images ([`images`]) and a byte-exact HTTP client ([`http`]).
pub mod containers;
pub mod http;
pub mod images;
pub mod kernel;
pub mod proxy;
pub mod scene;
pub mod sim;
