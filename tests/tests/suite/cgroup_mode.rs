//! cgroup mode against the real kernel: connect/sock_ops/getpeername programs attached to cgroup
//! v2 directories, hand-made containers (cgroup + netns) and real Docker containers, all on the
//! simulated EC2 host (so anything not redirected reaches the simulator, never the real IMDS).
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use imds_proxy::{
    cgroup::Cgroups,
    identity::{AttestedListener, Attestor, Caller, Evidence, Proc},
    netdev,
    redirect::cgroup::{CgroupRedirect as Redirect, Scope, Spec},
    runtime,
};
use imds_tests::{
    http::Request,
    images::{curl_image, docker, docker_ok},
    kernel::{KernelObjects, TestCgroup, TestNetns, cgroup2_root, place, wait_kernel_objects_gone},
    proxy::{TEST_IF, detach, proxy_bin},
    scene::{Scene, SceneConfig, ensure_imds_is_simulated},
};

const LISTEN_V4: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(169, 254, 43, 1), 80);
const LISTEN_V6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0xec2, 0x43, 0, 0, 0, 0, 1), 80, 0, 0);

fn scene() -> Scene {
    SceneConfig::new(env!("CARGO_BIN_EXE_imds-sim"))
        .start()
        .expect("the simulated EC2 host starts")
}

/// The container a caller is: Docker's, else the one its cgroup path names (hand-made
/// "containers" are not Docker's).
fn named_container(caller: &Caller) -> Option<String> {
    caller
        .container_id()
        .map(str::to_owned)
        .or_else(|| caller.cgroup().and_then(imds_proxy::cgroup::container_id))
}

fn cgroup_id(caller: &Caller) -> u64 {
    match caller.evidence {
        Evidence::Kernel { cgroup_id, .. } => cgroup_id,
        Evidence::Address(_) => 0,
    }
}

/// What the test proxy answers: the container, else the cgroup path, of the kernel's record.
fn identity_of(caller: &Caller) -> String {
    named_container(caller)
        .or_else(|| caller.cgroup().map(str::to_owned))
        .unwrap_or_else(|| format!("cgroup-id:{}", cgroup_id(caller)))
}

/// The library's redirect, attestor (with the real Docker behind it) and attested listener, in
/// this process, answering every connection with the identity the kernel's record resolved to
/// (403 "unattested" without one).
struct TestProxy {
    runtime: Option<tokio::runtime::Runtime>,
    redirect: Option<Arc<Redirect>>,
    callers: Arc<Mutex<Vec<Option<Caller>>>>,
}

/// The filter's feed on `redirect`, classifying everything below `parent` as the daemon does.
fn filter_feed(
    redirect: &Arc<Redirect>,
    hosts: imds_policy::cgroups::HostCgroups,
    parent: &Path,
) -> imds_proxy::cgroup::filter::Feed {
    imds_proxy::cgroup::filter::Feed::start(
        redirect.clone(),
        hosts,
        &cgroup2_root().unwrap(),
        parent,
    )
    .expect("the cgroups are classified")
}

impl TestProxy {
    fn start(cgroups: Vec<PathBuf>, own_cgroup: u64) -> Self {
        Self::start_with(cgroups, own_cgroup, false)
    }

    /// Filter mode; with `feed`, the cgroups below are classified (and watched) as the proxy does.
    fn start_filtered(parent: &Path, feed: bool) -> Self {
        let proxy = Self::start_with(vec![parent.to_owned()], 0, true);
        if feed {
            // The test's stand-ins for host services: `*.service` under its slices.
            let hosts =
                imds_policy::cgroups::HostCgroups::parse(["/imds-test-*.slice/*.service"]).unwrap();
            let feed = filter_feed(proxy.redirect.as_ref().unwrap(), hosts, parent);
            // Ends when the parent cgroup is removed at the end of the test.
            std::thread::spawn(move || feed.run());
        }
        proxy
    }

