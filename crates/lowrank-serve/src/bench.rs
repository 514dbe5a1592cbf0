//! `lowrank bench-serve`: a bounded load test on loopback. It writes N random adapters for the
//! model, starts the server in this process on 127.0.0.1 once per weight format (f32, bf16,
//! 4-bit), and for every (clients, adapters) pair sends a fixed number of streamed requests
//! from that many closed-loop clients spread over that many adapters. Each scenario reports
//! aggregate tokens/s, latency percentiles, time to first token, and the roofline: the bytes
//! and FLOPs of an average step against this machine's read bandwidth and GEMM rate (measured
//! in this process before each weight format and after the last, the best of them taken), and
//! the share of the bound reached — each step's tighter bound summed over the scenario (see
//! [`crate::step_tokens`]) ÷ wall time.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use lowrank_core::lora::{LoraAdapter, LoraConfig, LoraModule};
use lowrank_core::targets::ModuleSelector;
use serde_json::json;
use tokio_stream::StreamExt;

use crate::server::ServeOptions;
use crate::step_tokens::StepTally;

/// How the base's weights are stored for one series of scenarios.
#[derive(Debug, Clone)]
pub struct BenchWeights {
    /// As printed: "f32", "bf16", "nf4-dq", …
    pub name: String,
    pub bf16_weights: bool,
    /// Each bf16 linear's input rounded to bf16 (`--bf16-activations`).
    pub bf16_activations: bool,
    pub quantize: Option<lowrank_core::QuantSpec>,
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: String,
    pub weights: Vec<BenchWeights>,
    pub adapter_counts: Vec<usize>,
    pub clients: Vec<usize>,
    /// Adapters each request stacks (`"adapters": [...]`, equal weights summing to 1), one
    /// series of scenarios each; stacks of 2 or more run only over counts that large.
    pub stacks: Vec<usize>,
    /// Requests per client in each scenario.
    pub requests_per_client: usize,
    pub max_tokens: usize,
    pub rank: usize,
    /// Hard cap on each scenario's wall time.
    pub time_limit: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Scenario {
    pub weights: String,
    pub clients: usize,
    pub adapters: usize,
    /// Adapters each request stacks (1: `model` names one adapter).
    pub stack: usize,
    pub requests: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub latency_p50_s: f64,
    pub latency_p99_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    /// Throughput relative to the same weights and clients over one adapter (a stacked
    /// scenario: relative to the same adapter count unstacked).
    pub ratio_to_one: f64,
    /// Engine steps, and sequences and tokens (prompt and generated) per step on average.
    pub steps: u64,
    pub rows_per_step: f64,
    pub tokens_per_step: f64,
    /// Bytes an average step reads: the weights as stored, plus the factors of the distinct
    /// adapters its rows use.
    pub bytes_per_step: f64,
    /// 2 × parameters × tokens (linears, head and adapters; attention left out).
    pub flops_per_step: f64,
    /// The time an average step's bytes / bandwidth and FLOPs / GEMM rate give.
    pub memory_bound_ms: f64,
    pub compute_bound_ms: f64,
    /// Which of the two bounds most of the scenario's bound time.
    pub bound: &'static str,
    /// The sum over steps of each step's tighter bound (its bytes / bandwidth or its FLOPs /
    /// GEMM rate, whichever is longer) ÷ wall time: how close the scenario came to the
    /// roofline.
    pub share_of_bound: f64,
    /// The scenario's steps by tokens, and the FLOPs per token, for the roofline.
    #[serde(skip)]
    tally: StepTally,
    #[serde(skip)]
    flops_per_token: f64,
    /// Its linears multiply bf16 activations (compute bound: the bf16 GEMM's rate).
    #[serde(skip)]
    bf16_activations: bool,
    /// The host's 1-minute load average after the scenario (other processes share the cores).
    pub load_average: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Read bandwidth (GB/s) and f32 GEMM rate (GFLOP/s) measured before the scenarios.
    pub read_gb_s: f64,
    pub gemm_gflop_s: f64,
    /// The bf16 GEMM's rate, the compute bound of `bf16-act` scenarios.
    pub bf16_gemm_gflop_s: f64,
    pub scenarios: Vec<Scenario>,
    /// Mean time to read and check one adapter from disk.
    pub adapter_load_ms: f64,
    pub adapter_bytes: u64,
}

/// Random rank-`rank` q/v adapters (non-zero B, so the adapter path does real work).
fn write_adapters(
    model: &lowrank_models::Llama,
    root: &Path,
    count: usize,
    rank: usize,
) -> Result<(), String> {
    let targets = ModuleSelector::Names(vec!["q_proj".into(), "v_proj".into()]);
    for i in 0..count {
        let mut config = LoraConfig::new(rank, 2.0 * rank as f64, targets.clone());
        config.base_model = Some(model.config().model_type.clone());
        let mut modules = std::collections::BTreeMap::new();
        for l in model
            .linears()
            .into_iter()
            .filter(|l| config.targets_module(&l.name))
        {
            let a = Tensor::randn(0f32, 0.05, (rank, l.in_features), &Device::Cpu)
                .map_err(|e| e.to_string())?;
            let b = Tensor::randn(0f32, 0.05, (l.out_features, rank), &Device::Cpu)
                .map_err(|e| e.to_string())?;
            modules.insert(
                l.name.clone(),
                LoraModule {
                    a,
                    b,
                    magnitude: None,
                    scale: 2.0,
                },
            );
        }
        LoraAdapter { config, modules }
            .save(&root.join(format!("tenant-{i:04}")))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// FLOP/s of the f32 GEMM (candle's matmul over the pool) at a layer's prefill shape, best of
/// five.
fn gemm_rate() -> Result<f64, String> {
    let err = |e: candle_core::Error| e.to_string();
    let (m, k, n) = (512, 576, 1536);
    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).map_err(err)?;
    let w = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu).map_err(err)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        std::hint::black_box(x.matmul(&w).map_err(err)?);
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best)
}

