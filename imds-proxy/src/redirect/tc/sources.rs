//! tc mode: which source addresses each container port (the host side of a container's veth, by
//! interface index) may send to IMDS from — the contents of `IMDS_TC_SOURCES`, decided here
//! without touching the kernel so the rules are unit-tested.
//!
//! Two kinds of entry:
//! - **owned**: Docker's record of a running container's addresses on its ports, and the
//!   operator's `--tc-static-source`. Authoritative; kept until the owner says otherwise.
//! - **provisional**: an address the kernel reports configured inside the network namespace
//!   behind a port, before Docker has said whose the port is. Docker configures a container's
//!   interface before it starts its first process and only reports the container after: without
//!   these entries the container's first SYN to IMDS is dropped and the client waits a TCP
//!   retransmission (one second, as long as the SDKs' IMDS timeout). They are refused for a port
//!   Docker already vouched for (after start, what the container itself adds does not count) and
//!   for an address owned on any other port (nobody's running neighbour can be claimed), removed
//!   once Docker vouches for the port or the address, and expire after [`PROVISIONAL_TTL`].
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

/// A port (host-side interface index) and an address that may be sent from behind it.
pub type Source = (u32, IpAddr);

/// Provisional entries live this long at most: Docker reports a started container well within.
pub const PROVISIONAL_TTL: Duration = Duration::from_secs(10);

/// Why an observed address was not taken as a provisional source.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("Docker already vouched for this port's addresses")]
    PortVouched,
    #[error("the address is another port's")]
    OwnedElsewhere,
}

#[derive(Default)]
pub struct SourceBook {
    /// By owner: a container id, or `static:<interface>`.
    owned: HashMap<String, Vec<Source>>,
    provisional: HashMap<Source, Instant>,
}

impl SourceBook {
    /// Whether packets from `source` are vouched for.
    pub fn vouched(&self, source: Source) -> bool {
        self.provisional.contains_key(&source) || self.owned.values().any(|s| s.contains(&source))
    }

    /// `owner`'s sources are now `sources` (empty: it has none). Provisional entries on its ports
    /// and for its addresses anywhere are dropped. Returns the sources whose state may have
    /// changed: apply [`SourceBook::vouched`] of each to the map.
    pub fn set(&mut self, owner: &str, sources: Vec<Source>) -> BTreeSet<Source> {
        let mut touched: BTreeSet<Source> = self
            .owned
            .remove(owner)
            .unwrap_or_default()
            .into_iter()
            .collect();
        touched.extend(sources.iter().copied());
        touched.extend(self.drop_provisional(|(port, addr), _| {
            sources.iter().any(|&(p, a)| p == port || a == addr)
        }));
        if !sources.is_empty() {
            self.owned.insert(owner.to_owned(), sources);
        }
        touched
    }

    /// The kernel reports `addr` configured behind `port`, at `now`.
    pub fn observe(
        &mut self,
        (port, addr): Source,
        now: Instant,
    ) -> Result<BTreeSet<Source>, Refusal> {
        let owned = || self.owned.values().flatten();
        if owned().any(|&(p, _)| p == port) {
            return Err(Refusal::PortVouched);
        }
        if owned().any(|&(p, a)| a == addr && p != port) {
            return Err(Refusal::OwnedElsewhere);
        }
        self.provisional.insert((port, addr), now);
        Ok(BTreeSet::from([(port, addr)]))
    }

    /// The kernel reports `addr` removed from behind `port`.
    pub fn unobserve(&mut self, source: Source) -> BTreeSet<Source> {
        self.provisional.remove(&source);
        BTreeSet::from([source])
    }

    /// `port` is gone: nothing can be sent from behind it, and its index may come back as another
    /// interface's. All its entries go, owned and provisional.
    pub fn port_gone(&mut self, port: u32) -> BTreeSet<Source> {
        let mut touched = BTreeSet::new();
        for sources in self.owned.values_mut() {
            sources.retain(|&(p, a)| {
                let keep = p != port;
                if !keep {
                    touched.insert((p, a));
                }
                keep
            });
        }
        self.owned.retain(|_, sources| !sources.is_empty());
        touched.extend(self.drop_provisional(|(p, _), _| p == port));
        touched
    }

    /// Drop provisional entries older than [`PROVISIONAL_TTL`] at `now`.
    pub fn expire(&mut self, now: Instant) -> BTreeSet<Source> {
        self.drop_provisional(|_, since| now.saturating_duration_since(since) >= PROVISIONAL_TTL)
    }