    fn start_with(cgroups: Vec<PathBuf>, own_cgroup: u64, filter: bool) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime
            .block_on(netdev::ensure(
                TEST_IF,
                &[(*LISTEN_V4.ip()).into(), (*LISTEN_V6.ip()).into()],
            ))
            .unwrap();
        let spec = Spec {
            listen_v4: LISTEN_V4,
            listen_v6: Some(LISTEN_V6),
            cgroups,
            filter,
            own_cgroup,
            pin: None,
            scope: Scope::AllNamespaces,
            gate: false,
        };
        let callers = Arc::new(Mutex::new(Vec::new()));
        let redirect = runtime.block_on(async {
            let listeners = [
                tokio::net::TcpListener::bind(LISTEN_V4).await.unwrap(),
                tokio::net::TcpListener::bind(LISTEN_V6).await.unwrap(),
            ];
            let redirect = Arc::new(Redirect::attach(&spec).expect("the redirect attaches"));
            let docker = runtime::Endpoint::DockerApi("unix:///var/run/docker.sock".into())
                .connect(false, Duration::from_secs(1))
                .await
                .expect("Docker answers");
            let attestor = Arc::new(Attestor::new(
                Some(redirect.clone()),
                Arc::new(Cgroups::new(cgroup2_root().unwrap())),
                docker,
                Proc::default(),
                false,
            ));
            for listener in listeners {
                let mut listener = AttestedListener::new(listener, attestor.clone());
                let callers = callers.clone();
                tokio::spawn(async move {
                    loop {
                        let (stream, pending) = listener.accept_pending().await.unwrap();
                        let peer = pending.attest().await;
                        let caller = peer.caller.ok();
                        callers.lock().unwrap().push(caller.clone());
                        tokio::task::spawn_blocking(move || answer(stream, caller));
                    }
                });
            }
            redirect
        });
        Self {
            runtime: Some(runtime),
            redirect: Some(redirect),
            callers,
        }
    }

    fn callers(&self) -> Vec<Option<Caller>> {
        self.callers.lock().unwrap().clone()
    }
}

fn answer(stream: tokio::net::TcpStream, caller: Option<Caller>) {
    let mut stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Read the request head before answering, so closing does not reset the connection.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    let (status, body) = match &caller {
        Some(caller) => ("200 OK", identity_of(caller)),
        None => ("403 Forbidden", "unattested".to_owned()),
    };
    let _ = write!(
        stream,
        "HTTP/1.0 {status}\r\nServer: imds-test-proxy\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            let _ = runtime.block_on(netdev::remove(TEST_IF));
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
        drop(self.redirect.take()); // detaches
    }
}

/// Run `imds-probe` in `cgroup` (and `netns`) against `addr`; one JSON value per connection.
fn probe(
    cgroup: &Path,
    netns: Option<&str>,
    addr: SocketAddr,
    count: usize,
) -> Vec<serde_json::Value> {
    probe_with(cgroup, netns, addr, count, &[])
}

/// [`probe`] with more `imds-probe` flags (`--how`, `--scope-id`).
fn probe_with(
    cgroup: &Path,
    netns: Option<&str>,
    addr: SocketAddr,
    count: usize,
    extra: &[&str],
) -> Vec<serde_json::Value> {
    let mut child = probe_command(cgroup, netns, addr, count);
    child.args(extra);
    let out = child.spawn().unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_lines(&out.stdout)
}

fn probe_child(cgroup: &Path, netns: Option<&str>, addr: SocketAddr, count: usize) -> Child {
    probe_command(cgroup, netns, addr, count).spawn().unwrap()
}