/// FLOP/s of the bf16 GEMM that `--bf16-activations` runs (AVX512-BF16's dot products where
/// this process chose them, else the f32 GEMM on widened values) at the same shape, best of five:
/// the compute bound of a bf16-act scenario, whose dot products can outrun f32 FMAs.
fn bf16_gemm_rate() -> Result<f64, String> {
    use lowrank_kernels::FrozenMatmul;
    let err = |e: candle_core::Error| e.to_string();
    let (m, k, n) = (512, 576, 1536);
    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
        .and_then(|x| x.flatten_all()?.to_vec1::<f32>())
        .map_err(err)?;
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)
        .and_then(|w| w.to_dtype(candle_core::DType::BF16))
        .map_err(err)?;
    let base = lowrank_kernels::Bf16Frozen::new(&w).map_err(err)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        std::hint::black_box(base.forward(&x, m).map_err(err)?);
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best)
}

/// The host's 1-minute load average (0 where /proc/loadavg cannot be read).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// What one streamed request took: latency, time to its first text, tokens generated.
struct Outcome {
    latency: f64,
    ttft: f64,
    tokens: u64,
}

/// Sends one streamed completion and reads it to the end.
/// An HTTP client for the loopback server: plain HTTP, so no TLS roots are loaded (reqwest's
/// default reads the platform's on every client built).
fn loopback_client() -> Result<reqwest::Client, String> {
    crate::install_tls_provider();
    reqwest::Client::builder()
        .tls_certs_only([])
        .build()
        .map_err(|e| e.to_string())
}

async fn streamed(http: &reqwest::Client, url: &str, body: &serde_json::Value) -> Option<Outcome> {
    let start = Instant::now();
    let resp = http.post(url).json(body).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let mut stream = resp.bytes_stream();
    let (mut ttft, mut tokens, mut pending) = (None, 0, String::new());
    while let Some(chunk) = stream.next().await {
        pending.push_str(&String::from_utf8_lossy(&chunk.ok()?));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            if ttft.is_none()
                && v["choices"][0]["text"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            {
                ttft = Some(start.elapsed().as_secs_f64());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n;
            }
        }
    }
    let latency = start.elapsed().as_secs_f64();
    Some(Outcome {
        latency,
        ttft: ttft.unwrap_or(latency),
        tokens,
    })
}

/// The machine's bounds: read bandwidth (bytes/s) and f32 GEMM rate (FLOP/s).
#[derive(Debug, Clone, Copy)]
struct Machine {
    read_bytes_s: f64,
    gemm_flop_s: f64,
    bf16_gemm_flop_s: f64,
}

