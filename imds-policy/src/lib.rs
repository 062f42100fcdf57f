//! imds-proxy's rules that depend on nothing but their input: which paths a container may ask
//! for, which role it names, its session tags, its IMDSv2 tokens, rate limits. No I/O, no clock
//! of their own (time is passed in), so they are unit-tested and fuzzed in isolation (`fuzz/`).
pub mod cgroups;
pub mod limits;
pub mod paths;
pub mod quiet;
pub mod roles;
pub mod tags;
pub mod tokens;