fn probe_command(cgroup: &Path, netns: Option<&str>, addr: SocketAddr, count: usize) -> Command {
    ensure_imds_is_simulated().expect("IMDS is the simulator before a client talks to it");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imds-probe"));
    cmd.args(["--addr", &addr.to_string(), "--count", &count.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    place(&mut cmd, cgroup, netns).unwrap();
    cmd
}

fn parse_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn imds_v4() -> SocketAddr {
    imds_tests::scene::imds_v4()
}

#[test]
fn a_container_cgroup_is_redirected_identified_and_sees_imds_as_its_peer() {
    let scene = scene();
    let parent = TestCgroup::new("imds-test-redirect").unwrap();
    let container = parent.child("c1").unwrap();
    let netns = TestNetns::new(1).unwrap();
    let proxy = TestProxy::start(vec![parent.path().to_owned()], 0);

    let results = probe(container.path(), Some(&netns.name), imds_v4(), 3);
    for r in &results {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["server"], "imds-test-proxy", "reached the proxy: {r}");
        assert_eq!(
            r["peer"], "169.254.169.254:80",
            "getpeername hides the rewrite: {r}"
        );
        assert_eq!(
            r["body"],
            container.relative(),
            "identified by its cgroup: {r}"
        );
    }
    let callers = proxy.callers();
    assert_eq!(callers.len(), 3);
    for caller in callers {
        let caller = caller.expect("every connection had a kernel record");
        assert_eq!(cgroup_id(&caller), container.id());
        assert_eq!(caller.original_destination, imds_v4());
        assert_eq!(named_container(&caller), None);
    }
    assert_eq!(
        scene.sim_requests(),
        Vec::<String>::new(),
        "nothing reached IMDS"
    );
}

#[test]
fn the_host_and_the_proxys_own_cgroup_are_not_redirected() {
    let scene = scene();
    let parent = TestCgroup::new("imds-test-exempt").unwrap();
    let own = parent.child("proxy").unwrap();
    let container = parent.child("c1").unwrap();
    let proxy = TestProxy::start(vec![parent.path().to_owned()], own.id());

    // The proxy's own cgroup (under the attach point, DaemonSet-style) reaches the simulator.
    let upstream = probe(own.path(), None, imds_v4(), 1);
    assert_eq!(upstream[0]["status"], 200, "{}", upstream[0]);
    assert_eq!(
        upstream[0]["server"],
        serde_json::Value::Null,
        "the simulator answered"
    );
    assert!(
        upstream[0]["body"]
            .as_str()
            .unwrap()
            .contains("instance-id")
    );
    // So does this test process, outside the attached cgroup.
    let host = Request::get("/latest/meta-data/instance-id")
        .send(scene.imds_v4().unwrap())
        .unwrap();
    assert_eq!(
        (host.status, host.text().as_str()),
        (200, "i-0123456789abcdef0")
    );
    // A sibling container is redirected.
    let redirected = probe(container.path(), None, imds_v4(), 1);
    assert_eq!(redirected[0]["body"], container.relative());
    assert_eq!(scene.sim_requests().len(), 2, "{:#?}", scene.sim_requests());
    assert_eq!(proxy.callers().len(), 1);
}

#[test]
fn two_containers_are_told_apart_over_1000_interleaved_connections() {
    let _scene = scene();
    let parent = TestCgroup::new("imds-test-apart").unwrap();
    let a = parent.child("a").unwrap();
    let b = parent.child("b").unwrap();
    let (na, nb) = (TestNetns::new(2).unwrap(), TestNetns::new(3).unwrap());
    let proxy = TestProxy::start(vec![parent.path().to_owned()], 0);

    let child_a = probe_child(a.path(), Some(&na.name), imds_v4(), 500);
    let child_b = probe_child(b.path(), Some(&nb.name), imds_v4(), 500);
    for (child, cgroup) in [(child_a, &a), (child_b, &b)] {
        let out = child.wait_with_output().unwrap();
        let results = parse_lines(&out.stdout);
        assert_eq!(results.len(), 500);
        let wrong: Vec<_> = results
            .iter()
            .filter(|r| r["body"] != cgroup.relative().as_str())
            .collect();
        assert!(
            wrong.is_empty(),
            "{} of 500 misattributed: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(3)]
        );
    }
    assert_eq!(proxy.callers().len(), 1000);
    assert_eq!(
        proxy.redirect.as_ref().unwrap().record_counts(),
        (0, 0),
        "every record was consumed"
    );
}

#[test]
fn ipv6_clients_are_redirected_and_identified() {
    let scene = scene();
    let parent = TestCgroup::new("imds-test-v6").unwrap();
    let container = parent.child("c1").unwrap();
    let netns = TestNetns::new(4).unwrap();
    let _proxy = TestProxy::start(vec![parent.path().to_owned()], 0);
    let results = probe(
        container.path(),
        Some(&netns.name),
        imds_tests::scene::imds_v6(),
        2,
    );
    for r in &results {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["peer"], "[fd00:ec2::254]:80", "{r}");
        assert_eq!(r["body"], container.relative(), "{r}");
        assert!(
            r["local"]
                .as_str()
                .unwrap()
                .starts_with(&format!("[{}]", netns.client_v6)),
            "{r}"
        );
    }
    assert_eq!(scene.sim_requests(), Vec::<String>::new());
}

/// ::ffff:169.254.169.254:80, the IPv4 IMDS as an AF_INET6 (dual-stack) socket names it.
fn imds_v4_mapped() -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv4Addr::new(169, 254, 169, 254).to_ipv6_mapped()),
        80,
    )
}

