//! Podman (`--runtime podman`): the proxy follows a real `podman system service` through its
//! Docker-compatible API, and Podman's containers (cgroups `libpod_parent/libpod-<id>`, the CNI
//! bridge `cni-podman0`) get their own roles in both modes: a Rust SDK client and the seed's
//! curl flow, with the role from a label or from `IAM_ROLE`, and never another container's.
use imds_tests::{
    containers::{assert_own_role_only, assumed_role, containers_scene, own_role_flow},
    images::{curl_image, whoami_image},
    podman::{self, Container, Service, podman},
    proxy::{Mode, Proxy},
    scene::ensure_imds_is_simulated,
};

imds_tests::per_mode! { podman_containers_get_their_own_roles => podman_containers_get_their_own_roles_in; }

fn podman_containers_get_their_own_roles_in(mode: Mode) {
    let scene = containers_scene(env!("CARGO_BIN_EXE_imds-sim"));
    let _service = Service::start();
    let curl = podman::image_from_docker(curl_image().unwrap());
    let whoami = podman::image_from_docker(
        whoami_image(env!("CARGO_BIN_EXE_imds-whoami").as_ref()).unwrap(),
    );
    let host = podman::host();
    let mut extra = vec!["--runtime", "podman", "--docker-host", &host];
    if mode == Mode::Tc {
        extra.extend(["--container-iface", "cni-podman0"]);
    }
    let proxy = Proxy::start_in(&scene, mode, &extra);
    proxy.wait_for_log(&[
        "container runtime",
        "runtime=podman",
        "cgroup_driver=cgroupfs",
    ]);

    // Two containers: the role from a label, and from the environment.
    let a = Container::start(&curl, &["--label", "iam.amazonaws.com/role=PodmanA"]);
    let b = Container::start(&curl, &["-e", "IAM_ROLE=PodmanB"]);
    if mode == Mode::Tc {
        // Podman makes its bridge with its first container; it is attached when it appears.
        proxy.wait_for_log(&["redirect attached to container interface", "cni-podman0"]);
    }
    for (container, own, other) in [(&a, "PodmanA", "PodmanB"), (&b, "PodmanB", "PodmanA")] {
        let out = container.exec(&own_role_flow(other));
        assert_own_role_only(&scene, &out, own, other, &container.name(), &|| proxy.log());
    }

    // Podman's `remove` event (Docker says `destroy`): a removed container is forgotten, and
    // its prefetched session with it.
    let destroyed = || proxy.counted("imds_proxy_container_events_total{event=\"destroyed\"}");
    let before = destroyed();
    podman::podman_ok(&["rm", "-f", "-t", "0", &a.0]).unwrap();
    proxy.wait_for_log(&["forgotten", &a.0]);
    assert_eq!(destroyed(), before + 1, "announced as destroyed");

    // A real SDK client (aws-config's default chain, then STS).
    ensure_imds_is_simulated().unwrap();
    let endpoint = format!(
        "AWS_ENDPOINT_URL_STS=http://{}",
        scene.sts_endpoint().unwrap()
    );
    let mut args = vec!["run", "--rm", "--name", "imds-podman-sdk"];
    args.extend(podman::LIMITS);
    args.extend([
        "-e",
        &endpoint,
        "--label",
        "iam.amazonaws.com/role=PodmanSdk",
        &whoami,
    ]);
    let out = podman(&args);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        assumed_role("PodmanSdk", "imds-podman-sdk"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The premise: the proxy saw these callers as Podman's containers (kernel records in cgroup
    // mode, addresses on Podman's bridge in tc mode), through its Docker-compatible API.
    let vended = proxy
        .log()
        .iter()
        .filter(|l| l.contains("credentials vended"))
        .count();
    assert!(vended >= 3, "{:#?}", proxy.log());
}