impl Machine {
    /// Measured now.
    fn probe() -> Result<Machine, String> {
        let m = Machine {
            read_bytes_s: lowrank_kernels::probe::read_bandwidth(3),
            gemm_flop_s: gemm_rate()?,
            bf16_gemm_flop_s: bf16_gemm_rate()?,
        };
        eprintln!(
            "read bandwidth {:.1} GB/s, f32 GEMM {:.1} GFLOP/s, bf16 GEMM {:.1} GFLOP/s (load average {:.2})",
            m.read_bytes_s / 1e9,
            m.gemm_flop_s / 1e9,
            m.bf16_gemm_flop_s / 1e9,
            load_average()
        );
        Ok(m)
    }

    /// The better of each bound: what the machine showed it can do. A probe slowed by other
    /// load would otherwise flatter every scenario measured against it.
    fn best(self, other: Machine) -> Machine {
        Machine {
            read_bytes_s: self.read_bytes_s.max(other.read_bytes_s),
            gemm_flop_s: self.gemm_flop_s.max(other.gemm_flop_s),
            bf16_gemm_flop_s: self.bf16_gemm_flop_s.max(other.bf16_gemm_flop_s),
        }
    }
}

impl Scenario {
    /// Fills in the roofline against `machine`.
    fn measure_against(&mut self, machine: Machine) {
        let memory_s = self.bytes_per_step / machine.read_bytes_s;
        // bf16 activations multiply on the bf16 GEMM's dot products, the rest in f32.
        let gemm = if self.bf16_activations {
            machine.bf16_gemm_flop_s
        } else {
            machine.gemm_flop_s
        };
        let per_token_s = self.flops_per_token / gemm;
        let (memory, compute) = self.tally.bound_seconds(memory_s, per_token_s);
        self.memory_bound_ms = memory_s * 1e3;
        self.compute_bound_ms = per_token_s * self.tokens_per_step * 1e3;
        self.bound = if memory >= compute {
            "memory"
        } else {
            "compute"
        };
        self.share_of_bound = (memory + compute) / self.seconds;
    }
}

/// What the roofline needs of a model: parameters and bytes a step reads besides adapters.
struct ModelCost {
    params: f64,
    weight_bytes: f64,
}

pub async fn run(opts: &BenchOptions) -> Result<BenchReport, String> {
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let tenants = write_tenants(opts, root.path())?;
    eprintln!("measuring read bandwidth and the GEMM rate ...");
    let mut machine = Machine::probe()?;
    let mut scenarios: Vec<Scenario> = Vec::new();
    for (i, weights) in opts.weights.iter().enumerate() {
        if i > 0 {
            machine = machine.best(Machine::probe()?);
        }
        bench_weights(
            opts,
            root.path(),
            &tenants,
            weights,
            machine,
            &mut scenarios,
        )
        .await?;
    }
    // Once more after the load, and every scenario measured against the best of the probes.
    let machine = machine.best(Machine::probe()?);
    for s in &mut scenarios {
        s.measure_against(machine);
    }
    Ok(BenchReport {
        read_gb_s: machine.read_bytes_s / 1e9,
        gemm_gflop_s: machine.gemm_flop_s / 1e9,
        bf16_gemm_gflop_s: machine.bf16_gemm_flop_s / 1e9,
        scenarios,
        adapter_load_ms: tenants.load_ms,
        adapter_bytes: tenants.bytes,
    })
}

/// The tenants' adapters as written, and what the roofline and the report need of them.
struct Tenants {
    /// Mean time to load one from disk, in milliseconds.
    load_ms: f64,
    /// Bytes of one adapter's files.
    bytes: u64,
    /// One adapter's factor values.
    params: f64,
    /// The output head's parameters (vocab × hidden).
    head_params: f64,
}

/// Writes the most adapters any scenario uses under `root` and times loading a few.
fn write_tenants(opts: &BenchOptions, root: &Path) -> Result<Tenants, String> {
    let dir =
        lowrank_models::checkpoint::resolve_model_dir(&opts.model).map_err(|e| e.to_string())?;
    let model = lowrank_models::Llama::load(&dir, &Device::Cpu).map_err(|e| e.to_string())?;
    let max_count = opts.adapter_counts.iter().copied().max().unwrap_or(1);
    eprintln!("writing {max_count} adapters (rank {}) ...", opts.rank);
    write_adapters(&model, root, max_count, opts.rank)?;
    let linears = model.linears();
    let start = Instant::now();
    let probes = max_count.min(16);
    for i in 0..probes {
        LoraAdapter::load(&root.join(format!("tenant-{i:04}")), &linears, &Device::Cpu)
            .map_err(|e| e.to_string())?;
    }
    let adapter_load_ms = start.elapsed().as_secs_f64() * 1000.0 / probes as f64;
    let adapter_bytes = ["adapter_model.safetensors", "adapter_config.json"]
        .iter()
        .filter_map(|f| std::fs::metadata(root.join("tenant-0000").join(f)).ok())
        .map(|m| m.len())
        .sum();
    // One adapter's factors: rank × (in + out) f32 values for each q and v projection.
    let adapter_params: f64 = linears
        .iter()
        .filter(|l| l.name.ends_with("q_proj") || l.name.ends_with("v_proj"))
        .map(|l| (opts.rank * (l.in_features + l.out_features)) as f64)
        .sum();
    let head_params = (model.config().vocab_size * model.config().hidden_size) as f64;

    Ok(Tenants {
        load_ms: adapter_load_ms,
        bytes: adapter_bytes,
        params: adapter_params,
        head_params,
    })
}

