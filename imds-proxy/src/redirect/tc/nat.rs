//! The NAT table's reaper, on the clock the kernel programs stamp entries with.
use super::*;

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
/// Remove the entries of a NAT map idle for longer than `idle` at `now_ns` (`CLOCK_MONOTONIC`,
/// the clock of `bpf_ktime_get_ns`); how many.
pub fn reap_idle<T: std::borrow::BorrowMut<MapData>>(
    nat: &mut HashMap<T, ConnKey, NatEntry>,
    now_ns: u64,
    idle: Duration,
) -> usize {
    let stale: Vec<ConnKey> = nat
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, entry)| now_ns.saturating_sub(entry.last_seen_ns) > idle.as_nanos() as u64)
        .map(|(key, _)| key)
        .collect();
    stale.iter().filter(|key| nat.remove(key).is_ok()).count()
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}