/// Every way a TCP socket can name IMDS and reach it: plain, v4-mapped (what the JVM's dual-stack
/// sockets do), bound first, TCP fast open (`sendto(MSG_FASTOPEN)`, no connect), an IPv6 scope id.
/// Each is redirected, identified by its cgroup, and sees the address it used as its peer; none
/// reaches the simulated IMDS. From a container with a network namespace of its own (bridged) and
/// from one in the host's (host network).
/// `netns`: the number of a hand-made network namespace to run in (made after the scene, as in
/// every other test), or the host's network.
fn every_tcp_address_form_is_redirected(netns: Option<u8>, name: &str) {
    let scene = scene();
    let netns = netns.map(|n| TestNetns::new(n).unwrap());
    let netns = netns.as_ref();
    let parent = TestCgroup::new(name).unwrap();
    let container = parent.child("c1").unwrap();
    let proxy = TestProxy::start(vec![parent.path().to_owned()], 0);
    let v4 = imds_v4();
    let v6 = imds_tests::scene::imds_v6();
    let mapped = imds_v4_mapped();
    let forms: Vec<(&str, SocketAddr, Vec<&str>, &str)> = vec![
        ("IPv4", v4, vec![], "169.254.169.254:80"),
        (
            "IPv4, bound first",
            v4,
            vec!["--how", "bound"],
            "169.254.169.254:80",
        ),
        (
            "IPv4, fast open",
            v4,
            vec!["--how", "fastopen"],
            "169.254.169.254:80",
        ),
        ("v4-mapped", mapped, vec![], "[::ffff:169.254.169.254]:80"),
        (
            "v4-mapped, bound first",
            mapped,
            vec!["--how", "bound"],
            "[::ffff:169.254.169.254]:80",
        ),
        (
            "v4-mapped, fast open",
            mapped,
            vec!["--how", "fastopen"],
            "[::ffff:169.254.169.254]:80",
        ),
        ("IPv6", v6, vec![], "[fd00:ec2::254]:80"),
        (
            "IPv6, bound first",
            v6,
            vec!["--how", "bound"],
            "[fd00:ec2::254]:80",
        ),
        (
            "IPv6, fast open",
            v6,
            vec!["--how", "fastopen"],
            "[fd00:ec2::254]:80",
        ),
        (
            "IPv6, scope id 1",
            v6,
            vec!["--scope-id", "1"],
            "[fd00:ec2::254]:80",
        ),
    ];
    let netns_name = netns.map(|n| n.name.as_str());
    for (what, addr, extra, peer) in &forms {
        let results = probe_with(container.path(), netns_name, *addr, 2, extra);
        assert_eq!(results.len(), 2, "{what}: {results:?}");
        for r in &results {
            assert_eq!(r["status"], 200, "{what}: {r}");
            assert_eq!(
                r["server"], "imds-test-proxy",
                "{what}: reached the proxy: {r}"
            );
            assert_eq!(r["body"], container.relative(), "{what}: identified: {r}");
            assert_eq!(
                r["peer"], *peer,
                "{what}: getpeername hides the rewrite: {r}"
            );
        }
    }
    let callers = proxy.callers();
    assert_eq!(callers.len(), forms.len() * 2);
    assert!(
        callers
            .iter()
            .all(|c| c.as_ref().is_some_and(|c| cgroup_id(c) == container.id())),
        "every connection had the container's kernel record: {callers:?}"
    );
    assert_eq!(
        proxy.redirect.as_ref().unwrap().record_counts(),
        (0, 0),
        "every record was consumed"
    );
    assert_eq!(
        scene.sim_requests(),
        Vec::<String>::new(),
        "nothing reached IMDS"
    );
}

#[test]
fn every_tcp_address_form_is_redirected_from_a_network_namespace() {
    every_tcp_address_form_is_redirected(Some(5), "imds-test-forms-ns");
}

#[test]
fn every_tcp_address_form_is_redirected_on_the_host_network() {
    every_tcp_address_form_is_redirected(None, "imds-test-forms-host");
}

/// README: "a container's UDP connect or TCP connect to another port of IMDS is refused
/// (EPERM)". Each form from a container's cgroup gets `Operation not permitted`, and nothing
/// arrives at the simulated IMDS. The premise, from the host (outside the attach point): the same
/// UDP connects succeed and the TCP connects to port 443 are refused by the simulator's kernel
/// (ECONNREFUSED), so the EPERM is the hook's.
#[test]
fn udp_connects_and_other_imds_ports_are_refused() {
    let _scene = scene();
    let parent = TestCgroup::new("imds-test-ports").unwrap();
    let container = parent.child("c1").unwrap();
    let _proxy = TestProxy::start(vec![parent.path().to_owned()], 0);
    let port = |addr: SocketAddr, port: u16| SocketAddr::new(addr.ip(), port);
    let v4 = imds_v4();
    let v6 = imds_tests::scene::imds_v6();
    let mapped = imds_v4_mapped();
    let cases = [
        ("TCP, IPv4, port 443", port(v4, 443), "connect"),
        ("TCP, IPv6, port 443", port(v6, 443), "connect"),
        ("TCP, v4-mapped, port 443", port(mapped, 443), "connect"),
        ("UDP connect, IPv4, port 80", v4, "udp-connect"),
        ("UDP connect, IPv4, port 53", port(v4, 53), "udp-connect"),
        ("UDP connect, IPv6, port 80", v6, "udp-connect"),
        ("UDP connect, v4-mapped, port 80", mapped, "udp-connect"),
    ];
    let before = sim_arrivals();
    for (what, addr, how) in cases {
        let got = probe_with(container.path(), None, addr, 1, &["--how", how]);
        assert_eq!(got.len(), 1, "{what}: {got:?}");
        assert_eq!(
            got[0]["error"], "Operation not permitted (os error 1)",
            "{what}: {got:?}"
        );
    }
    assert_eq!(sim_arrivals(), before, "nothing arrived at IMDS");
    let host = TestCgroup::new("imds-test-ports-host").unwrap();
    for (what, addr, how) in cases {
        let got = probe_with(host.path(), None, addr, 1, &["--how", how]);
        let expected = match how {
            "connect" => got[0]["kind"] == "ConnectionRefused",
            _ => got[0]["sent"].as_u64().is_some(),
        };
        assert!(expected, "from the host, {what}: {got:?}");
    }
}