/// The server options of a benchmark over `weights`, with the tenants' adapters under `root`.
fn serve_options(opts: &BenchOptions, root: &Path, weights: &BenchWeights) -> ServeOptions {
    let max_clients = opts.clients.iter().copied().max().unwrap_or(1);
    let max_count = opts.adapter_counts.iter().copied().max().unwrap_or(1);
    ServeOptions {
        model: opts.model.clone(),
        adapters: root.to_path_buf(),
        host: "127.0.0.1".into(),
        port: 0,
        api_keys: None,
        max_batch: max_clients,
        max_queue: max_clients * 4,
        max_loaded_adapters: max_count,
        adapter_memory_mb: 1 << 14,
        kv_cache_mb: 4096,
        max_tokens_limit: opts.max_tokens,
        max_body_bytes: 1 << 20,
        request_timeout: opts.time_limit.max(Duration::from_secs(1)),
        // Every client's connection, and the listener's neighbours in the default limit.
        max_connections: (max_clients * 2).max(64),
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(30),
        allow_any_adapter_path: false,
        allow_adapter_sources: Vec::new(),
        adapter_cache_dir: None,
        adapter_cache_mb: 1024,
        allow_hub_adapters: false,
        merge: None,
        served_model_name: Some("base".into()),
        bf16_weights: weights.bf16_weights,
        bf16_activations: weights.bf16_activations,
        quantize: weights.quantize,
    }
}

