//! `lowrank`: a thin command-line front end over the lowrank library crates.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lowrank", version, about = "Fine-tune and serve LoRA-family adapters over one frozen base model")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Loss and perplexity of a model (optionally with an adapter) on a JSONL file.
    Eval(cmd::eval::Args),
    /// Generate text from a prompt with KV-cached decoding.
    Generate(cmd::generate::Args),
    /// Merge an adapter into the base and write a full Hugging Face checkpoint.
    Merge(cmd::merge::Args),
    /// Describe an adapter: method, rank and alpha per module, parameters, file size.
    Inspect(cmd::inspect::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(args) => cmd::eval::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Merge(args) => cmd::merge::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
