//! Unit tests of [`super`].
use super::*;

/// The tests read the process environment, and one of them sets it: one at a time.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn parse(args: &[&str]) -> Result<Config, ConfigError> {
    RunArgs::parse_layered(args.iter().copied()).and_then(RunArgs::validate)
}

/// What the layers said, raw, once the whole is valid: for the tests of parsing.
fn parse_args(args: &[&str]) -> Result<RunArgs, ConfigError> {
    let parsed = RunArgs::parse_layered(args.iter().copied())?;
    parsed.clone().validate()?;
    Ok(parsed)
}

/// The runtime flags as parsed, not validated (the conflicts are the endpoint's to find).
fn runtime(args: &[&str]) -> Runtime {
    let a = RunArgs::parse_layered(args.iter().copied()).unwrap();
    Runtime {
        name: a.runtime,
        docker_host: a.docker_host,
        cri_endpoint: a.cri_endpoint,
        cri_poll: a.cri_poll,
    }
}

#[test]
fn defaults_are_documented_values() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let c = parse_args(&[]).unwrap();
    assert_eq!(c.network.ops_listen.to_string(), "127.0.0.1:9181");
    assert_eq!(c.imds.upstream, "http://169.254.169.254");
    assert_eq!(c.sts.session_duration, 3600);
    assert_eq!(c.sts.refresh_before, Duration::from_secs(300));
    assert!(
        c.imds.require_imdsv2.is_none() && !c.imds.allow_user_data,
        "IMDSv2 as upstream"
    );
    assert_eq!(c.network.listen.len(), 2);
}

#[test]
fn errors_name_the_key() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let err = |args: &[&str]| parse(args).unwrap_err();
    assert_eq!(err(&["--session-duration", "60"]).key, "session-duration");
    assert_eq!(err(&["--session-duration", "abc"]).key, "session-duration");
    assert_eq!(err(&["--refresh-before", "2h"]).key, "refresh-before");
    assert_eq!(err(&["--upstream", "ftp://x"]).key, "upstream");
    assert_eq!(
        err(&["--role-arn-prefix", "arn:aws:s3:::bucket"]).key,
        "role-arn-prefix"
    );
    assert_eq!(err(&["--allowed-roles", ""]).key, "allowed-roles");
    assert_eq!(err(&["--listen", "127.0.0.1:80"]).key, "listen");
    assert_eq!(err(&["--region", "US East"]).key, "region");
    assert_eq!(err(&["--docker-host", "tcp://x:2375"]).key, "docker-host");
    assert_eq!(err(&["--no-such-flag"]).key, "no-such-flag");
    // Netlink filters cannot be adopted by a restarted proxy: pinning needs TCX.
    let netlink_pin = err(&[
        "--mode",
        "tc",
        "--tc-attach",
        "netlink",
        "--pin",
        "/sys/fs/bpf/x",
    ]);
    assert_eq!(netlink_pin.key, "pin", "{netlink_pin}");
    assert_eq!(
        err(&["--mode", "tc", "--cgroup", "/sys/fs/cgroup"]).key,
        "cgroup"
    );
    assert_eq!(
        err(&["--container-iface", "docker0"]).key,
        "container-iface"
    );
    // kube2iam's `--host-interface eni+`, carried over: said in words, with the pattern meant.
    let iptables = err(&["--mode", "tc", "--container-iface", "eni+"]);
    assert_eq!(iptables.key, "container-iface");
    assert!(iptables.reason.contains(r#""eni*""#), "{iptables}");
    let outside = err(&[
        "--role-arn-prefix",
        "arn:aws:iam::123456789012:role/containers/",
        "--default-role",
        "arn:aws:iam::123456789012:role/admin",
    ]);
    assert_eq!(outside.key, "default-role");
    assert!(outside.reason.contains("not under"), "{outside}");
}

#[test]
fn the_engine_socket_is_given_or_the_runtime_s_usual_one() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let none = |_: &str| false;
    let podman_only = |p: &str| p == "/run/podman/podman.sock";
    let containerd_only = |p: &str| p == "/run/containerd/containerd.sock";
    let crio_only = |p: &str| p == "/var/run/crio/crio.sock";
    let both = |_: &str| true;
    let docker = |s: &str| Ok(Endpoint::DockerApi(s.to_owned()));
    let cri = |s: &str| Ok(Endpoint::Cri(s.to_owned()));
    assert_eq!(
        runtime(&["--docker-host", "unix:///x.sock"]).endpoint(none),
        docker("unix:///x.sock")
    );
    assert_eq!(
        runtime(&["--runtime", "podman"]).endpoint(none),
        docker("unix:///run/podman/podman.sock")
    );
    assert_eq!(
        runtime(&["--runtime", "docker"]).endpoint(none),
        docker("unix:///var/run/docker.sock")
    );
    // auto: Docker's first, then Podman's, then the CRI runtimes'; none is a clear error.
    assert_eq!(
        runtime(&[]).endpoint(both),
        docker("unix:///var/run/docker.sock")
    );
    assert_eq!(
        runtime(&[]).endpoint(podman_only),
        docker("unix:///run/podman/podman.sock")
    );
    assert_eq!(
        runtime(&[]).endpoint(containerd_only),
        cri("unix:///run/containerd/containerd.sock")
    );
    let err = runtime(&[]).endpoint(none).unwrap_err();
    assert_eq!(err.key, "runtime");
    assert!(err.reason.contains("/run/podman/podman.sock"), "{err}");
    assert!(err.reason.contains("crio.sock"), "{err}");
    // cri: the endpoint, else containerd's or CRI-O's usual socket.
    assert_eq!(
        runtime(&["--cri-endpoint", "unix:///c.sock"]).endpoint(none),
        cri("unix:///c.sock")
    );
    assert_eq!(
        runtime(&["--runtime", "cri"]).endpoint(crio_only),
        cri("unix:///var/run/crio/crio.sock")
    );
    assert_eq!(
        runtime(&["--runtime", "cri"])
            .endpoint(none)
            .unwrap_err()
            .key,
        "runtime"
    );
    // One runtime at a time, and each flag for its own API.
    for (a, key) in [
        (
            &["--docker-host", "unix:///a", "--cri-endpoint", "unix:///b"][..],
            "cri-endpoint",
        ),
        (
            &["--runtime", "cri", "--docker-host", "unix:///a"],
            "docker-host",
        ),
        (
            &["--runtime", "docker", "--cri-endpoint", "unix:///b"],
            "cri-endpoint",
        ),
    ] {
        assert_eq!(runtime(a).endpoint(both).unwrap_err().key, key, "{a:?}");
        assert_eq!(parse(a).unwrap_err().key, key, "said at validation: {a:?}");
    }
    assert_eq!(
        parse(&["--cri-endpoint", "/run/containerd/containerd.sock"])
            .unwrap_err()
            .key,
        "cri-endpoint"
    );
    assert_eq!(parse(&["--runtime", "cri-o"]).unwrap_err().key, "runtime");
}