/// Counters of the simulated IMDS's network namespace: TCP segments and UDP datagrams that
/// arrived there, both families.
fn sim_arrivals() -> (u64, u64) {
    let snmp = imds_tests::scene::ip(&[
        "netns",
        "exec",
        imds_tests::scene::NETNS,
        "cat",
        "/proc/net/snmp",
    ])
    .unwrap();
    let snmp6 = imds_tests::scene::ip(&[
        "netns",
        "exec",
        imds_tests::scene::NETNS,
        "cat",
        "/proc/net/snmp6",
    ])
    .unwrap();
    // /proc/net/snmp: a header line of names, then a line of values, per protocol.
    let field = |proto: &str, name: &str| -> u64 {
        let mut lines = snmp.lines().filter(|l| l.starts_with(&format!("{proto}:")));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        let at = names.split_whitespace().position(|n| n == name).unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    };
    let field6 = |name: &str| -> u64 {
        snmp6
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap()
    };
    let tcp = field("Tcp", "InSegs");
    let udp = field("Udp", "InDatagrams")
        + field("Udp", "NoPorts")
        + field6("Udp6InDatagrams")
        + field6("Udp6NoPorts");
    (tcp, udp)
}

/// What goes around the connect hooks (a datagram, a SYN written on a raw socket) still carries an
/// IMDS address on the wire: the egress guard drops it at the container's socket, counted, and
/// nothing arrives at the simulated IMDS. The host (outside the attach point) is not affected:
/// its datagram arrives, which shows the counters see what arrives.
/// `netns` as in [`every_tcp_address_form_is_redirected`].
fn around_the_connect_hooks(netns: Option<u8>, name: &str) {
    let _scene = scene();
    let netns = netns.map(|n| TestNetns::new(n).unwrap());
    let netns = netns.as_ref();
    let parent = TestCgroup::new(name).unwrap();
    let container = parent.child("c1").unwrap();
    let proxy = TestProxy::start(vec![parent.path().to_owned()], 0);
    let redirect = proxy.redirect.clone().unwrap();
    let dropped = || {
        redirect
            .guard_stats()
            .iter()
            .find(|(s, _)| *s == imds_common::GuardStat::Dropped)
            .unwrap()
            .1
    };
    let before = sim_arrivals();
    let netns_name = netns.map(|n| n.name.as_str());
    let v4 = imds_v4();
    let v6 = imds_tests::scene::imds_v6();
    let mut sent = 0;
    for (what, addr, how) in [
        ("UDP, IPv4", v4, "udp"),
        ("UDP, v4-mapped", imds_v4_mapped(), "udp"),
        ("UDP, IPv6", v6, "udp"),
        ("raw TCP SYN, IPv4", v4, "raw"),
        ("raw TCP SYN, IPv6", v6, "raw"),
    ] {
        let results = probe_with(container.path(), netns_name, addr, 1, &["--how", how]);
        // The send may be refused outright (EPERM from the guard) or accepted and dropped.
        assert_eq!(results.len(), 1, "{what}: {results:?}");
        sent += 1;
        assert_eq!(dropped(), sent, "{what} dropped by the guard: {results:?}");
    }
    assert_eq!(
        sim_arrivals(),
        before,
        "nothing a container sent around the hooks arrived at IMDS"
    );
    // Control: the same datagram from the host (this process, outside the attach point) arrives.
    ensure_imds_is_simulated().unwrap();
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    udp.send_to(b"x", v4).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim_arrivals().1 == before.1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        sim_arrivals().1,
        before.1 + 1,
        "the host's datagram arrived"
    );
    assert_eq!(
        dropped(),
        sent,
        "the host's datagram is not the guard's business"
    );
}

#[test]
fn what_goes_around_the_connect_hooks_is_dropped_from_a_network_namespace() {
    around_the_connect_hooks(Some(6), "imds-test-guard-ns");
}

