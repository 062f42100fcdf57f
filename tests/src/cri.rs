//! A Kubernetes node without the kubelet: a real containerd with its CRI plugin (a config, socket
//! and state directories of the test's own), CNI's bridge (or ptp) and host-local plugins, and the
//! test driving it over the CRI API as the kubelet does (RunPodSandbox with the pod's annotations,
//! CreateContainer, StartContainer, ExecSync, PodSandboxStatus).
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{self as cri, runtime_service_client::RuntimeServiceClient};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::images::{docker, pause_image};

/// Everything of the test's containerd: config, socket, state, CNI config, pod logs.
const DIR: &str = "/run/imds-test-cri";
/// Its images and snapshots (overlayfs wants a real filesystem under it, not tmpfs).
const ROOT: &str = "/var/lib/imds-test-cri";
/// The CNI bridge pods are attached to (tc mode attaches there).
pub const BRIDGE: &str = "imds-cni0";
/// The pods' subnet.
pub const SUBNET: &str = "10.77.0.0/24";
/// The pods' subnet on the routed network ([`Network::Routed`]).
pub const ROUTED_SUBNET: &str = "10.78.0.0/24";
/// What CNI's `ptp` plugin names the host side of a pod's veth: `veth` and eight hex digits
/// (the pattern for `--container-iface`).
pub const ROUTED_VETHS: &str = "veth????????";

/// How pods are connected to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// CNI `bridge`: each pod's veth is a port of [`BRIDGE`] (kubenet, flannel, Docker's way).
    Bridge,
    /// CNI `ptp`: each pod has its own veth with a host route to its address and no bridge, the
    /// topology of EKS's VPC CNI and Calico.
    Routed,
}

impl Network {
    /// The CNI network configuration list.
    fn conflist(self) -> serde_json::Value {
        let ipam = |subnet: &str| {
            serde_json::json!({
                "type": "host-local",
                "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": format!("{DIR}/ipam"),
            })
        };
        let plugin = match self {
            Network::Bridge => serde_json::json!({
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "ipam": ipam(SUBNET),
            }),
            Network::Routed => serde_json::json!({
                "type": "ptp",
                "ipMasq": false,
                "ipam": ipam(ROUTED_SUBNET),
            }),
        };
        serde_json::json!({"cniVersion": "0.4.0", "name": "imds-test", "plugins": [plugin]})
    }
}

/// `--cri-endpoint` for the proxy.
pub fn endpoint() -> String {
    format!("unix://{DIR}/containerd.sock")
}

/// The containerd; on drop every pod is stopped and removed, then containerd stops and its bridge
/// goes.
pub struct Containerd {
    child: Child,
    client: RuntimeServiceClient<Channel>,
    rt: tokio::runtime::Runtime,
}

/// A pod the test ran: its sandbox and its one long-running container.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub sandbox: String,
    pub container: String,
    config: cri::PodSandboxConfig,
}

impl Pod {
    /// The STS session name the proxy gives it.
    pub fn session(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    /// Its uid (the kubelet's; random here).
    pub fn uid(&self) -> &str {
        self.config.metadata.as_ref().map_or("", |m| m.uid.as_str())
    }
}

impl Containerd {
    /// On the bridge network ([`Network::Bridge`]).
    pub fn start() -> Self {
        Self::start_with(Network::Bridge)
    }