#[test]
fn namespace_allowed_roles_are_namespace_equals_glob() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let c = parse(&[
        "--namespace-allowed-roles",
        "team-a=arn:aws:iam::*:role/a-*,team-a=arn:aws:iam::*:role/shared",
        "--namespace-allowed-roles",
        "team-b=*",
    ])
    .unwrap();
    assert_eq!(c.roles.policy.namespaces.len(), 2);
    assert_eq!(c.roles.policy.namespaces["team-a"].len(), 2);
    for bad in ["team-a", "=x", "Team=x", "-a=x", "a=", "a b=x"] {
        let err = parse(&[&format!("--namespace-allowed-roles={bad}")]).unwrap_err();
        assert_eq!(err.key, "namespace-allowed-roles", "{bad:?}");
    }
}

/// `deploy/systemd/config.toml` is a valid configuration as shipped, and so is its tc variant
/// (the commented tc lines uncommented): pinned, with the prefix and the allow-list.
#[test]
fn the_shipped_config_file_is_valid() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd/config.toml");
    let c = parse_args(&["--config", shipped]).unwrap();
    assert_eq!(
        c.redirect.pin.as_deref(),
        Some(std::path::Path::new("/sys/fs/bpf/imds-proxy"))
    );
    assert_eq!(
        c.roles.role_arn_prefix.as_deref(),
        Some("arn:aws:iam::123456789012:role/containers/")
    );
    assert_eq!(c.roles.allowed_roles.len(), 1);
    assert_eq!(c.redirect.mode, ModeName::Cgroup);

    let text = std::fs::read_to_string(shipped).unwrap();
    let tc_lines = ["# mode = \"tc\"", "# container-iface = [\"docker0\"]"];
    for line in tc_lines {
        assert!(text.contains(line), "the tc example: {line}");
    }
    let tc = tc_lines
        .iter()
        .fold(text.clone(), |t, line| t.replace(line, &line[2..]));
    let dir = std::env::temp_dir().join(format!("imds-proxy-shipped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.toml");
    std::fs::write(&file, tc).unwrap();
    let c = parse_args(&["--config", file.to_str().unwrap()]).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(c.redirect.mode, ModeName::Tc);
    assert_eq!(c.redirect.container_ifaces, ["docker0"]);
}

