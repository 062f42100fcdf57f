//! tc mode, live: network namespaces on a bridge (veths), the real proxy attached to the bridge,
//! both ways of attaching (TCX links and netlink clsact filters). These clients are not Docker
//! containers, so the proxy answers them 403 ("no running container has this source address"):
//! that answer is the proof the redirect happened, since the simulated IMDS never answers 403.
//! Docker containers in tc mode are covered by the proxy and end-to-end suites, which run in both
//! modes.
use std::process::Command;

use imds_tests::{
    http::Request,
    kernel::{KernelObjects, wait_kernel_objects_gone},
    proxy::{Proxy, detach},
    scene::{Scene, SceneConfig, ensure_imds_is_simulated, ip},
    sim::HttpTokens,
};

fn scene() -> Scene {
    SceneConfig::new(env!("CARGO_BIN_EXE_imds-sim"))
        .hop_limit(1)
        .http_tokens(HttpTokens::Required)
        .with_sts()
        .start()
        .expect("the simulated EC2 host starts")
}

/// A bridge `imds-tcbr<k>` (10.214.<k>.1/24, fd00:ec2:214:<k>::1/64) with `clients` network
/// namespaces on it, each on a veth enslaved to the bridge: a docker0 of our own.
struct Bridge {
    name: String,
    clients: Vec<String>,
}

impl Bridge {
    fn new(k: u8, clients: u8) -> Self {
        let name = format!("imds-tcbr{k}");
        let this = Self {
            name: name.clone(),
            clients: (1..=clients).map(|i| format!("imds-tc{k}c{i}")).collect(),
        };
        this.remove();
        ip(&["link", "add", &name, "type", "bridge"]).unwrap();
        // A MAC of its own: a bridge otherwise takes its lowest port's, and changes it when that
        // port goes (its clients' neighbour entries would then point nowhere for a while).
        ip(&[
            "link",
            "set",
            &name,
            "address",
            &format!("02:00:0a:d6:{k:02x}:01"),
        ])
        .unwrap();
        ip(&["addr", "add", &format!("10.214.{k}.1/24"), "dev", &name]).unwrap();
        ip(&[
            "addr",
            "add",
            &format!("fd00:ec2:214:{k}::1/64"),
            "dev",
            &name,
            "nodad",
        ])
        .unwrap();
        ip(&["link", "set", &name, "up"]).unwrap();
        for i in 0..this.clients.len() {
            this.veth(i);
            this.enslave(i);
            this.configure(i);
        }
        this
    }

    /// The number of this bridge (`imds-tcbr<k>`).
    fn k(&self) -> &str {
        &self.name["imds-tcbr".len()..]
    }

    /// Client `i`'s namespace and a veth into it (`<ns>h` on the host, `eth0` inside), not a
    /// port of anything yet.
    fn veth(&self, i: usize) {
        let ns = &self.clients[i];
        ip(&["netns", "add", ns]).unwrap();
        ip(&[
            "link",
            "add",
            &format!("{ns}h"),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ])
        .unwrap();
    }

    /// Client `i`'s veth made a port of the bridge, up.
    fn enslave(&self, i: usize) {
        let host_end = format!("{}h", self.clients[i]);
        ip(&["link", "set", &host_end, "master", &self.name, "up"]).unwrap();
    }

