use clap::{Parser, Subcommand};

/// Per-container IAM credentials on EC2: eBPF redirect of IMDS traffic to a host proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the embedded eBPF programs into the kernel and report them, without attaching anything.
    Check,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Check => {
            let mut bpf = imds_proxy::ebpf::load()?;
            for (name, program) in bpf.programs_mut() {
                tracing::info!(program = name, kind = ?program.prog_type(), "found program");
            }
            Ok(())
        }
    }
}