    pub fn start_with(network: Network) -> Self {
        // A containerd an interrupted run left holds the database: it goes first, with what it
        // ran (its shims, their pods' processes, their mounts), so no pod of that run lives on
        // holding an address a new pod is given.
        let _ = Command::new("pkill")
            .args(["-f", &format!("containerd --config {DIR}/config.toml")])
            .status();
        clear_leftover_pods();
        let _ = std::fs::remove_dir_all(DIR);
        std::fs::create_dir_all(format!("{DIR}/cni")).unwrap();
        std::fs::create_dir_all(ROOT).unwrap();
        let pause = format!("docker.io/{}", pause_image().unwrap());
        std::fs::write(
            format!("{DIR}/config.toml"),
            format!(
                r#"version = 2
root = "{ROOT}/root"
state = "{DIR}/state"
[grpc]
  address = "{DIR}/containerd.sock"
[ttrpc]
  address = "{DIR}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # The kubelet asks -998 for a sandbox; lowering an OOM score needs CAP_SYS_RESOURCE, which
  # this machine's root lacks: keep scores at containerd's own or above.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{DIR}/cni"
"#
            ),
        )
        .unwrap();
        std::fs::write(
            format!("{DIR}/cni/10-imds-test.conflist"),
            network.conflist().to_string(),
        )
        .unwrap();
        let log = std::fs::File::create(format!("{DIR}/containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(format!("{DIR}/config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd (cargo xtask setup installs it)");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let socket = format!("{DIR}/containerd.sock");
        // The channel's connection task runs on this runtime (while a call is blocked on).
        let guard = rt.enter();
        let channel = Endpoint::from_static("http://[::1]:50051").connect_with_connector_lazy(
            tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }),
        );
        let client = RuntimeServiceClient::new(channel);
        drop(guard);
        let containerd = Self { child, client, rt };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answered =
                containerd
                    .rt
                    .block_on(containerd.client.clone().version(cri::VersionRequest {
                        version: "v1".into(),
                    }));
            if answered.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd's CRI did not answer: {answered:?}\n{}",
                containerd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Pods an interrupted run left (their sandboxes live on in ROOT, and hold addresses a
        // new pod would be given again) go before the test runs any.
        containerd.remove_every_pod();
        containerd.import(&pause);
        containerd
    }

    /// Stop and remove every pod the runtime knows.
    fn remove_every_pod(&self) {
        let sandboxes = self
            .rt
            .block_on(
                self.client
                    .clone()
                    .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }),
            )
            .map(|r| r.into_inner().items)
            .unwrap_or_default();
        for sandbox in sandboxes {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.remove_sandbox(&sandbox.id)
            }));
        }
    }

    /// containerd's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(format!("{DIR}/containerd.log")).unwrap_or_default()
    }

    /// Copy a Docker image (built locally by the tests) into containerd's CRI namespace; the
    /// reference pods name it by.
    pub fn import(&self, image: &str) -> String {
        let image = image.strip_prefix("docker.io/").unwrap_or(image);
        let saved = docker(&["save", image]).expect("docker save");
        assert!(saved.status.success(), "docker save {image}");
        let mut import = Command::new("ctr")
            .args(["--address", &format!("{DIR}/containerd.sock")])
            .args(["--namespace", "k8s.io", "images", "import", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ctr (Debian containerd)");
        use std::io::Write as _;
        import
            .stdin
            .take()
            .unwrap()
            .write_all(&saved.stdout)
            .unwrap();
        let out = import.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "ctr images import {image}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("docker.io/{image}")
    }

    /// Run a pod as the kubelet does: its sandbox (with the pod's annotations, in its pod cgroup
    /// under `kubepods`), then one container of `image` with `args` (the pod spec's `args`: the
    /// image's entrypoint stays), started.
    pub fn run_pod(
        &self,
        namespace: &str,
        name: &str,
        attempt: u32,
        annotations: &[(&str, &str)],
        image: &str,
        command: &[&str],
    ) -> Pod {
        let uid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            rand::random::<u32>(),
            rand::random::<u64>() & 0xffff_ffff_ffff
        );
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: namespace.into(),
                attempt,
            }),
            hostname: name.into(),
            log_directory: format!("{DIR}/pods/{namespace}_{name}_{uid}"),
            labels: HashMap::from([
                ("io.kubernetes.pod.name".into(), name.into()),
                ("io.kubernetes.pod.namespace".into(), namespace.into()),
                ("io.kubernetes.pod.uid".into(), uid.clone()),
            ]),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                // The kubelet's cgroupfs driver: /kubepods/<qos>/pod<uid>.
                cgroup_parent: format!("/kubepods/besteffort/pod{uid}"),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        std::fs::create_dir_all(&config.log_directory).unwrap();
        let sandbox = self
            .call(|mut c| {
                let config = config.clone();
                async move {
                    c.run_pod_sandbox(cri::RunPodSandboxRequest {
                        config: Some(config),
                        runtime_handler: String::new(),
                    })
                    .await
                }
            })
            .pod_sandbox_id;
        let container = self.start_container(&sandbox, &config, "main", image, command, &[]);
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            sandbox,
            container,
            config,
        }
    }

    /// Create and start one more container in `pod`; its id.
    pub fn add_container(
        &self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
        env: &[(&str, &str)],
    ) -> String {
        self.start_container(&pod.sandbox, &pod.config, name, image, command, env)
    }

    fn start_container(
        &self,
        sandbox: &str,
        sandbox_config: &cri::PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
        env: &[(&str, &str)],
    ) -> String {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            args: command.iter().map(|s| (*s).to_owned()).collect(),
            envs: env
                .iter()
                .map(|(k, v)| cri::KeyValue {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        };
        let id = self
            .call(|mut c| {
                let (config, sandbox_config) = (config.clone(), sandbox_config.clone());
                let sandbox = sandbox.to_owned();
                async move {
                    c.create_container(cri::CreateContainerRequest {
                        pod_sandbox_id: sandbox,
                        config: Some(config),
                        sandbox_config: Some(sandbox_config),
                    })
                    .await
                }
            })
            .container_id;
        self.call(|mut c| {
            let id = id.clone();
            async move {
                c.start_container(cri::StartContainerRequest { container_id: id })
                    .await
            }
        });
        id
    }

    /// `sh -c script` in the container (the kubelet's exec); its stdout, or a panic with its
    /// stderr.
    pub fn exec(&self, container: &str, script: &str) -> String {
        let out = self.call(|mut c| {
            let (container, script) = (container.to_owned(), script.to_owned());
            async move {
                c.exec_sync(cri::ExecSyncRequest {
                    container_id: container,
                    cmd: vec!["sh".into(), "-c".into(), script],
                    timeout: 60,
                })
                .await
            }
        });
        assert_eq!(
            out.exit_code,
            0,
            "exec in {container}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Wait until container `id` of `pod` has exited (within 60 s); its exit code and its stdout
    /// lines, from the CRI log file the runtime wrote (`<time> stdout F <line>`).
    pub fn wait_exited(&self, pod: &Pod, name: &str, id: &str) -> (i32, Vec<String>, Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let code = loop {
            let status = self
                .call(|mut c| {
                    let id = id.to_owned();
                    async move {
                        c.container_status(cri::ContainerStatusRequest {
                            container_id: id,
                            verbose: false,
                        })
                        .await
                    }
                })
                .status
                .unwrap();
            if status.state == cri::ContainerState::ContainerExited as i32 {
                break status.exit_code;
            }
            assert!(Instant::now() < deadline, "{id} still running");
            std::thread::sleep(Duration::from_millis(100));
        };
        let log = std::fs::read_to_string(
            Path::new(&pod.config.log_directory).join(format!("{name}.log")),
        )
        .unwrap_or_default();
        let stream = |which: &str| {
            log.lines()
                .filter_map(|l| {
                    let mut f = l.splitn(4, ' ');
                    let (_time, stream, _tag) = (f.next()?, f.next()?, f.next()?);
                    (stream == which).then(|| f.next().unwrap_or_default().to_owned())
                })
                .collect::<Vec<_>>()
        };
        (code, stream("stdout"), stream("stderr"))
    }

    /// The pod's address, as its sandbox's status reports it (what the CNI plugin gave it).
    pub fn pod_ip(&self, pod: &Pod) -> std::net::IpAddr {
        let status = self
            .call(|mut c| {
                let sandbox = pod.sandbox.clone();
                async move {
                    c.pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: sandbox,
                        verbose: false,
                    })
                    .await
                }
            })
            .status
            .expect("a sandbox status");
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        ip.parse()
            .unwrap_or_else(|_| panic!("pod {} has no address: {ip:?}", pod.session()))
    }

    /// Stop and remove a pod (sandbox and containers), as the kubelet does when it goes.
    pub fn remove_pod(&self, pod: &Pod) {
        self.remove_sandbox(&pod.sandbox);
    }

    fn remove_sandbox(&self, sandbox: &str) {
        self.call(|mut c| {
            let sandbox = sandbox.to_owned();
            async move {
                c.stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: sandbox,
                })
                .await
            }
        });
        self.call(|mut c| {
            let sandbox = sandbox.to_owned();
            async move {
                c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: sandbox,
                })
                .await
            }
        });
    }

    fn call<T, F>(&self, f: impl FnOnce(RuntimeServiceClient<Channel>) -> F) -> T
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self.rt.block_on(f(self.client.clone())) {
            Ok(r) => r.into_inner(),
            Err(status) => panic!(
                "CRI call failed: {}: {}\ncontainerd's log ends:\n{}",
                status.code(),
                status.message(),
                self.log()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }
}

/// What a killed test's containerd left running: its shims (`-address <DIR>/...`), the processes
/// of the pods this harness made (their cgroups `kubepods/.../pod<uid>`, with the harness's own
/// uid pattern `…-0000-4000-8000-…`, so a real node's pods are never touched), and the mounts
/// under [`DIR`].
fn clear_leftover_pods() {
    let _ = Command::new("pkill")
        .args([
            "-KILL",
            "-f",
            &format!("containerd-shim-runc-v2 .*-address {DIR}/"),
        ])
        .status();
    if let Ok(root) = crate::kernel::cgroup2_root() {
        let mut pending = vec![root.join("kubepods")];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten().filter(|e| e.path().is_dir()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("pod") && name.contains("-0000-4000-8000-") {
                    let _ = std::fs::write(entry.path().join("cgroup.kill"), "1");
                } else {
                    pending.push(entry.path());
                }
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut under: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(DIR))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in under {
        let _ = nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_every_pod();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
        let _ = std::fs::remove_dir_all(PathBuf::from(DIR).join("ipam"));
    }
}