    /// Client `i`'s addresses (10.214.<k>.<i+2>, fd00:ec2:214:<k>::<i+2>) and default routes via
    /// the bridge.
    fn configure(&self, i: usize) {
        let (ns, k) = (self.clients[i].as_str(), self.k());
        let n = |args: &[&str]| {
            let mut full = vec!["-n", ns];
            full.extend_from_slice(args);
            ip(&full).unwrap();
        };
        n(&["link", "set", "lo", "up"]);
        n(&[
            "addr",
            "add",
            &format!("10.214.{k}.{}/24", i + 2),
            "dev",
            "eth0",
        ]);
        n(&[
            "addr",
            "add",
            &format!("fd00:ec2:214:{k}::{}/64", i + 2),
            "dev",
            "eth0",
            "nodad",
        ]);
        n(&["link", "set", "eth0", "up"]);
        n(&["route", "add", "default", "via", &format!("10.214.{k}.1")]);
        n(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:ec2:214:{k}::1"),
        ]);
    }

    /// The proxy's flags vouching for the clients' addresses on their ports: they are not Docker
    /// containers, whose ports and addresses the proxy finds by itself.
    fn static_sources(&self) -> Vec<String> {
        let k = self.k();
        let mut flags = Vec::new();
        for (i, ns) in self.clients.iter().enumerate() {
            for addr in [
                format!("10.214.{k}.{}", i + 2),
                format!("fd00:ec2:214:{k}::{}", i + 2),
            ] {
                flags.push("--tc-static-source".to_owned());
                flags.push(format!("{ns}h={addr}"));
            }
        }
        flags
    }

    fn remove(&self) {
        for ns in &self.clients {
            let _ = ip(&["netns", "del", ns]);
            let _ = ip(&["link", "del", &format!("{ns}h")]);
        }
        let _ = ip(&["link", "del", &self.name]);
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `imds-probe` inside a namespace: one JSON line per connection.
fn probe(ns: &str, addr: &str, count: usize) -> Vec<serde_json::Value> {
    ensure_imds_is_simulated().expect("IMDS is the simulator before anything talks to it");
    let count = count.to_string();
    let probe = env!("CARGO_BIN_EXE_imds-probe");
    ip(&[
        "netns", "exec", ns, probe, "--addr", addr, "--count", &count,
    ])
    .unwrap()
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect()
}

const IMDS_V4: &str = "169.254.169.254:80";
const IMDS_V6: &str = "[fd00:ec2::254]:80";

/// Every answer came from the proxy (403: not a container), none from the simulator; the
/// client saw IMDS as its peer.
fn assert_redirected(answers: &[serde_json::Value], imds: &str) {
    for answer in answers {
        assert_eq!(answer["status"], 403, "{answer}");
        assert_eq!(answer["peer"], imds, "{answer}");
    }
}

/// TCP counters of a namespace, absolute (the namespace is new: they count only its own traffic).
fn nstat(ns: &str) -> std::collections::HashMap<String, u64> {
    ip(&["netns", "exec", ns, "nstat", "-asz"])
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.parse().ok()?))
        })
        .collect()
}

/// The proxy in tc mode on exactly the interfaces `extra` names.
fn tc_proxy(scene: &Scene, extra: &[&str]) -> Proxy {
    Proxy::start(scene, &[&["--mode", "tc"], extra].concat())
}

