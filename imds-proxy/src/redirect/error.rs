//! What can go wrong attaching, pinning and reading the kernel programs, for both modes. A leaf of
//! the redirect module: the object loader, the pins and both modes return it.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("pin directory {path}: {reason}")]
    PinDir { path: PathBuf, reason: String },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("link of program {name}: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("updating pinned link {path} to this build's program: {source}")]
    Update {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("adopting pinned link {path}: {source}")]
    Adopt {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