#[test]
fn flags_override_environment_override_file() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("imds-proxy-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.toml");
    std::fs::write(
        &file,
        "default-role = \"FromFile\"\nregion = \"eu-west-1\"\nsession-duration = 1800\n\
         role-arn-prefix = \"arn:aws:iam::123456789012:role/c/\"\n\
         require-imdsv2 = true\nallowed-roles = [\"arn:aws:iam::*:role/c/*\", \"arn:aws:iam::*:role/b\"]\n",
    )
    .unwrap();
    let file_arg = file.to_str().unwrap();
    // SAFETY: the ENV lock keeps every other test that reads the environment waiting.
    unsafe {
        std::env::set_var("IMDS_PROXY_REGION", "us-west-2");
        std::env::set_var("IMDS_PROXY_SESSION_DURATION", "2400");
    }
    let c = parse_args(&["--config", file_arg, "--session-duration", "1200"]);
    unsafe {
        std::env::remove_var("IMDS_PROXY_REGION");
        std::env::remove_var("IMDS_PROXY_SESSION_DURATION");
    }
    let c = c.unwrap();
    assert_eq!(
        c.roles.default_role.as_deref(),
        Some("FromFile"),
        "file only"
    );
    assert_eq!(c.sts.region.as_deref(), Some("us-west-2"), "env over file");
    assert_eq!(c.sts.session_duration, 1200, "flag over env and file");
    assert_eq!(c.imds.require_imdsv2, Some(true));
    assert_eq!(c.roles.allowed_roles.len(), 2);
    std::fs::write(&file, "require-imdsv2 = false\n").unwrap();
    let c = parse_args(&["--config", file_arg]).unwrap();
    assert_eq!(
        c.imds.require_imdsv2,
        Some(false),
        "false in a file is not the default"
    );
    assert_eq!(
        parse(&["--require-imdsv2"]).unwrap().imds.require_imdsv2,
        Some(true)
    );
    assert_eq!(
        parse(&["--require-imdsv2", "false"])
            .unwrap()
            .imds
            .require_imdsv2,
        Some(false)
    );
    assert_eq!(
        parse(&["--require-imdsv2=maybe"]).unwrap_err().key,
        "require-imdsv2"
    );

    std::fs::write(&file, "defualt-role = \"typo\"\n").unwrap();
    let typo = parse(&["--config", file_arg]).unwrap_err();
    assert_eq!(typo.key, "defualt-role");
    std::fs::write(&file, "session-duration = [1]\n").unwrap();
    assert_eq!(
        parse(&["--config", file_arg]).unwrap_err().key,
        "session-duration"
    );
    std::fs::write(&file, "not toml = = =\n").unwrap();
    assert!(
        parse(&["--config", file_arg])
            .unwrap_err()
            .key
            .starts_with("config")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn session_tags_are_on_by_default_and_checked_at_start() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let tags = parse(&[]).unwrap().sts.tags;
    assert!(tags.enabled && !tags.source_identity);
    let c = parse(&[
        "--session-tag",
        "team=payments,env=prod",
        "--transitive-tag-key",
        "team",
        "--source-identity",
        "on",
    ])
    .unwrap();
    assert!(c.sts.tags.source_identity);
    let err = |args: &[&str]| parse(args).unwrap_err();
    let e = err(&["--session-tag", "kubernetes-namespace=x"]);
    assert_eq!(e.key, "session-tag");
    assert!(e.reason.contains("one the proxy sets"), "{}", e.reason);
    assert_eq!(err(&["--session-tag", "novalue"]).key, "session-tag");
    assert_eq!(err(&["--transitive-tag-key", "nope"]).key, "session-tag");
    assert_eq!(
        err(&["--session-tags", "off", "--session-tag", "team=a"]).key,
        "session-tag"
    );
    let off = parse(&["--session-tags", "off", "--source-identity", "on"]).unwrap();
    assert!(!off.sts.tags.enabled && off.sts.tags.source_identity);
}
