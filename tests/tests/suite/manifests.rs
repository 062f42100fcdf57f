//! `deploy/kubernetes/daemonset.yaml` against the Kubernetes API's own types (k8s-openapi): it
//! must deserialise into a `DaemonSet` and serialise back to exactly what the file says, so a
//! misspelt or misplaced field (which the API server would drop or refuse) fails here. Then what
//! the proxy needs of it: privileged on the node's network and processes, the CRI socket, bpffs
//! and the cgroup hierarchy mounted, probes on its ops listener, limits, an update that never
//! runs two proxies on a node, and arguments the proxy itself accepts.
use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::Value;

const DAEMONSET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/kubernetes/daemonset.yaml"
);

/// The manifest as a DaemonSet, if every field in it is one the API knows, where it knows it.
fn strict(doc: &Value) -> Result<DaemonSet, String> {
    let ds: DaemonSet = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&ds).map_err(|e| e.to_string())?;
    if &back != doc {
        return Err(format!(
            "fields lost or changed by the API's types:\nfile:  {doc}\ntypes: {back}"
        ));
    }
    Ok(ds)
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(DAEMONSET).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

#[test]
fn the_daemonset_is_valid_for_the_kubernetes_api() {
    let doc = manifest();
    let ds = strict(&doc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(doc["apiVersion"], "apps/v1");
    assert_eq!(doc["kind"], "DaemonSet");
    let spec = ds.spec.unwrap();
    // The selector selects the template.
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    for (k, v) in spec.selector.match_labels.clone().unwrap() {
        assert_eq!(labels.get(&k), Some(&v), "selector {k}={v}");
    }
    let update = spec.update_strategy.unwrap();
    assert_eq!(update.type_.as_deref(), Some("RollingUpdate"));
    let rolling = update.rolling_update.unwrap();
    assert_eq!(
        rolling.max_surge,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0)),
        "never two proxies on a node"
    );

    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert!(limits.contains_key("memory") && limits.contains_key("cpu"));

    // Its arguments are ones the proxy accepts, and the rest of the manifest agrees with them.
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "run");
    let config = imds_proxy::config::RunArgs::parse_layered(args[1..].iter().cloned())
        .and_then(imds_proxy::config::RunArgs::validate)
        .unwrap_or_else(|e| panic!("the manifest's arguments: {e}"));
    assert_eq!(config.runtime.name, imds_proxy::config::RuntimeName::Cri);
    assert!(
        config.redirect.pin.is_some(),
        "pinned: fail closed across updates"
    );
    assert!(!config.roles.policy.namespaces.is_empty());
    let ops = config.network.ops_listen;
    assert!(
        ops.ip().is_loopback(),
        "pods must not reach the ops listener"
    );
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.host.as_deref(), Some(ops.ip().to_string().as_str()));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(ops.port().into())
        );
    }
    let socket = config
        .runtime
        .cri_endpoint
        .as_deref()
        .unwrap()
        .trim_start_matches("unix://")
        .to_owned();
    let mounts = c.volume_mounts.clone().unwrap();
    let volumes = pod.volumes.unwrap();
    let host_path = |mount_path: &str| {
        let mount = mounts
            .iter()
            .find(|m| m.mount_path == mount_path)
            .unwrap_or_else(|| panic!("{mount_path} is not mounted"));
        let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
        (
            volume.host_path.as_ref().unwrap().path.clone(),
            mount.mount_propagation.clone(),
        )
    };
    assert_eq!(host_path(&socket).0, socket);
    assert_eq!(host_path("/sys/fs/cgroup").0, "/sys/fs/cgroup");
    let (bpffs, propagation) = host_path("/sys/fs/bpf");
    assert_eq!(bpffs, "/sys/fs/bpf");
    assert_eq!(propagation.as_deref(), Some("Bidirectional"));
}

/// The check itself fails on what the API would not take as written.
#[test]
fn a_misspelt_or_mistyped_field_fails_the_check() {
    let doc = manifest();
    let mut misspelt = doc.clone();
    misspelt["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    assert!(strict(&misspelt).is_err());
    let mut misplaced = doc.clone();
    misplaced["spec"]["hostPID"] = Value::Bool(true);
    assert!(strict(&misplaced).is_err());
    let mut mistyped = doc;
    mistyped["spec"]["template"]["spec"]["hostPID"] = Value::String("yes".into());
    assert!(strict(&mistyped).is_err());
}
