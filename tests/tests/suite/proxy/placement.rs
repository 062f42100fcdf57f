//! Containers wherever their cgroup is: on the host's network, outside Docker's parent cgroup, in a
//! slice shared with host services, and inside another container's cgroup.
use super::*;

/// A host-network container's IMDS traffic never crosses a container interface: cgroup mode
/// redirects it like any other; tc mode covers it with the cgroup programs in the host's network
/// namespace. Either way it gets its own role, never the instance's, in both address forms.
fn a_host_network_container_gets_its_own_role_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let _proxy = Proxy::start_in(&scene, mode, &[]);
    let host = [
        "--network",
        "host",
        "--label",
        "iam.amazonaws.com/role=HostNet",
    ];
    assert_gets_role(&scene, &host, "HostNet");
    assert_gets_role_with(&scene, &host, "HostNet", &sdk_flow_v4_mapped());
    // A bridged one through the v4-mapped form as well.
    let bridged = ["--label", "iam.amazonaws.com/role=Bridged"];
    assert_gets_role_with(&scene, &bridged, "Bridged", &sdk_flow_v4_mapped());
}

#[test]
fn a_host_network_container_gets_its_own_role_in_cgroup_mode() {
    a_host_network_container_gets_its_own_role_in(Mode::Cgroup);
}

#[test]
fn a_host_network_container_gets_its_own_role_in_tc_mode() {
    a_host_network_container_gets_its_own_role_in(Mode::Tc);
}

/// A container whose runner put its cgroup outside Docker's default parent
/// (`--cgroup-parent=/elsewhere`) is still redirected and gets its own role: by default the
/// programs attach at the v2 root. With a narrower attach point given by hand, such a container
/// is reported (an error and a count) as soon as it starts.
#[test]
fn a_container_outside_dockers_parent_cgroup_is_covered() {
    let scene = sim_host(HttpTokens::Optional);
    let elsewhere = [
        "--cgroup-parent",
        "/imds-test-elsewhere",
        "--label",
        "iam.amazonaws.com/role=Elsewhere",
    ];
    {
        let proxy = Proxy::start(&scene, &[]);
        assert_gets_role(&scene, &elsewhere, "Elsewhere");
        assert_eq!(proxy.metric("imds_proxy_uncovered_containers_total"), 0);
    }
    let root = imds_tests::kernel::cgroup2_root().unwrap();
    let docker_parent = root.join("docker");
    std::fs::create_dir_all(&docker_parent).unwrap();
    let proxy = Proxy::start(&scene, &["--cgroup", docker_parent.to_str().unwrap()]);
    let name = format!("imds-test-{}", rand_suffix());
    let mut run = vec!["run", "-d", "--name", &name];
    run.extend_from_slice(&elsewhere);
    run.extend_from_slice(&[curl_image().unwrap(), "sleep", "60"]);
    docker_ok(&run).unwrap();
    proxy.wait_for_log(&["outside every attach point", "imds-test-elsewhere"]);
    assert_eq!(proxy.metric("imds_proxy_uncovered_containers_total"), 1);
    docker_ok(&["rm", "-f", &name]).unwrap();
}

/// Docker's systemd driver puts containers beside the host's own services
/// (`system.slice/docker-<id>.scope` next to `sshd.service`). Attached at such a slice,
/// `--cgroup-filter` redirects the containers and leaves the services alone. Through the binary,
/// with the same layout built with the cgroupfs driver (`--cgroup-parent` a slice; systemd is
/// not PID 1 on these machines, so Docker cannot run its systemd driver here): a container and a
/// host service share one slice.
#[test]
fn a_slice_shared_by_containers_and_host_services_is_filtered() {
    let scene = sim_host(HttpTokens::Optional);
    let slice = TestCgroup::new("imds-test.slice").unwrap();
    let service = slice.child("host-daemon.service").unwrap();
    let attach = slice.path().to_str().unwrap();
    let in_slice = [
        "--cgroup-parent",
        "/imds-test.slice",
        "--label",
        "iam.amazonaws.com/role=Sliced",
    ];
    // What the host service gets for the instance's role name.
    let service_asks = || -> serde_json::Value {
        ensure_imds_is_simulated().unwrap();
        let mut probe = Command::new(env!("CARGO_BIN_EXE_imds-probe"));
        probe.args(["--path", "/latest/meta-data/iam/security-credentials/"]);
        place(&mut probe, service.path(), None).unwrap();
        let out = probe.output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(line.lines().next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    {
        let proxy = Proxy::start(
            &scene,
            &[
                "--cgroup",
                attach,
                "--cgroup-filter",
                "--host-cgroup",
                "/imds-test.slice/*.service",
            ],
        );
        assert_gets_role(&scene, &in_slice, "Sliced");
        let answer = service_asks();
        assert_eq!(
            (&answer["status"], &answer["body"], &answer["server"]),
            (
                &serde_json::json!(200),
                &serde_json::json!("InstanceRole"),
                &serde_json::Value::Null
            ),
            "the host service reaches the instance's IMDS itself: {answer}"
        );
        proxy.wait_for_log(&["filter mode: cgroups classified", "imds-test.slice"]);
    }
    // Without the filter every socket below the attach point is a container's: the host service
    // is redirected too, and (no container) has no role.
    let _proxy = Proxy::start(&scene, &["--cgroup", attach]);
    let answer = service_asks();
    assert_eq!(answer["server"], "imds-proxy", "{answer}");
    assert_eq!(answer["status"], 404, "{answer}");
}

/// `docker run --cgroup-parent=/docker/<victim>` puts a new container's cgroup inside the
/// victim's (`/docker/<victim>/<new>`): it is identified as itself, never as the victim. And a
/// container cannot pass for another by its cgroup's name alone: the id must be where Docker put
/// that container.
#[test]
fn a_container_inside_another_ones_cgroup_is_not_that_one() {
    let scene = sim_host(HttpTokens::Optional);
    let _proxy = Proxy::start(&scene, &["--default-role", "DefaultRole"]);
    let victim = Running::start(&["--label", "iam.amazonaws.com/role=Victim"]);
    assert_eq!(
        get_credentials(&victim, "Victim").0,
        200,
        "the victim's own role"
    );
    let parent = format!("--cgroup-parent=/docker/{}", victim.0);
    let intruder = Running::start(&[&parent]);
    // The premise: the intruder's cgroup is inside the victim's.
    let cgroup = intruder.exec("cat /proc/self/cgroup");
    assert!(
        cgroup.contains(&format!("0::/docker/{}/{}", victim.0, intruder.0)),
        "{cgroup}"
    );
    let role = intruder.exec(
        "curl -s -w '\n== %{http_code}\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    );
    assert_eq!(
        answers(&role).pop(),
        Some((200, "DefaultRole".to_owned())),
        "its own (default) role, not the victim's: {role}"
    );
    assert_eq!(get_credentials(&intruder, "Victim").0, 404);
}