#[test]
fn what_goes_around_the_connect_hooks_is_dropped_on_the_host_network() {
    around_the_connect_hooks(None, "imds-test-guard-host");
}

/// A container that curls IMDS once; returns (container id, curl's output).
fn container_curl(network: &str, url: &str) -> (String, String) {
    ensure_imds_is_simulated().unwrap();
    let id = docker_ok(&[
        "run",
        "-d",
        "--network",
        network,
        curl_image().unwrap(),
        "curl",
        "--silent",
        "--show-error",
        "--globoff",
        "--max-time",
        "5",
        url,
    ])
    .unwrap()
    .trim()
    .to_owned();
    docker_ok(&["wait", &id]).unwrap();
    let logs = docker(&["logs", &id]).unwrap();
    docker_ok(&["rm", "-f", &id]).unwrap();
    (
        id,
        format!(
            "{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        ),
    )
}

#[test]
fn docker_containers_on_docker0_a_user_network_and_the_host_network_are_identified() {
    let scene = scene();
    // Docker's parent cgroup on the v2 hierarchy (cgroupfs driver), as the proxy's default.
    let docker_parent = cgroup2_root().unwrap().join("docker");
    std::fs::create_dir_all(&docker_parent).unwrap();
    let _ = docker(&["network", "rm", "imds-test-net"]);
    docker_ok(&["network", "create", "imds-test-net"]).unwrap();
    let proxy = TestProxy::start(vec![docker_parent], 0);
    // The plain address, and the v4-mapped one a dual-stack client (the JVM) uses.
    let urls = [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
    ];
    let results: Vec<(String, String, String)> = ["bridge", "imds-test-net", "host"]
        .into_iter()
        .flat_map(|network| urls.map(|url| (network, url)))
        .map(|(network, url)| {
            let (id, out) = container_curl(network, url);
            (format!("{network} {url}"), id, out)
        })
        .collect();
    docker_ok(&["network", "rm", "imds-test-net"]).unwrap();
    for (what, id, out) in &results {
        assert_eq!(out, id, "container on {what} identified by its id");
    }
    let identified: Vec<Option<String>> = proxy
        .callers()
        .into_iter()
        .map(|c| c.and_then(|c| c.container_id().map(str::to_owned)))
        .collect();
    let expected: Vec<Option<String>> = results.iter().map(|(_, id, _)| Some(id.clone())).collect();
    assert_eq!(identified, expected);
    assert_eq!(
        scene.sim_requests(),
        Vec::<String>::new(),
        "nothing reached IMDS"
    );
}

/// `imds-proxy run` on the test listen addresses; returns once it says it is serving.
/// A proxy process, killed if the test ends without stopping it (a failed assertion must not
/// leave it holding the test listen addresses).
struct Spawned(Child);

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_proxy(cgroup: &Path, pin: &Path) -> (Spawned, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(proxy_bin())
        .args(["run", "--cgroup"])
        .arg(cgroup)
        .arg("--pin")
        .arg(pin)
        .args([
            "--listen",
            &LISTEN_V4.to_string(),
            "--listen",
            &LISTEN_V6.to_string(),
        ])
        .args(["--interface", TEST_IF])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stdout = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            // Record first, then signal: the test reads the log as soon as it is signalled.
            let serving = line.contains("serving");
            sink.lock().unwrap().push(line);
            if serving {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(20)).is_err() {
        let _ = child.kill();
        panic!("imds-proxy did not start: {:#?}", lines.lock().unwrap());
    }
    (Spawned(child), lines)
}

/// Entries in the pinned record maps: (pending, established).
fn pinned_record_counts(pin: &Path) -> (usize, usize) {
    use aya::maps::{HashMap, Map, MapData};
    use imds_common::{ConnKey, ConnRecord};
    let open = |name: &str| Map::LruHashMap(MapData::from_pin(pin.join(name)).unwrap());
    let pending = HashMap::<_, u64, ConnRecord>::try_from(open("IMDS_PENDING")).unwrap();
    let conns = HashMap::<_, ConnKey, ConnRecord>::try_from(open("IMDS_CONNS")).unwrap();
    (pending.keys().count(), conns.keys().count())
}

#[test]
fn a_killed_pinned_proxy_fails_closed_restarts_and_detaches_cleanly() {
    let scene = scene();
    let loaded_before = KernelObjects::now();
    let parent = TestCgroup::new("imds-test-pin").unwrap();
    let container = parent.child("c1").unwrap();
    let pin = PathBuf::from("/sys/fs/bpf/imds-test-pin");
    let _ = std::fs::remove_dir_all(&pin);

    let (mut proxy, _) = spawn_proxy(parent.path(), &pin);
    let served = probe(container.path(), None, imds_v4(), 1);
    assert_eq!(served[0]["server"], "imds-proxy", "{}", served[0]);

    proxy.kill().unwrap(); // SIGKILL: no cleanup of any kind
    proxy.wait().unwrap();
    // What the simulator saw until now came from the proxy itself (region, pass-through).
    let before = scene.sim_requests();
    let dead = probe(container.path(), None, imds_v4(), 3);
    for r in &dead {
        assert_eq!(r["kind"], "ConnectionRefused", "fails closed: {r}");
    }
    assert_eq!(
        scene.sim_requests(),
        before,
        "the container never reached IMDS"
    );
    // The refused sockets closed: their records went with them.
    assert_eq!(
        pinned_record_counts(&pin),
        (0, 0),
        "records left after refused connects"
    );

    let (mut proxy, log) = spawn_proxy(parent.path(), &pin);
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("adopted_links=6")),
        "the restarted proxy adopted the pinned links: {:#?}",
        log.lock().unwrap()
    );
    let restored = probe(container.path(), None, imds_v4(), 1);
    assert_eq!(restored[0]["server"], "imds-proxy", "{}", restored[0]);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(proxy.wait().unwrap().success());
    let still_closed = probe(container.path(), None, imds_v4(), 1);
    assert_eq!(
        still_closed[0]["kind"], "ConnectionRefused",
        "pinned: stays closed after a graceful stop"
    );

    detach(&pin);
    assert!(!pin.exists(), "pins removed");
    assert!(!netdev::exists(TEST_IF), "interface removed");
    // The kernel frees detached programs and their maps asynchronously: wait for it, bounded.
    assert_eq!(
        wait_kernel_objects_gone(&loaded_before),
        Vec::<String>::new()
    );
    // Detached: the container now reaches the (simulated) IMDS directly.
    let before = scene.sim_requests().len();
    let direct = probe(container.path(), None, imds_v4(), 1);
    assert_eq!(
        direct[0]["server"],
        serde_json::Value::Null,
        "{}",
        direct[0]
    );
    assert_eq!(scene.sim_requests().len(), before + 1);
}