/// Every scenario over one kind of weights, against one server started for them.
async fn bench_weights(
    opts: &BenchOptions,
    root: &Path,
    tenants: &Tenants,
    weights: &BenchWeights,
    machine: Machine,
    scenarios: &mut Vec<Scenario>,
) -> Result<(), String> {
    let serve = serve_options(opts, root, weights);
    eprintln!("starting the server over {} weights ...", weights.name);
    let state = crate::build_state(&serve).map_err(|e| e.to_string())?;
    let cost = {
        let memory = state.engine.model().linear_memory();
        let head_bytes = tenants.head_params * if weights.bf16_weights { 2.0 } else { 4.0 };
        ModelCost {
            params: memory.params as f64 + tenants.head_params,
            weight_bytes: memory.bytes as f64 + head_bytes,
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let url = format!(
        "http://{}/v1/completions",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve_on(state.clone(), listener, async {
        let _ = stop_rx.await;
    }));
    // One request first, so that no scenario pays for the first touch of the weights.
    let http = loopback_client()?;
    let warm = json!({"model": "base", "prompt": "w3 w4 w5", "max_tokens": 4,
                      "temperature": 0, "stream": true});
    streamed(&http, &url, &warm).await;
    let runs: Vec<(usize, usize)> = opts
        .stacks
        .iter()
        .flat_map(|&stack| {
            opts.adapter_counts
                .iter()
                .filter(move |&&count| stack == 1 || count >= stack)
                .map(move |&count| (stack, count))
        })
        .collect();
    for &clients in &opts.clients {
        for &(stack, count) in &runs {
            let s = scenario(
                opts,
                &state,
                &url,
                weights,
                clients,
                (count, stack),
                &cost,
                tenants.params,
                machine,
            )
            .await?;
            let one = scenarios.iter().find(|o| {
                o.weights == s.weights
                    && o.clients == s.clients
                    && o.stack == 1
                    && o.adapters == if stack == 1 { 1 } else { count }
            });
            let s = Scenario {
                ratio_to_one: one.map_or(1.0, |one| s.tokens_per_s / one.tokens_per_s),
                ..s
            };
            eprintln!(
                "{} weights, {clients} client(s), {count} adapter(s){}: {:.1} tokens/s, {:.0}% of the {} bound (load {:.2})",
                weights.name,
                if stack > 1 { format!(", {stack} stacked per request") } else { String::new() },
                s.tokens_per_s,
                100.0 * s.share_of_bound,
                s.bound,
                s.load_average
            );
            scenarios.push(s);
        }
    }
    let _ = stop_tx.send(());
    server
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// One scenario: `clients` closed-loop clients over `count` adapters against a running server.
#[allow(clippy::too_many_arguments)]
async fn scenario(
    opts: &BenchOptions,
    state: &Arc<crate::server::AppState>,
    url: &str,
    weights: &BenchWeights,
    clients: usize,
    (count, stack): (usize, usize),
    cost: &ModelCost,
    adapter_params: f64,
    machine: Machine,
) -> Result<Scenario, String> {
    let metrics = &state.metrics;
    let steps_before = metrics.batch_size.get_sample_count();
    let rows_before = metrics.batch_size.get_sample_sum();
    let tally_before = metrics.step_tokens.tally();
    let total = clients * opts.requests_per_client;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + opts.time_limit;
    let begin = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, url, max_tokens) = (next.clone(), url.to_string(), opts.max_tokens);
        tasks.push(tokio::spawn(async move {
            let Ok(http) = loopback_client() else {
                return Vec::new();
            };
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() > deadline {
                    return out;
                }
                // Sixteen words of a word-level vocabulary (a real tokenizer splits them too).
                let prompt: Vec<String> = (0..16)
                    .map(|j| format!("w{}", 3 + (i * 16 + j) % 4000))
                    .collect();
                let mut body = json!({"prompt": prompt.join(" "),
                                  "max_tokens": max_tokens, "temperature": 0, "stream": true,
                                  "stream_options": {"include_usage": true}});
                let tenant = |k: usize| format!("tenant-{:04}", (i + k) % count);
                if stack == 1 {
                    body["model"] = tenant(0).into();
                } else {
                    body["adapters"] = (0..stack)
                        .map(|k| json!({"name": tenant(k), "weight": 1.0 / stack as f64}))
                        .collect();
                }
                if let Some(o) = streamed(&http, &url, &body).await {
                    out.push(o);
                }
            }
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.map_err(|e| e.to_string())?);
    }
    let seconds = begin.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> = results.iter().map(|r| r.latency).collect();
    latencies.sort_by(f64::total_cmp);
    let mut ttfts: Vec<f64> = results.iter().map(|r| r.ttft).collect();
    ttfts.sort_by(f64::total_cmp);
    let tokens: u64 = results.iter().map(|r| r.tokens).sum();
    let steps = metrics.batch_size.get_sample_count() - steps_before;
    let rows = metrics.batch_size.get_sample_sum() - rows_before;
    let tally = metrics.step_tokens.tally().since(&tally_before);
    let per_step = |v: f64| if steps == 0 { 0.0 } else { v / steps as f64 };
    let rows_per_step = per_step(rows);
    let tokens_per_step = per_step(tally.tokens() as f64);
    // The distinct adapters of a step: `stack` per row at most.
    let adapters_per_step = (rows_per_step * stack as f64).min(count as f64);
    let bytes_per_step = cost.weight_bytes + 4.0 * adapter_params * adapters_per_step;
    let flops_per_token = 2.0 * (cost.params + adapter_params * stack as f64);
    let mut s = Scenario {
        weights: weights.name.clone(),
        clients,
        adapters: count,
        stack,
        requests: results.len(),
        seconds,
        tokens_per_s: tokens as f64 / seconds,
        latency_p50_s: percentile(&latencies, 0.5),
        latency_p99_s: percentile(&latencies, 0.99),
        ttft_p50_s: percentile(&ttfts, 0.5),
        ttft_p99_s: percentile(&ttfts, 0.99),
        ratio_to_one: 1.0,
        steps,
        rows_per_step,
        tokens_per_step,
        bytes_per_step,
        flops_per_step: flops_per_token * tokens_per_step,
        memory_bound_ms: 0.0,
        compute_bound_ms: 0.0,
        bound: "memory",
        share_of_bound: 0.0,
        tally,
        flops_per_token,
        bf16_activations: weights.bf16_activations,
        load_average: load_average(),
    };
    // Against the probes so far, for the line printed as it ends; `run` measures every
    // scenario again against the best of all probes.
    s.measure_against(machine);
    Ok(s)
}