    /// Drop the provisional entries `gone` says (by source and when it was seen); those dropped.
    fn drop_provisional(&mut self, gone: impl Fn(Source, Instant) -> bool) -> BTreeSet<Source> {
        let mut dropped = BTreeSet::new();
        self.provisional.retain(|&source, &mut since| {
            let keep = !gone(source, since);
            if !keep {
                dropped.insert(source);
            }
            keep
        });
        dropped
    }

    /// Provisional entries now.
    pub fn provisional(&self) -> usize {
        self.provisional.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_seen_before_docker_is_vouched_until_docker_says() {
        let mut book = SourceBook::default();
        let t = Instant::now();
        book.observe((7, ip("172.17.0.2")), t).unwrap();
        assert!(book.vouched((7, ip("172.17.0.2"))));
        // Docker's record replaces it (here with the same address, plus IPv6).
        let touched = book.set("c1", vec![(7, ip("172.17.0.2")), (7, ip("fd00::2"))]);
        assert!(touched.contains(&(7, ip("172.17.0.2"))));
        assert_eq!(book.provisional(), 0);
        assert!(book.vouched((7, ip("172.17.0.2"))) && book.vouched((7, ip("fd00::2"))));
        // Later additions inside the container do not count.
        assert_eq!(
            book.observe((7, ip("172.17.0.9")), t),
            Err(Refusal::PortVouched)
        );
        assert!(!book.vouched((7, ip("172.17.0.9"))));
    }

    #[test]
    fn a_running_neighbours_address_cannot_be_claimed() {
        let mut book = SourceBook::default();
        let t = Instant::now();
        book.set("neighbour", vec![(3, ip("172.17.0.2"))]);
        assert_eq!(
            book.observe((9, ip("172.17.0.2")), t),
            Err(Refusal::OwnedElsewhere)
        );
        assert!(!book.vouched((9, ip("172.17.0.2"))));
        // A static source counts as owned too.
        book.set("static:ns1h", vec![(4, ip("10.0.0.2"))]);
        assert_eq!(
            book.observe((9, ip("10.0.0.2")), t),
            Err(Refusal::OwnedElsewhere)
        );
    }

    #[test]
    fn docker_vouching_an_address_elsewhere_ends_a_provisional_claim_on_it() {
        let mut book = SourceBook::default();
        let t = Instant::now();
        book.observe((9, ip("172.17.0.5")), t).unwrap();
        let touched = book.set("c5", vec![(5, ip("172.17.0.5"))]);
        assert!(touched.contains(&(9, ip("172.17.0.5"))));
        assert!(!book.vouched((9, ip("172.17.0.5"))));
        assert!(book.vouched((5, ip("172.17.0.5"))));
    }

    #[test]
    fn provisional_entries_expire_and_go_with_their_port_or_address() {
        let mut book = SourceBook::default();
        let t = Instant::now();
        book.observe((1, ip("10.1.0.2")), t).unwrap();
        book.observe((2, ip("10.2.0.2")), t + Duration::from_secs(5))
            .unwrap();
        book.observe((3, ip("10.3.0.2")), t).unwrap();
        let expired = book.expire(t + PROVISIONAL_TTL);
        assert_eq!(
            expired,
            BTreeSet::from([(1, ip("10.1.0.2")), (3, ip("10.3.0.2"))])
        );
        assert!(book.vouched((2, ip("10.2.0.2"))));
        book.port_gone(2);
        assert!(!book.vouched((2, ip("10.2.0.2"))));
        // A stopped container's port goes before Docker forgets it; its address is free for the
        // next container at once, and its index vouches for nothing.
        book.set("old", vec![(8, ip("172.17.0.2")), (10, ip("172.18.0.2"))]);
        book.port_gone(8);
        assert!(!book.vouched((8, ip("172.17.0.2"))));
        assert!(book.vouched((10, ip("172.18.0.2"))));
        book.observe((11, ip("172.17.0.2")), t).unwrap();
        book.observe((4, ip("10.4.0.2")), t).unwrap();
        book.unobserve((4, ip("10.4.0.2")));
        assert!(!book.vouched((4, ip("10.4.0.2"))));
    }

    #[test]
    fn an_entry_shared_by_two_owners_stays_until_both_let_go() {
        let mut book = SourceBook::default();
        book.set("static:vm1h", vec![(6, ip("10.6.0.2"))]);
        book.set("c6", vec![(6, ip("10.6.0.2"))]);
        let touched = book.set("c6", vec![]);
        assert!(touched.contains(&(6, ip("10.6.0.2"))));
        assert!(
            book.vouched((6, ip("10.6.0.2"))),
            "the static owner still holds it"
        );
        book.set("static:vm1h", vec![]);
        assert!(!book.vouched((6, ip("10.6.0.2"))));
    }
}