#[test]
fn a_direct_connection_to_the_listen_address_gets_403() {
    let _scene = scene();
    let parent = TestCgroup::new("imds-test-direct").unwrap();
    let pin = PathBuf::from("/sys/fs/bpf/imds-test-direct");
    let _ = std::fs::remove_dir_all(&pin);
    let (mut proxy, _) = spawn_proxy(parent.path(), &pin);
    for addr in [SocketAddr::V4(LISTEN_V4), SocketAddr::V6(LISTEN_V6)] {
        assert!(
            matches!(addr.ip(), IpAddr::V4(ip) if ip.is_link_local()) || addr.is_ipv6(),
            "only local test addresses"
        );
        let r = Request::get("/latest/meta-data/iam/security-credentials/")
            .send(addr)
            .unwrap();
        assert_eq!((r.status, r.text().as_str()), (403, "Forbidden"), "{addr}");
    }
    proxy.kill().unwrap();
    proxy.wait().unwrap();
    detach(&pin);
}

const SCOPE_ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const LATE_ID: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

/// Docker's systemd cgroup driver: containers are docker-<id>.scope beside host services.
#[test]
fn filter_mode_redirects_container_scopes_and_passes_host_services() {
    let scene = scene();
    let slice = TestCgroup::new("imds-test-system.slice").unwrap();
    let scope = slice.child(&format!("docker-{SCOPE_ID}.scope")).unwrap();
    let service = slice.child("sshd.service").unwrap();
    let proxy = TestProxy::start_filtered(slice.path(), true);

    let redirected = probe(scope.path(), None, imds_v4(), 1);
    assert_eq!(redirected[0]["body"], SCOPE_ID, "{}", redirected[0]);
    let host = probe(service.path(), None, imds_v4(), 1);
    assert_eq!(
        host[0]["server"],
        serde_json::Value::Null,
        "passed to IMDS: {}",
        host[0]
    );
    assert_eq!(scene.sim_requests().len(), 1);

    // Created after the start: the watcher classifies them. Until it has, the kernel sends
    // their IMDS connects to the proxy (never to IMDS); wait, bounded, for the classification.
    let late_scope = slice.child(&format!("docker-{LATE_ID}.scope")).unwrap();
    let late_service = slice.child("cron.service").unwrap();
    let redirect = proxy.redirect.clone().unwrap();
    let settle = |cgroup: &TestCgroup| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while redirect.classification(cgroup.id()).is_none() {
            assert!(
                Instant::now() < deadline,
                "{} never classified",
                cgroup.relative()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        probe(cgroup.path(), None, imds_v4(), 1).remove(0)
    };
    let r = settle(&late_scope);
    assert_eq!(r["body"], LATE_ID, "{r}");
    let sim_before = scene.sim_requests().len();
    let r = settle(&late_service);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["server"], serde_json::Value::Null, "{r}");
    assert_eq!(
        scene.sim_requests().len(),
        sim_before + 1,
        "only the service reached IMDS"
    );
    let identified: Vec<Option<String>> = proxy
        .callers()
        .into_iter()
        .map(|c| c.as_ref().and_then(named_container))
        .collect();
    assert_eq!(
        identified,
        [Some(SCOPE_ID.to_owned()), Some(LATE_ID.to_owned())]
    );
}

