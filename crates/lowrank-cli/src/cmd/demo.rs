//! `lowrank demo`: pretrain a tiny model from scratch, teach it new skills with LoRA/DoRA
//! adapters, print the before/after table. The work is in the `lowrank-demo` crate.

use std::path::PathBuf;

use anyhow::Result;
use lowrank_demo::engine::{child_main, Runner};
use lowrank_demo::{DemoConfig, Progress};

#[derive(clap::Args)]
pub struct Args {
    /// Folder for everything the demo writes (data, base model, adapters, report.json,
    /// report.md). Created if missing; a folder with other files in it is refused.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Seed of the data, the initial weights and the training order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A micro run of the same pipeline in seconds: checks the plumbing, the skills are not learnt.
    #[arg(long)]
    quick: bool,
    /// Show the training engine's own progress.
    #[arg(long)]
    verbose: bool,
    /// Internal: run one training described by a spec file (used to measure each run's peak memory).
    #[arg(long, hide = true, value_name = "SPEC")]
    train_child: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(spec) = &args.train_child {
        return child_main(spec);
    }
    let mut config = if args.quick {
        DemoConfig::quick()
    } else {
        DemoConfig::standard()
    };
    config.seed = args.seed;
    config.verbose = args.verbose;
    let progress = Progress::new(false);
    let report = lowrank_demo::run(&config, &args.out, &Runner::current_exe()?, &progress)?;
    print!("{}", report.text());
    Ok(())
}
