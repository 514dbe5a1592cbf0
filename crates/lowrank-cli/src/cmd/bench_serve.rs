//! `lowrank bench-serve`: the multi-adapter load benchmark (loopback only, bounded).

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use lowrank_core::QuantSpec;
use lowrank_quant::QuantType;
use lowrank_serve::bench::{run, BenchOptions, BenchWeights};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder, GGUF file (llama, qwen2, qwen3, phi3, gemma2, gemma3), or Hub id org/name[@revision] (from the HF cache, else downloaded into it).
    #[arg(long)]
    model: String,
    /// How the base's weights are stored, one server each: f32, bf16 (--bf16-weights),
    /// bf16-act (--bf16-weights --bf16-activations), nf4, nf4-dq, fp4, fp4-dq (4-bit at load, blocks of 64; -dq: double quantization);
    /// a 4-bit name with `+bf16` (nf4-dq+bf16) keeps the embedding/head in bf16.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,nf4-dq")]
    weights: Vec<String>,
    /// Adapter counts to spread each scenario's requests over.
    #[arg(long, value_delimiter = ',', default_value = "1,64,512")]
    adapters: Vec<usize>,
    /// Concurrent closed-loop clients, one scenario each (the server batches up to the most).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Adapters each request stacks (`"adapters": [...]`, equal weights), one series each;
    /// stacks above 1 run over the adapter counts at least that large
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    stacks: Vec<usize>,
    /// Requests each client sends per scenario.
    #[arg(long, default_value_t = 2)]
    requests_per_client: usize,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Wall-time cap per scenario, in seconds.
    #[arg(long, default_value_t = 300)]
    time_limit_s: u64,
    #[arg(long)]
    json: bool,
}

/// The storage a `--weights` name asks for.
fn weights(name: &str) -> Result<BenchWeights> {
    let four_bit = |kind, double_quant| -> Result<Option<QuantSpec>> {
        Ok(Some(QuantSpec::new(kind, double_quant, 64)?))
    };
    let (base, bf16_head) = match name.split_once('+') {
        Some((base, "bf16")) => (base, true),
        Some(_) => bail!("--weights: {name:?}: the only suffix is +bf16 (nf4-dq+bf16)"),
        None => (name, false),
    };
    let (bf16_weights, quantize) = match base {
        "f32" => (false, None),
        "bf16" | "bf16-act" => (true, None),
        "nf4" => (false, four_bit(QuantType::Nf4, false)?),
        "nf4-dq" => (false, four_bit(QuantType::Nf4, true)?),
        "fp4" => (false, four_bit(QuantType::Fp4, false)?),
        "fp4-dq" => (false, four_bit(QuantType::Fp4, true)?),
        other => bail!(
            "--weights: {other:?} is not one of f32, bf16, bf16-act, nf4, nf4-dq, fp4, fp4-dq (a 4-bit one optionally with +bf16)"
        ),
    };
    if bf16_head && quantize.is_none() {
        bail!("--weights: {name:?}: +bf16 goes on a 4-bit name (nf4-dq+bf16)");
    }
    Ok(BenchWeights {
        name: name.to_string(),
        bf16_weights: bf16_weights || bf16_head,
        bf16_activations: base == "bf16-act",
        quantize,
    })
}

pub fn run_cmd(args: Args) -> Result<()> {
    if args.adapters.is_empty()
        || args.adapters.contains(&0)
        || args.clients.is_empty()
        || args.clients.contains(&0)
        || args.stacks.is_empty()
        || args.stacks.contains(&0)
        || args.requests_per_client == 0
    {
        return Err(anyhow!(
            "--adapters, --clients, --stacks and --requests-per-client must be positive"
        ));
    }
    let opts = BenchOptions {
        model: args.model,
        weights: args
            .weights
            .iter()
            .map(|w| weights(w))
            .collect::<Result<_>>()?,
        adapter_counts: args.adapters,
        clients: args.clients,
        stacks: args.stacks,
        requests_per_client: args.requests_per_client,
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
        "adapter load from disk: {:.2} ms ({} bytes each); read bandwidth {:.1} GB/s, f32 GEMM {:.1} GFLOP/s, bf16 GEMM {:.1} GFLOP/s (bf16-act's compute bound)",
        report.adapter_load_ms,
        report.adapter_bytes,
        report.read_gb_s,
        report.gemm_gflop_s,
        report.bf16_gemm_gflop_s
    );
    println!(
        "{:>7} {:>7} {:>8} {:>5} {:>8} {:>9} {:>7} {:>7} {:>8} {:>8} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>6} {:>5}",
        "weights", "clients", "adapters", "stack", "requests", "tokens/s", "p50 s", "p99 s", "TTFT p50",
        "TTFT p99", "vs 1", "rows/st", "MB/step", "GFLOP/st", "mem ms", "comp ms", "share", "load"
    );
    for s in &report.scenarios {
        println!(
            "{:>7} {:>7} {:>8} {:>5} {:>8} {:>9.1} {:>7.2} {:>7.2} {:>8.3} {:>8.3} {:>6.2} {:>7.1} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>5.0}% {:>5.2}",
            s.weights,
            s.clients,
            s.adapters,
            s.stack,
            s.requests,
            s.tokens_per_s,
            s.latency_p50_s,
            s.latency_p99_s,
            s.ttft_p50_s,
            s.ttft_p99_s,
            s.ratio_to_one,
            s.rows_per_step,
            s.bytes_per_step / 1e6,
            s.flops_per_step / 1e9,
            s.memory_bound_ms,
            s.compute_bound_ms,
            100.0 * s.share_of_bound,
            s.load_average
        );
    }
    println!("share: the sum over steps of each step's tighter bound (bytes/bandwidth or its tokens' FLOPs/GEMM rate) ÷ wall time; the host's other load slows both sides of that ratio differently, so figures on a busy host are lower bounds");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::weights;

    #[test]
    fn weights_names_and_the_bf16_head_suffix() {
        let plain = weights("nf4-dq").unwrap();
        assert!(!plain.bf16_weights && plain.quantize.is_some_and(|q| q.double_quant));
        let head = weights("nf4-dq+bf16").unwrap();
        assert!(head.bf16_weights && head.quantize.is_some());
        let bf16 = weights("bf16").unwrap();
        assert!(bf16.bf16_weights && !bf16.bf16_activations && bf16.quantize.is_none());
        let act = weights("bf16-act").unwrap();
        assert!(act.bf16_weights && act.bf16_activations && act.quantize.is_none());
        for bad in ["f32+bf16", "bf16+bf16", "bf16-act+bf16", "nf4+f16", "q4_0"] {
            let err = weights(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains("--weights") && err.contains(bad.split('+').next().unwrap()),
                "{bad}: {err}"
            );
        }
    }
}
