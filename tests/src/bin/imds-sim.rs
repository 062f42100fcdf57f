//! The IMDS simulator of the simulated EC2 host (see `imds_tests::sim`).
use clap::Parser;

#[derive(Parser)]
#[command(about = "EC2 instance metadata service simulator (test support for imds-proxy)")]
struct Cli {
    #[command(flatten)]
    config: imds_tests::sim::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = Cli::parse().config;
    tokio::select! {
        result = imds_tests::sim::run(config) => result,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate() => Ok(()),
    }
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(err) => {
            tracing::error!(%err, "cannot watch SIGTERM");
            std::future::pending::<()>().await
        }
    }
}
