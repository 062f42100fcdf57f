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