#[test]
fn bridge_clients_are_redirected_with_tcx_and_with_netlink() {
    let scene = scene();
    let before = KernelObjects::now();
    for attach in ["tcx", "netlink"] {
        let bridge = Bridge::new(0, 2);
        let sources = bridge.static_sources();
        let mut args = vec!["--container-iface", &bridge.name, "--tc-attach", attach];
        args.extend(sources.iter().map(String::as_str));
        let proxy = tc_proxy(&scene, &args);
        let attached = proxy.wait_for_log(&["redirect attached to container interface"]);
        assert!(attached.contains(&bridge.name), "{attached}");
        for ns in &bridge.clients {
            assert_redirected(&probe(ns, IMDS_V4, 3), IMDS_V4);
            assert_redirected(&probe(ns, IMDS_V6, 3), IMDS_V6);
        }
        // The simulator hears from the proxy (its own token, region, IMDSv2 setting), never from
        // a client.
        let from_clients: Vec<String> = scene
            .sim_requests()
            .into_iter()
            .filter(|l| l.contains("peer=10.214.") || l.contains("peer=[fd00:ec2:214:"))
            .collect();
        assert!(from_clients.is_empty(), "{attach}: {from_clients:#?}");
        proxy.wait_for_log(&["no running container has this source address", "10.214.0.2"]);
        proxy.wait_for_log(&[
            "no running container has this source address",
            "fd00:ec2:214::3",
        ]);
        assert!(proxy.metric("imds_proxy_tc_packets_total{event=\"redirected\"}") >= 24);
        assert_eq!(
            proxy.metric("imds_proxy_tc_packets_total{event=\"dropped_spoofed\"}"),
            0,
            "{attach}: every client vouched for on its own port"
        );
        assert_eq!(
            proxy.metric("imds_proxy_tc_packets_total{event=\"reversed_without_state\"}"),
            0,
            "{attach}: every reply found its connection"
        );
        let qdiscs = || {
            String::from_utf8(
                Command::new("tc")
                    .args(["qdisc", "show", "dev", &bridge.name])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap()
        };
        if attach == "netlink" {
            assert!(qdiscs().contains("clsact"), "{}", qdiscs());
        }
        drop(proxy); // SIGTERM: a graceful stop detaches
        assert_eq!(
            wait_kernel_objects_gone(&before),
            Vec::<String>::new(),
            "{attach}"
        );
        assert!(
            !qdiscs().contains("clsact"),
            "{attach}: the qdisc we added is gone: {}",
            qdiscs()
        );
    }
}

#[test]
fn interfaces_that_come_later_are_attached_and_forgotten_when_gone() {
    let scene = scene();
    // The bridge and its client come later; the client's address on its port is declared now.
    let proxy = tc_proxy(
        &scene,
        &[
            "--container-iface",
            "imds-tcbr*",
            "--tc-static-source",
            "imds-tc1c1h=10.214.1.2",
        ],
    );
    // Nothing to attach to yet: not ready.
    let ready = Request::get("/readyz").send(proxy.ops).unwrap();
    assert_eq!(ready.status, 503, "{}", ready.text());
    let bridge = Bridge::new(1, 1);
    proxy.wait_for_log(&["redirect attached to container interface", "imds-tcbr1"]);
    assert_redirected(&probe(&bridge.clients[0], IMDS_V4, 2), IMDS_V4);
    let ready = Request::get("/readyz").send(proxy.ops).unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    drop(bridge);
    proxy.wait_for_log(&["container interface gone", "imds-tcbr1"]);
    assert_eq!(proxy.metric("imds_proxy_tc_interfaces"), 0);
}

/// A runtime creates a container's veth and makes it a port of its bridge a moment later (Docker,
/// CNI's `bridge`): a pattern naming the veths as well as the bridge sees a routed veth first, and
/// the routed programs go on it. Once it is a port they leave it for its bridge's (a packet is
/// rewritten once, at the bridge, with the port's guard vouching for it): the client is served,
/// nothing dropped as unvouched at the bridge.
#[test]
fn a_veth_made_a_bridge_port_after_it_appeared_is_left_to_its_bridge() {
    let scene = scene();
    let proxy = tc_proxy(
        &scene,
        &[
            "--container-iface",
            "imds-tcbr4",
            "--container-iface",
            "imds-tc4c*",
            "--tc-static-source",
            "imds-tc4c1h=10.214.4.2",
        ],
    );
    let mut bridge = Bridge::new(4, 0);
    proxy.wait_for_log(&["redirect attached to container interface", "imds-tcbr4"]);
    bridge.clients.push("imds-tc4c1".into());
    bridge.veth(0);
    proxy.wait_for_log(&[
        "redirect and guards attached to routed container veth",
        "imds-tc4c1h",
    ]);
    bridge.enslave(0);
    bridge.configure(0);
    proxy.wait_for_log(&["no longer a routed veth", "imds-tc4c1h"]);
    proxy.wait_for_log(&["static source addresses vouched for", "imds-tc4c1h"]);
    assert_redirected(&probe(&bridge.clients[0], IMDS_V4, 2), IMDS_V4);
    assert_eq!(
        proxy.metric("imds_proxy_tc_packets_total{event=\"dropped_unvalidated\"}"),
        0
    );
    assert_eq!(
        proxy.metric("imds_proxy_tc_interfaces"),
        1,
        "the bridge alone"
    );
}

#[test]
fn a_killed_pinned_proxy_fails_closed_and_a_restart_adopts_its_links() {
    let scene = scene();
    let loaded_before = KernelObjects::now();
    let pins = imds_tests::proxy::Pins::new("/sys/fs/bpf/imds-test-tc");
    let pin = pins.path().to_owned();
    let bridge = Bridge::new(2, 2);
    let ns = &bridge.clients[0];
    let sources = bridge.static_sources();
    let mut args = vec![
        "--container-iface",
        "imds-tcbr2",
        "--pin",
        "/sys/fs/bpf/imds-test-tc",
    ];
    args.extend(sources.iter().map(String::as_str));
    let mut first = tc_proxy(&scene, &args);
    assert_redirected(&probe(ns, IMDS_V4, 1), IMDS_V4);
    first.kill(); // SIGKILL: no cleanup of any kind
    // While it is down, a container goes with its port: its links' pins outlive it.
    let gone_port = format!("{}h", bridge.clients[1]);
    let gone_index = std::fs::read_to_string(format!("/sys/class/net/{gone_port}/ifindex"))
        .unwrap()
        .trim()
        .to_owned();
    let pins_of_gone = || -> Vec<String> {
        std::fs::read_dir(&pin)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(&format!("_if{gone_index}")))
            .collect()
    };
    ip(&["link", "del", &gone_port]).unwrap();
    assert_eq!(pins_of_gone().len(), 2, "its source and reply guards' pins");
    let before = scene.sim_requests().len();
    let answers = probe(ns, IMDS_V4, 3);
    for answer in answers {
        assert_eq!(answer["kind"], "ConnectionRefused", "{answer}");
    }
    assert_eq!(
        scene.sim_requests().len(),
        before,
        "fail closed: IMDS saw nothing"
    );

    let mut second = tc_proxy(&scene, &args);
    // The bridge's two links and its remaining port's source and reply guards; the gone port's
    // pins removed (their links went with it).
    second.wait_for_log(&["tc programs attached", "adopted_links=4"]);
    assert_eq!(pins_of_gone(), Vec::<String>::new());
    assert_redirected(&probe(ns, IMDS_V4, 2), IMDS_V4);
    second.stop(); // graceful, pinned: stays attached
    for answer in probe(ns, IMDS_V4, 1) {
        assert_eq!(answer["kind"], "ConnectionRefused", "{answer}");
    }
    detach(&pin);
    assert!(!pin.exists());
    assert_eq!(
        wait_kernel_objects_gone(&loaded_before),
        Vec::<String>::new()
    );
    drop(first);
}

