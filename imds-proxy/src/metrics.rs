//! Counters for `/metrics`, in the Prometheus text format.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// A counter with one label whose values are fixed strings.
#[derive(Default)]
struct Labelled(Mutex<BTreeMap<&'static str, u64>>);

impl Labelled {
    fn add(&self, value: &'static str) {
        *self
            .0
            .lock()
            .expect("metrics poisoned")
            .entry(value)
            .or_default() += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, label: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (value, n) in self.0.lock().expect("metrics poisoned").iter() {
            let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
        }
    }
}

/// A histogram of durations, in seconds, with fixed buckets.
struct Histogram {
    /// Upper bounds in microseconds, and the count at or below each.
    buckets: Vec<(u64, AtomicU64)>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Bucket bounds for STS calls: 10 ms to 10 s.
const STS_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: STS_BUCKETS
                .iter()
                .map(|s| ((s * 1e6) as u64, AtomicU64::new(0)))
                .collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, took: Duration) {
        let micros = took.as_micros() as u64;
        for (bound, n) in &self.buckets {
            if micros <= *bound {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, n) in &self.buckets {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {}",
                *bound as f64 / 1e6,
                n.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {:.6}\n{name}_count {count}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    vends: AtomicU64,
    /// Of those, the first serve of a session (written to the audit trail).
    vends_first: AtomicU64,
    /// Log lines container input would have caused, kept quiet (summarised with counts).
    log_lines_suppressed: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    sts_calls: AtomicU64,
    sts_errors: Labelled,
    sts_seconds: Histogram,
    sts_answers_pending: AtomicU64,
    containers: AtomicU64,
    refused_connections: Labelled,
    sts_calls_avoided: AtomicU64,
    sts_calls_joined: AtomicU64,
    upstream_errors: Labelled,
    uncovered_containers: AtomicU64,
    container_events: Labelled,
    throttled: Labelled,
    metadata_cache_hits: AtomicU64,
    open_connections: AtomicU64,
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .expect("metrics poisoned")
            .entry((route, status))
            .or_default() += 1;
    }

    /// Credentials served; `first`: the first serve of that session (audited).
    pub fn vend(&self, first: bool) {
        self.vends.fetch_add(1, Ordering::Relaxed);
        if first {
            self.vends_first.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A log line container input would have caused was kept quiet.
    pub fn log_line_suppressed(&self) {
        self.log_lines_suppressed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn cache(&self, hit: bool) {
        let counter = if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// An STS call ended after `took`; `failure`: why it failed, if it did.
    pub fn sts_call(&self, took: Duration, failure: Option<&'static str>) {
        self.sts_calls.fetch_add(1, Ordering::Relaxed);
        if let Some(reason) = failure {
            self.sts_errors.add(reason);
        }
        self.sts_seconds.observe(took);
    }

    /// A request answered 503 because STS had not answered within the budget.
    pub fn sts_answer_pending(&self) {
        self.sts_answers_pending.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sts_calls(&self) -> u64 {
        self.sts_calls.load(Ordering::Relaxed)
    }

    pub fn set_containers(&self, n: usize) {
        self.containers.store(n as u64, Ordering::Relaxed);
    }

    /// A connection closed without being served (`reason`: a cap, a header timeout, an accept
    /// error).
    pub fn refused_connection(&self, reason: &'static str) {
        self.refused_connections.add(reason);
    }

    /// A request answered with an STS failure remembered from a call just before.
    pub fn sts_call_avoided(&self) {
        self.sts_calls_avoided.fetch_add(1, Ordering::Relaxed);
    }

    /// A request that waited for an STS call already under way for its key (single flight).
    pub fn sts_call_joined(&self) {
        self.sts_calls_joined.fetch_add(1, Ordering::Relaxed);
    }

    /// A pass-through the upstream IMDS did not answer (`kind`: timeout, failed).
    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors.add(kind);
    }

    /// A request refused with 429 (`limit`: the caller's own, or the upstream's in all).
    pub fn throttled(&self, limit: &'static str) {
        self.throttled.add(limit);
    }

    /// The index announced a container (`started`) or forgot one (`destroyed`).
    pub fn container_event(&self, event: &'static str) {
        self.container_events.add(event);
    }

    /// A container started whose cgroup is below no attach point.
    pub fn uncovered_container(&self) {
        self.uncovered_containers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn metadata_cache_hit(&self) {
        self.metadata_cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_open_connections(&self, n: usize) {
        self.open_connections.store(n as u64, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP imds_proxy_requests_total IMDS requests by route and status.\n# TYPE imds_proxy_requests_total counter"
        );
        for ((route, status), n) in self.requests.lock().expect("metrics poisoned").iter() {
            let _ = writeln!(
                out,
                "imds_proxy_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            &mut out,
            "imds_proxy_credentials_vended_total",
            "Credential documents served.",
            load(&self.vends),
        );
        let (vends, first) = (load(&self.vends), load(&self.vends_first));
        let _ = writeln!(
            out,
            "# HELP imds_proxy_credentials_served_total Credential documents served, by whether it \
             was the session's first serve (one audit line each) or a repeat (counted only).\n\
             # TYPE imds_proxy_credentials_served_total counter\n\
             imds_proxy_credentials_served_total{{serve=\"first\"}} {first}\n\
             imds_proxy_credentials_served_total{{serve=\"repeat\"}} {}",
            vends.saturating_sub(first)
        );
        counter(
            &mut out,
            "imds_proxy_log_lines_suppressed_total",
            "Log lines containers' requests would have caused, kept quiet: one line per caller and \
             reason a minute, said with the count of the ones kept quiet.",
            load(&self.log_lines_suppressed),
        );
        counter(
            &mut out,
            "imds_proxy_cache_hits_total",
            "Credential cache hits.",
            load(&self.cache_hits),
        );
        counter(
            &mut out,
            "imds_proxy_cache_misses_total",
            "Credential cache misses.",
            load(&self.cache_misses),
        );
        counter(
            &mut out,
            "imds_proxy_sts_calls_total",
            "STS AssumeRole calls.",
            load(&self.sts_calls),
        );
        self.sts_errors.render(
            &mut out,
            "imds_proxy_sts_errors_total",
            "Failed STS AssumeRole calls, by reason (sts_timeout: no answer in time; \
             sts_unavailable: a failed connection, a 5xx, throttling; sts_refused: a refusal of \
             the role).",
            "reason",
        );
        self.sts_seconds.render(
            &mut out,
            "imds_proxy_sts_call_seconds",
            "STS AssumeRole call durations (retries included).",
        );
        counter(
            &mut out,
            "imds_proxy_sts_answers_pending_total",
            "Requests answered 503 because STS had not answered within --answer-within (the call \
             went on in the background).",
            load(&self.sts_answers_pending),
        );
        let _ = writeln!(
            out,
            "# HELP imds_proxy_containers Containers in the container index.\n# TYPE imds_proxy_containers gauge\nimds_proxy_containers {}",
            load(&self.containers)
        );
        self.container_events.render(
            &mut out,
            "imds_proxy_container_events_total",
            "Containers the index announced, by event: created, started (or renamed, updated), destroyed.",
            "event",
        );
        self.refused_connections.render(
            &mut out,
            "imds_proxy_connections_refused_total",
            "Connections closed unserved, by reason.",
            "reason",
        );
        counter(
            &mut out,
            "imds_proxy_sts_calls_avoided_total",
            "Requests answered with an STS failure remembered from a call just before (back-off).",
            load(&self.sts_calls_avoided),
        );
        counter(
            &mut out,
            "imds_proxy_sts_calls_joined_total",
            "Requests that waited for an STS call already under way for their role (single flight).",
            load(&self.sts_calls_joined),
        );
        counter(
            &mut out,
            "imds_proxy_uncovered_containers_total",
            "Containers that started with a cgroup below no attach point (not redirected).",
            load(&self.uncovered_containers),
        );
        counter(
            &mut out,
            "imds_proxy_metadata_cache_hits_total",
            "Pass-through requests answered from the short metadata cache.",
            load(&self.metadata_cache_hits),
        );
        self.upstream_errors.render(
            &mut out,
            "imds_proxy_upstream_errors_total",
            "Pass-through requests the upstream IMDS did not answer (502), by kind.",
            "kind",
        );
        self.throttled.render(
            &mut out,
            "imds_proxy_throttled_total",
            "Requests answered 429, by the limit they hit.",
            "limit",
        );
        let _ = writeln!(
            out,
            "# HELP imds_proxy_connections_open Connections being served.\n# TYPE imds_proxy_connections_open gauge\nimds_proxy_connections_open {}",
            load(&self.open_connections)
        );
        out
    }
}

/// The container index's counters, and which runtime it follows, in the same text format.
pub fn render_index(
    runtime: &crate::runtime::Description,
    found_before_indexed: u64,
    skipped: u64,
) -> String {
    let label = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', " ")
    };
    format!(
        "# HELP imds_proxy_runtime_info The container runtime the index follows.\n\
         # TYPE imds_proxy_runtime_info gauge\n\
         imds_proxy_runtime_info{{kind=\"{}\",name=\"{}\",version=\"{}\"}} 1\n\
         # HELP imds_proxy_containers_skipped_total Containers the runtime named that could not \
         be inspected (skipped, tried again when it names them again).\n\
         # TYPE imds_proxy_containers_skipped_total counter\n\
         imds_proxy_containers_skipped_total {skipped}\n\
         # HELP imds_proxy_containers_found_before_indexed_total Callers whose container the \
         index did not hold yet (asked the runtime directly).\n\
         # TYPE imds_proxy_containers_found_before_indexed_total counter\n\
         imds_proxy_containers_found_before_indexed_total {found_before_indexed}\n",
        runtime.kind,
        label(&runtime.name),
        label(&runtime.version),
    )
}

/// The credential cache's gauges.
pub fn render_cache(keys: usize, sessions: usize, breaker_open: bool) -> String {
    format!(
        "# HELP imds_proxy_credential_cache_keys Keys the credential cache holds (role, container).\n\
         # TYPE imds_proxy_credential_cache_keys gauge\n\
         imds_proxy_credential_cache_keys {keys}\n\
         # HELP imds_proxy_credential_cache_sessions Keys that hold a session (credentials fetched).\n\
         # TYPE imds_proxy_credential_cache_sessions gauge\n\
         imds_proxy_credential_cache_sessions {sessions}\n\
         # HELP imds_proxy_sts_breaker_open 1 while the STS circuit breaker is open.\n\
         # TYPE imds_proxy_sts_breaker_open gauge\n\
         imds_proxy_sts_breaker_open {}\n",
        u8::from(breaker_open)
    )
}

/// tc mode's kernel counters and state, in the same text format.
/// `imds_proxy_tc_packets_total`, one line per counter of `stats`.
fn write_tc_packets<'a>(
    out: &mut String,
    stats: impl Iterator<Item = &'a (imds_common::TcStat, u64)>,
) {
    out.push_str(
        "# HELP imds_proxy_tc_packets_total Packets the tc programs acted on, by what they did.\n# TYPE imds_proxy_tc_packets_total counter\n",
    );
    for (stat, n) in stats {
        let _ = writeln!(
            out,
            "imds_proxy_tc_packets_total{{event=\"{}\"}} {n}",
            stat.name()
        );
    }
}

/// `imds_proxy_tc_sources`.
fn write_tc_sources(out: &mut String, source_entries: usize) {
    let _ = writeln!(
        out,
        "# HELP imds_proxy_tc_sources Source addresses vouched for at container ports (IMDS_TC_SOURCES).\n# TYPE imds_proxy_tc_sources gauge\nimds_proxy_tc_sources {source_entries}"
    );
}

/// cgroup mode: the counters of the tc programs it attaches (the forward and reply guards), in
/// tc mode's family, and the vouched addresses the reply guard reads.
pub fn render_tc_guards(stats: &[(imds_common::TcStat, u64)], source_entries: usize) -> String {
    use imds_common::TcStat;
    let mut out = String::new();
    write_tc_packets(
        &mut out,
        stats.iter().filter(|(stat, _)| {
            matches!(
                stat,
                TcStat::DroppedForwarded
                    | TcStat::DroppedForwardedUnreadable
                    | TcStat::DroppedMisdelivered
            )
        }),
    );
    write_tc_sources(&mut out, source_entries);
    out
}

pub fn render_tc(
    stats: &[(imds_common::TcStat, u64)],
    nat_entries: usize,
    source_entries: usize,
    interfaces: usize,
    (by_watch, by_kernel, by_runtime): (u64, u64, u64),
    watched: usize,
) -> String {
    let mut out = String::new();
    write_tc_packets(&mut out, stats.iter());
    let _ = writeln!(
        out,
        "# HELP imds_proxy_tc_nat_entries Redirected connections in the NAT table.\n# TYPE imds_proxy_tc_nat_entries gauge\nimds_proxy_tc_nat_entries {nat_entries}"
    );
    write_tc_sources(&mut out, source_entries);
    let _ = writeln!(
        out,
        "# HELP imds_proxy_tc_interfaces Container interfaces the programs are attached to (bridges and routed veths).\n# TYPE imds_proxy_tc_interfaces gauge\nimds_proxy_tc_interfaces {interfaces}"
    );
    let _ = writeln!(
        out,
        "# HELP imds_proxy_tc_address_confirmations_total Callers' source addresses confirmed as their container's: by a watch on an earlier confirmation (process alive, no address or link change in its namespace), by the kernel (/proc), or by asking the container runtime.\n# TYPE imds_proxy_tc_address_confirmations_total counter\nimds_proxy_tc_address_confirmations_total{{by=\"watch\"}} {by_watch}\nimds_proxy_tc_address_confirmations_total{{by=\"kernel\"}} {by_kernel}\nimds_proxy_tc_address_confirmations_total{{by=\"runtime\"}} {by_runtime}"
    );
    let _ = writeln!(
        out,
        "# HELP imds_proxy_tc_watched_addresses Source addresses whose confirmation is watched (a pidfd and a netlink socket each).\n# TYPE imds_proxy_tc_watched_addresses gauge\nimds_proxy_tc_watched_addresses {watched}"
    );
    out
}

/// How connections were identified: by the kernel's record (cgroup mode, host-network
/// containers in tc mode), or not at all (every request answered 403).
pub fn render_attested((by_record, refused): (u64, u64), lines_suppressed: u64) -> String {
    format!(
        "# HELP imds_proxy_connections_attested_total Connections whose caller was identified from the kernel's record of the connection (connect4 rewrite and sock_ops).\n\
         # TYPE imds_proxy_connections_attested_total counter\n\
         imds_proxy_connections_attested_total{{by=\"kernel_record\"}} {by_record}\n\
         # HELP imds_proxy_connections_unattested_total Connections with no evidence of their caller (no kernel record, no container at the source address): every request answered 403.\n\
         # TYPE imds_proxy_connections_unattested_total counter\n\
         imds_proxy_connections_unattested_total {refused}\n\
         # HELP imds_proxy_attestation_log_lines_suppressed_total Log lines about callers' cgroups \
         (a container unknown to the runtime, a cgroup not where the runtime put the container it \
         names) kept quiet: one per cgroup and reason a minute.\n\
         # TYPE imds_proxy_attestation_log_lines_suppressed_total counter\n\
         imds_proxy_attestation_log_lines_suppressed_total {lines_suppressed}\n"
    )
}

/// cgroup mode's egress guard: packets to IMDS dropped because they went around the redirect.
pub fn render_guard(stats: &[(imds_common::GuardStat, u64)]) -> String {
    let mut out = String::from(
        "# HELP imds_proxy_guard_packets_total Packets from container sockets to an IMDS address that went around the redirect, dropped by the egress guard.\n# TYPE imds_proxy_guard_packets_total counter\n",
    );
    for (stat, n) in stats {
        let _ = writeln!(
            out,
            "imds_proxy_guard_packets_total{{event=\"{}\"}} {n}",
            stat.name()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.request("token", 200);
        m.request("token", 200);
        m.request("credentials", 404);
        m.sts_call(Duration::from_millis(1500), Some("sts_unavailable"));
        m.set_containers(3);
        let text = m.render();
        assert!(
            text.contains("imds_proxy_requests_total{route=\"token\",status=\"200\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("imds_proxy_requests_total{route=\"credentials\",status=\"404\"} 1\n")
        );
        assert!(text.contains("imds_proxy_sts_calls_total 1\n"));
        assert!(text.contains("imds_proxy_sts_errors_total{reason=\"sts_unavailable\"} 1\n"));
        // 1.5 s: above the 1 s bucket, in the 2.5 s one and every one after.
        assert!(
            text.contains("imds_proxy_sts_call_seconds_bucket{le=\"1\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("imds_proxy_sts_call_seconds_bucket{le=\"2.5\"} 1\n"));
        assert!(text.contains("imds_proxy_sts_call_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains(
            "imds_proxy_sts_call_seconds_sum 1.500000\nimds_proxy_sts_call_seconds_count 1\n"
        ));
        assert!(text.contains("imds_proxy_containers 3\n"));
        m.refused_connection("per_caller_limit");
        m.refused_connection("per_caller_limit");
        m.throttled("upstream");
        let text = m.render();
        assert!(
            text.contains("imds_proxy_connections_refused_total{reason=\"per_caller_limit\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("imds_proxy_throttled_total{limit=\"upstream\"} 1\n"));
    }
}
