//! The systemd units: they verify, and their capabilities are enough in both modes.
use super::*;

/// `deploy/systemd/imds-proxy.service`, as shipped.
fn systemd_unit() -> String {
    deployed("systemd/imds-proxy.service")
}

/// A file of `deploy/`, as shipped.
fn deployed(path: &str) -> String {
    let full = format!("{}/../deploy/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|err| panic!("{full}: {err}"))
}

/// The one value of `key=` in the unit.
fn unit_value(unit: &str, key: &str) -> String {
    let values: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect();
    assert_eq!(values.len(), 1, "{key}= in the unit: {values:?}");
    values[0].trim().to_owned()
}

/// systemd's own check of the units: no unknown key, no key in the wrong section, a valid
/// command line. The binary they name is the one built here (the check wants it to exist). The
/// proxy's unit starts before the runtimes and says when it is ready (it attaches before it asks
/// the engine anything); the gate's runs before them too, and pins where the DaemonSet's proxy
/// pins, so that the proxy adopts what the gate attached.
#[test]
fn the_systemd_units_verify() {
    let unit = systemd_unit();
    assert_eq!(
        unit_value(&unit, "ExecStart"),
        "/usr/local/bin/imds-proxy run --config /etc/imds-proxy/config.toml"
    );
    let gate = deployed("systemd/imds-proxy-gate.service");
    assert_eq!(
        unit_value(&gate, "ExecStart"),
        "/usr/local/bin/imds-proxy gate --pin /sys/fs/bpf/imds-proxy"
    );
    assert!(deployed("kubernetes/daemonset.yaml").contains("- --pin=/sys/fs/bpf/imds-proxy\n"));
    // Fail closed across stops and crashes (README): restarted after a second, forever; pinned by
    // its config; nothing run at stop that could detach; room for every container's connections.
    assert_eq!(unit_value(&unit, "Restart"), "always");
    assert_eq!(unit_value(&unit, "RestartSec"), "1");
    assert_eq!(unit_value(&unit, "StartLimitIntervalSec"), "0");
    let at_stop: Vec<&str> = unit
        .lines()
        .filter(|l| l.trim_start().starts_with("ExecStop"))
        .collect();
    assert!(at_stop.is_empty(), "nothing runs at stop: {at_stop:?}");
    assert!(
        unit_value(&unit, "LimitNOFILE").parse::<u64>().unwrap() >= 65536,
        "LimitNOFILE"
    );
    assert!(
        deployed("systemd/config.toml")
            .lines()
            .any(|l| l.trim() == r#"pin = "/sys/fs/bpf/imds-proxy""#),
        "the unit's config pins the redirect"
    );
    for unit in [&unit, &gate] {
        assert_eq!(unit_value(unit, "Type"), "notify");
        let before = unit_value(unit, "Before");
        for runtime in ["docker.service", "containerd.service", "kubelet.service"] {
            assert!(before.split_whitespace().any(|u| u == runtime), "{before}");
        }
    }
    let dir = std::env::temp_dir().join(format!("imds-test-unit-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = [
        ("imds-proxy.service", &unit),
        ("imds-proxy-gate.service", &gate),
    ]
    .map(|(name, text)| {
        let file = dir.join(name);
        std::fs::write(
            &file,
            text.replace("/usr/local/bin/imds-proxy", proxy_bin().to_str().unwrap()),
        )
        .unwrap();
        file
    });
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .current_dir(&dir)
        .output()
        .expect("systemd-analyze (setup installs systemd)");
    std::fs::remove_dir_all(&dir).unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // Lines about the host's own units (none is running here) are not the units'.
    let about_ours: Vec<&str> = said.lines().filter(|l| l.contains("imds-proxy")).collect();
    assert!(
        out.status.success() && about_ours.is_empty(),
        "systemd-analyze verify: {:?}\n{said}",
        out.status
    );
}

imds_tests::per_mode! { the_systemd_unit_s_capabilities_are_enough => the_systemd_unit_s_capabilities_are_enough_in; }

/// The unit's `CapabilityBoundingSet=` and `NoNewPrivileges=`, applied with `setpriv` as systemd
/// would: the proxy runs with those capabilities and no others, and a container gets its role.
fn the_systemd_unit_s_capabilities_are_enough_in(mode: Mode) {
    let unit = systemd_unit();
    assert_eq!(unit_value(&unit, "NoNewPrivileges"), "yes");
    let caps: Vec<String> = unit_value(&unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("{c}"))
                .to_lowercase()
        })
        .collect();
    assert!(!caps.is_empty());
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start_wrapped(
        &scene,
        mode,
        &[],
        &[],
        &[
            "setpriv",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set",
            &bounding,
            "--",
        ],
    );
    // The premise: it runs confined, with exactly as many capabilities as the unit names.
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let field = |name: &str| {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {status}"));
        u64::from_str_radix(hex.trim(), 16).unwrap()
    };
    assert_eq!(
        field("CapBnd:").count_ones() as usize,
        caps.len(),
        "{status}"
    );
    assert_eq!(field("CapEff:"), field("CapBnd:"), "{status}");
    assert_eq!(field("NoNewPrivs:"), 1, "{status}");

    let container = Running::start(&["--label", "iam.amazonaws.com/role=Confined"]);
    let (status, body) = get_credentials(&container, "Confined");
    assert_eq!(status, 200, "{body}\n{:#?}", proxy.log());
    let creds: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(caller_arn(&scene, &creds).contains(":assumed-role/Confined/"));
}