/// A cgroup the filter has not classified yet (created a moment ago) goes to the proxy, which
/// decides once it knows: never to the instance's IMDS, and not refused either (a Job's first
/// request succeeds).
#[test]
fn filter_mode_sends_cgroups_not_classified_yet_to_the_proxy() {
    let scene = scene();
    let slice = TestCgroup::new("imds-test-unclassified.slice").unwrap();
    let scope = slice.child(&format!("docker-{SCOPE_ID}.scope")).unwrap();
    let service = slice.child("sshd.service").unwrap();
    // No feed: nothing below the attach point is classified.
    let proxy = TestProxy::start_filtered(slice.path(), false);
    for cgroup in [&scope, &service] {
        let r = probe(cgroup.path(), None, imds_v4(), 1);
        assert_eq!(r[0]["server"], "imds-test-proxy", "redirected: {}", r[0]);
    }
    assert_eq!(
        scene.sim_requests(),
        Vec::<String>::new(),
        "nothing reached IMDS"
    );
    let identified: Vec<Option<String>> = proxy
        .callers()
        .into_iter()
        .map(|c| c.as_ref().map(identity_of))
        .collect();
    assert_eq!(
        identified,
        [Some(SCOPE_ID.to_owned()), Some(service.relative())]
    );
}

/// Events lost (the inotify queue overflowed) are made up by walking the tree again: every cgroup
/// created while the queue was full is classified. The premise, asserted: the queue overflowed.
#[test]
fn an_inotify_overflow_walks_the_cgroup_tree_again() {
    let slice = TestCgroup::new("imds-test-overflow.slice").unwrap();
    let proxy = TestProxy::start_filtered(slice.path(), false);
    let redirect = proxy.redirect.clone().unwrap();
    let feed = {
        // The queue's size is taken when the inotify instance is made.
        let _small = imds_tests::kernel::Sysctl::set("fs.inotify.max_queued_events", "16").unwrap();
        filter_feed(&redirect, Default::default(), slice.path())
    };
    let rewalks = feed.rewalks();
    // 64 cgroups while nothing reads the queue: it overflows.
    let children: Vec<TestCgroup> = (0..64)
        .map(|i| slice.child(&format!("docker-{i:064x}.scope")).unwrap())
        .collect();
    std::thread::spawn(move || feed.run());
    let deadline = Instant::now() + Duration::from_secs(10);
    let unclassified = || {
        children
            .iter()
            .filter(|c| redirect.classification(c.id()) != Some(true))
            .count()
    };
    while unclassified() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        unclassified(),
        0,
        "every cgroup is classified a container's"
    );
    assert!(
        rewalks.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "premise: the queue overflowed and the tree was walked again"
    );
}

/// A pinned classification map outlives the proxy; entries of cgroups removed while no proxy
/// ran are swept when one starts.
#[test]
fn classifications_of_removed_cgroups_are_swept() {
    let slice = TestCgroup::new("imds-test-sweep.slice").unwrap();
    let live = slice.child("live.service").unwrap();
    let proxy = TestProxy::start_filtered(slice.path(), false);
    let redirect = proxy.redirect.clone().unwrap();
    // As a previous run left them: one for a cgroup long gone, one for a live one.
    let gone_id = u64::MAX - 7;
    redirect.classify_cgroup(gone_id, false).unwrap();
    redirect.classify_cgroup(live.id(), false).unwrap();
    let feed = filter_feed(&redirect, Default::default(), slice.path());
    let ids: std::collections::HashSet<u64> = feed.ids().collect();
    assert!(ids.contains(&live.id()));
    assert_eq!(redirect.sweep_classified(&ids), 1);
    assert_eq!(redirect.classification(gone_id), None);
    assert_eq!(
        redirect.classification(live.id()),
        Some(true),
        "reclassified by the walk (not under system.slice: a container's)"
    );
}
