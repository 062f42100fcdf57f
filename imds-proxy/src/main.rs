//! The `imds-proxy` command: `run` (the daemon, [`imds_proxy::daemon`]), `gate` (the early-boot
//! refusal a proxy later adopts, [`imds_proxy::gate`]), `detach` (remove what a pinned run left)
//! and `check` (load the programs without attaching them).
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use imds_proxy::{
    config::{Config, LogFormat, RunArgs},
    netdev, redirect,
};

/// Per-container IAM credentials on EC2: eBPF redirect of IMDS traffic to a host proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the redirect and serve the IMDS API to containers (`imds-proxy run --help`).
    #[command(disable_help_flag = true)]
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// At boot, before the container runtimes: attach pinned programs that refuse containers'
    /// IMDS connects and pass the host's services, until a proxy adopts them (then exit).
    Gate(imds_proxy::gate::GateArgs),
    /// Remove everything a pinned run left: links (detaching the programs), maps, pins, and the
    /// dummy interface.
    Detach {
        /// The pin directory the proxy ran with.
        #[arg(long)]
        pin: Option<PathBuf>,
        #[arg(long, default_value = netdev::DEFAULT_INTERFACE)]
        interface: String,
    },
    /// Load the embedded eBPF programs and report them, without attaching anything.
    Check,
    /// Say, in plain words, what the running proxy does with a workload's credentials requests
    /// and why: its container and cgroup, the rule naming its role, the allow-lists, the session
    /// name and tags, the cache, STS. Run as root on the host (it reads the proxy's token).
    /// Exits 0 when the workload is served, 1 when it is not, 2 when the proxy cannot be asked
    /// or knows no such container.
    Explain {
        /// A container id (or at least 4 characters of it), a container name, or
        /// <namespace>/<pod>.
        who: String,
        /// The running proxy's --ops-listen.
        #[arg(long, default_value = "127.0.0.1:9181")]
        ops: std::net::SocketAddr,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { args } => {
            // Configuration errors come first, in one line, before anything is attached.
            let config = match RunArgs::parse_layered(args).and_then(RunArgs::validate) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("imds-proxy: {err}");
                    return std::process::ExitCode::from(2);
                }
            };
            init_logging(config.log_format);
            limit_malloc_arenas();
            // Before the runtime's threads exist: a namespace is joined per thread.
            match imds_proxy::cgroup::join_host_cgroup_namespace() {
                Ok(()) => run(config),
                Err(err) => Err(err),
            }
        }
        Command::Gate(args) => {
            init_logging(LogFormat::Text);
            match imds_proxy::cgroup::join_host_cgroup_namespace() {
                Ok(()) => imds_proxy::gate::run(&args),
                Err(err) => Err(err),
            }
        }
        Command::Detach { pin, interface } => {
            init_logging(LogFormat::Text);
            detach(pin, &interface)
        }
        Command::Check => {
            init_logging(LogFormat::Text);
            check()
        }
        Command::Explain { who, ops } => return explain(&who, ops),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("imds-proxy: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `imds-proxy explain`: one request to the ops listener, its answer printed.
fn explain(who: &str, ops: std::net::SocketAddr) -> std::process::ExitCode {
    use std::process::ExitCode;
    match ask_explain(who, ops) {
        Ok((verdict, body)) => {
            print!("{body}");
            match verdict.as_str() {
                "served" => ExitCode::SUCCESS,
                "no-role" | "failing" => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
        Err(err) => {
            eprintln!("imds-proxy explain: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// (the verdict header, the body) of `/explain` for `who`.
fn ask_explain(who: &str, ops: std::net::SocketAddr) -> anyhow::Result<(String, String)> {
    use anyhow::Context as _;
    use imds_proxy::explain::{TOKEN_HEADER, VERDICT_HEADER, WHO_HEADER, token_path};
    use std::io::{Read as _, Write as _};
    anyhow::ensure!(
        !who.is_empty() && who.len() <= 300 && who.chars().all(|c| c.is_ascii_graphic()),
        "{who:?}: a container id, a name or <namespace>/<pod>, in printable ASCII"
    );
    let path = token_path(ops.port());
    let token = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (run as root, on the proxy's host)",
            path.display()
        )
    })?;
    let mut stream = std::net::TcpStream::connect_timeout(&ops, std::time::Duration::from_secs(5))
        .with_context(|| format!("connecting to the proxy's ops listener {ops}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /explain HTTP/1.1\r\nhost: {ops}\r\n{TOKEN_HEADER}: {}\r\n{WHO_HEADER}: {who}\r\nconnection: close\r\n\r\n",
        token.trim(),
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("the ops listener's answer has no head")?;
    let verdict = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case(VERDICT_HEADER)
                .then(|| value.trim().to_owned())
        })
        .context("the ops listener did not answer a verdict (an older proxy?)")?;
    if verdict == "forbidden" {
        anyhow::bail!("{}", body.trim());
    }
    Ok((verdict, body.to_owned()))
}

/// glibc gives each thread that allocates an arena of its own (up to eight per core) and each
/// keeps what was freed in it: the STS client's buffers, freed on whichever worker or blocking
/// thread ran the call, stayed resident several times over. Two arenas (the runtime has a worker
/// per core, two here) keep the proxy's RSS at what it holds. (musl, the container image's libc,
/// has one allocator lock and no arenas.)
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a parameter of the allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check() -> anyhow::Result<()> {
    let mut bpf = redirect::load()?;
    for (name, program) in bpf.programs_mut() {
        tracing::info!(program = name, kind = ?program.prog_type(), "found program");
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn detach(pin: Option<PathBuf>, interface: &str) -> anyhow::Result<()> {
    if let Some(pin) = pin {
        let removed = redirect::unpin(&pin)?;
        tracing::info!(pin = %pin.display(), ?removed, "unpinned (pinned links detach with their pins)");
    }
    if netdev::remove(interface).await? {
        tracing::info!(interface, "removed the dummy interface");
    }
    Ok(())
}

#[tokio::main]
async fn run(config: Config) -> anyhow::Result<()> {
    imds_proxy::daemon::run(config).await
}
