//! `lowrank bench-serve`: the multi-adapter load benchmark (loopback only, bounded).

use std::time::Duration;

use anyhow::{anyhow, Result};
use lowrank_serve::bench::{run, BenchOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder, GGUF file (llama, qwen2), or Hub id org/name[@revision] (from the HF cache, else downloaded into it).
    #[arg(long)]
    model: String,
    /// Adapter counts to spread the requests over.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,512")]
    adapters: Vec<usize>,
    /// Concurrent clients (and the server's batch size).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Requests per scenario.
    #[arg(long, default_value_t = 128)]
    requests: usize,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Wall-time cap per scenario, in seconds.
    #[arg(long, default_value_t = 300)]
    time_limit_s: u64,
    #[arg(long)]
    json: bool,
}

pub fn run_cmd(args: Args) -> Result<()> {
    if args.adapters.is_empty()
        || args.adapters.contains(&0)
        || args.clients == 0
        || args.requests == 0
    {
        return Err(anyhow!(
            "--adapters, --clients and --requests must be positive"
        ));
    }
    let opts = BenchOptions {
        model: args.model,
        adapter_counts: args.adapters,
        clients: args.clients,
        requests: args.requests,
        max_tokens: args.max_tokens,
        rank: args.rank,
        time_limit: Duration::from_secs(args.time_limit_s),
    };
    let report = tokio::runtime::Runtime::new()?
        .block_on(run(&opts))
        .map_err(|e| anyhow!(e))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "adapter load from disk: {:.2} ms ({} bytes each)",
        report.adapter_load_ms, report.adapter_bytes
    );
    println!(
        "{:>8} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "adapters", "requests", "seconds", "tokens/s", "p50 s", "p90 s", "p99 s", "vs 1"
    );
    for s in &report.scenarios {
        println!(
            "{:>8} {:>9} {:>9.2} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>8.2}",
            s.adapters,
            s.requests,
            s.seconds,
            s.tokens_per_s,
            s.latency_p50_s,
            s.latency_p90_s,
            s.latency_p99_s,
            s.ratio_to_one
        );
    }
    Ok(())
}