#[test]
fn ten_thousand_sequential_connections_without_resets_or_retransmits() {
    let scene = scene();
    let bridge = Bridge::new(3, 1);
    let ns = &bridge.clients[0];
    let sources = bridge.static_sources();
    let mut args = vec!["--container-iface", "imds-tcbr3"];
    args.extend(sources.iter().map(String::as_str));
    let proxy = tc_proxy(&scene, &args);
    let before = nstat(ns);
    let answers = probe(ns, IMDS_V4, 10_000);
    assert_eq!(answers.len(), 10_000);
    let failed: Vec<_> = answers.iter().filter(|a| a["status"] != 403).collect();
    assert!(
        failed.is_empty(),
        "{} failed, first: {}",
        failed.len(),
        failed[0]
    );
    let after = nstat(ns);
    let delta =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    assert_eq!(delta("TcpActiveOpens"), 10_000, "{after:?}");
    for counter in [
        "TcpRetransSegs",
        "TcpOutRsts",
        "TcpEstabResets",
        "TcpAttemptFails",
        "TcpExtTCPSynRetrans",
    ] {
        assert_eq!(delta(counter), 0, "{counter}: {after:?}");
    }
    // Closed connections leave the NAT table (RST, or both FINs and the last ACK).
    let left = proxy.metric("imds_proxy_tc_nat_entries");
    assert!(
        left < 10,
        "{left} NAT entries left after 10000 closed connections"
    );
}
