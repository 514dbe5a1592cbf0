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
    // candle's elementwise thread pool spins (25 000 rounds) after every parallel op before
    // it sleeps. With as many threads as cores that spinning takes a core from the rayon
    // threads running the next GEMM: 5% of a LoRA training step's CPU time went there, and
    // steps ran ~6% faster without it (alternating runs, 2 cores). Sleeping at once costs one
    // wake-up per large elementwise op. A value the user set wins. Set before any thread exists.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // The main thread joins the global rayon pool as one of its workers: candle, gemm and the
    // kernels issue hundreds of short parallel ops per decoding step, and handing each from an
    // outside thread to the pool (and waking it) cost a fifth of the step. Running the command
    // on the main thread itself (rather than `install`ing it on a pool thread) keeps its
    // allocations in glibc's main arena, which reuses freed activation buffers; a thread arena
    // hands them back to the kernel and every training step paid the page faults again.
    // Failing to build the pool (one already exists) only loses that speed.
    let _ = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global();
    let result = run(cli.command);
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// Environment variables through which a user tunes glibc's malloc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const USER_SETTINGS: [&str; 3] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
];

/// Lets glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.
/// A training step frees and reallocates the same activation buffers (megabytes each) every
/// step; by default glibc returns them (munmap, heap trimming) and every step page-faults them
/// in again: about 105 000 faults per LoRA step, 370 000 per DoRA step and 330 000 per
/// checkpointed step of a SmolLM-135M-sized model (`perf stat -e page-faults`), a quarter of a
/// DoRA step's time. With buffers up to 32 MiB (glibc's largest allowed threshold) taken from
/// the heap and the heap never trimmed below 2 GiB of free space, steady steps fault about
/// never; peak RSS is unchanged, since it is set by the step's peak use either way. Settings
/// the user made through glibc's environment variables win.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_tuned = USER_SETTINGS
            .iter()
            .any(|var| std::env::var_os(var).is_some());
        if !user_tuned {
            // SAFETY: mallopt only changes malloc's parameters; called before any other
            // thread exists, so no allocation runs concurrently.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Merge(args) => cmd::merge::run(args),
        Command::Quantize(args) => cmd::quantize::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Combine(args) => cmd::combine::run(args),
        Command::Analyze(args) => cmd::analyze::run(args),
        Command::BenchServe(args) => cmd::bench_serve::run_cmd(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Train(args) => cmd::train::run(args),
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::{keep_freed_memory, USER_SETTINGS};

    /// Bytes glibc currently holds in mmapped blocks (outside its heaps).
    fn mmapped_bytes() -> usize {
        // SAFETY: mallinfo2 only reads malloc's statistics.
        unsafe { libc::mallinfo2() }.hblkhd
    }

    #[test]
    fn activation_sized_buffers_come_from_the_heap() {
        if USER_SETTINGS
            .iter()
            .any(|var| std::env::var_os(var).is_some())
        {
            return; // the user's malloc settings win; nothing of ours to check
        }
        keep_freed_memory();
        // 16 MiB, a large activation buffer: above glibc's default threshold, below ours.
        let before = mmapped_bytes();
        let buffer = vec![1u8; 16 << 20];
        let during = mmapped_bytes();
        assert_eq!(buffer.iter().map(|&b| b as usize).sum::<usize>(), 16 << 20);
        assert!(
            during < before + (16 << 20),
            "a 16 MiB buffer was mmapped ({before} -> {during} bytes): freeing it would hand it back to the kernel"
        );
    }
}
