//! Bring up the simulated EC2 host and keep it until SIGINT/SIGTERM: for poking at it by hand,
//! and for the test that kills a scene's owner and checks the next scene clears its leftovers.
use std::path::PathBuf;

use clap::Parser;
use imds_tests::{scene::SceneConfig, sim::HttpTokens};
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser)]
#[command(about = "Run the simulated EC2 host (IMDS simulator + moto STS) until interrupted")]
struct Cli {
    /// The imds-sim binary; by default the one next to this binary.
    #[arg(long)]
    sim_bin: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    hop_limit: u32,
    #[arg(long, value_enum, default_value_t = HttpTokens::Optional)]
    http_tokens: HttpTokens,
    /// Also start moto as the scene's STS.
    #[arg(long)]
    sts: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let sim_bin = match cli.sim_bin {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("imds-sim"),
    };
    // Block the signals before any thread exists, then wait for one synchronously.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let mut config = SceneConfig::new(sim_bin)
        .hop_limit(cli.hop_limit)
        .http_tokens(cli.http_tokens);
    if cli.sts {
        // Its own moto, which goes with the scene (never a test run's shared one).
        config = config.with_sts().own_sts();
    }
    let scene = config.start()?;
    println!(
        "scene up: IMDS at {} and {}",
        scene.imds_v4()?,
        scene.imds_v6()?
    );
    if let Some(sts) = scene.sts_endpoint() {
        println!("STS at http://{sts}");
    }
    println!("imds-sim log: {}", scene.sim_log_path().display());
    let signal = signals.wait()?;
    println!("{signal:?}: tearing the scene down");
    drop(scene);
    Ok(())
}
