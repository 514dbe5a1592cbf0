//! The demo pipeline without the CLI, training in this process (no per-run peak memory):
//! `cargo run --release -p lowrank-demo --example demo -- OUT [--quick]`.

use lowrank_demo::engine::Runner;
use lowrank_demo::{DemoConfig, Progress};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "demo-out".into());
    let mut config = if args.iter().any(|a| a == "--quick") {
        DemoConfig::quick()
    } else {
        DemoConfig::standard()
    };
    if let Some(i) = args.iter().position(|a| a == "--config") {
        // A DemoConfig as JSON (report.json's "config"), for trying other sizes.
        config = serde_json::from_str(&std::fs::read_to_string(&args[i + 1])?)?;
    }
    config.verbose = args.iter().any(|a| a == "--verbose");
    let report = lowrank_demo::run(
        &config,
        out.as_ref(),
        &Runner::InProcess,
        &Progress::new(false),
    )?;
    print!("{}", report.text());
    Ok(())
}
