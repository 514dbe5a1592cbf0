//! `lowrank`: a thin command-line front end over the lowrank library crates.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lowrank",
    version,
    about = "Fine-tune and serve LoRA-family adapters over one frozen base model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Pretrain a tiny model from scratch, teach it new skills with LoRA/DoRA adapters, print the before/after table.
    Demo(cmd::demo::Args),
    /// Loss and perplexity of a model (optionally with an adapter) on a JSONL file.
    Eval(cmd::eval::Args),
    /// Generate text from a prompt with KV-cached decoding.
    Generate(cmd::generate::Args),
    /// Merge an adapter into the base and write a full Hugging Face checkpoint.
    Merge(cmd::merge::Args),
    /// Write a LoRA adapter as a GGUF-LoRA file for llama.cpp and Ollama.
    ExportGguf(cmd::export_gguf::Args),
    /// Quantize a model's linear weights to 4 bits (NF4/FP4) and write a bitsandbytes checkpoint.
    Quantize(cmd::quantize::Args),
    /// Describe an adapter: method, rank and alpha per module, parameters, file size.
    Inspect(cmd::inspect::Args),
    /// Combine several adapters into one: linear, cat, svd, TIES, DARE, magnitude pruning.
    Combine(cmd::combine::Args),
    /// Singular values of an adapter's (or a full fine-tune's) updates, the rank to train with, subspace similarity.
    Analyze(cmd::analyze::Args),
    /// Load benchmark of the server over 1, 8, 64, 512 adapters (loopback only).
    BenchServe(cmd::bench_serve::Args),
    /// Serve many adapters over one base: an OpenAI-compatible HTTP server.
    Serve(cmd::serve::Args),
    /// Fine-tune with LoRA, DoRA or all weights; writes a PEFT adapter (or a checkpoint).
    Train(cmd::train::Args),
}

fn main() {
    // Like other command-line tools, end quietly when the reader of stdout goes away
    // (`lowrank analyze ... | head`): Rust ignores SIGPIPE, so printing would panic instead.
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Before any other thread exists: candle's pool does not spin, glibc keeps freed memory,
    // and the main thread is one of rayon's workers (see `lowrank_kernels::process`).
    lowrank_kernels::process::set_up();
    // Warnings show unless RUST_LOG says otherwise (the server's skipped adapter folders).
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::WARN.into())
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = run(cli.command);
    if let Err(err) = result {
        eprintln!("error: {}", describe(&err));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", as `{:#}` prints them, less a cause whose text the
/// message already ends with: errors that show their source and also chain it
/// ("x.jsonl: No such file or directory (os error 2)") would otherwise print it twice.
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.ends_with(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Merge(args) => cmd::merge::run(args),
        Command::Quantize(args) => cmd::quantize::run(args),
        Command::ExportGguf(args) => cmd::export_gguf::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Combine(args) => cmd::combine::run(args),
        Command::Analyze(args) => cmd::analyze::run(args),
        Command::BenchServe(args) => cmd::bench_serve::run_cmd(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Train(args) => cmd::train::run(args),
    }
}
