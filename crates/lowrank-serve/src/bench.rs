//! `lowrank bench-serve`: a bounded load test on loopback. It writes N random adapters for the
//! model, starts the server in this process on 127.0.0.1, and sends a fixed number of
//! requests from concurrent clients spread over 1, 8, 64, ... adapters, reporting throughput,
//! latency percentiles and the throughput ratio of many adapters to one (S-LoRA holds ≈ 0.9).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use lowrank_core::lora::{LoraAdapter, LoraConfig, LoraModule};
use lowrank_core::targets::ModuleSelector;
use serde_json::json;

use crate::server::ServeOptions;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: String,
    pub adapter_counts: Vec<usize>,
    pub clients: usize,
    pub requests: usize,
    pub max_tokens: usize,
    pub rank: usize,
    /// Hard cap on each scenario's wall time.
    pub time_limit: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Scenario {
    pub adapters: usize,
    pub requests: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    pub latency_p50_s: f64,
    pub latency_p90_s: f64,
    pub latency_p99_s: f64,
    /// Throughput relative to the one-adapter scenario.
    pub ratio_to_one: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
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

pub async fn run(opts: &BenchOptions) -> Result<BenchReport, String> {
    let dir =
        lowrank_models::checkpoint::resolve_model_dir(&opts.model).map_err(|e| e.to_string())?;
    let model = lowrank_models::Llama::load(&dir, &Device::Cpu).map_err(|e| e.to_string())?;
    let max_count = opts.adapter_counts.iter().copied().max().unwrap_or(1);
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    eprintln!("writing {max_count} adapters (rank {}) ...", opts.rank);
    write_adapters(&model, root.path(), max_count, opts.rank)?;
    let linears = model.linears();
    let start = Instant::now();
    let probes = max_count.min(16);
    for i in 0..probes {
        LoraAdapter::load(
            &root.path().join(format!("tenant-{i:04}")),
            &linears,
            &Device::Cpu,
        )
        .map_err(|e| e.to_string())?;
    }
    let adapter_load_ms = start.elapsed().as_secs_f64() * 1000.0 / probes as f64;
    let adapter_bytes = ["adapter_model.safetensors", "adapter_config.json"]
        .iter()
        .filter_map(|f| std::fs::metadata(root.path().join("tenant-0000").join(f)).ok())
        .map(|m| m.len())
        .sum();
    drop(model);

    let mut scenarios: Vec<Scenario> = Vec::new();
    for &count in &opts.adapter_counts {
        let serve = ServeOptions {
            model: opts.model.clone(),
            adapters: root.path().to_path_buf(),
            host: "127.0.0.1".into(),
            port: 0,
            api_keys: None,
            max_batch: opts.clients,
            max_queue: opts.clients * 4,
            max_loaded_adapters: max_count,
            adapter_memory_mb: 1 << 14,
            kv_cache_mb: 4096,
            max_tokens_limit: opts.max_tokens,
            max_body_bytes: 1 << 20,
            request_timeout: opts.time_limit.max(Duration::from_secs(1)),
            // Every client's connection, and the listener's neighbours in the default limit.
            max_connections: (opts.clients * 2).max(64),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            allow_any_adapter_path: false,
            allow_hub_adapters: false,
            merge: None,
            served_model_name: Some("base".into()),
            bf16_weights: false,
            quantize: None,
        };
        let state = crate::build_state(&serve)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let url = format!(
            "http://{}/v1/completions",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::serve_on(state, listener, async {
            let _ = stop_rx.await;
        }));
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let deadline = Instant::now() + opts.time_limit;
        let begin = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..opts.clients {
            let (next, url, total, max_tokens) =
                (next.clone(), url.clone(), opts.requests, opts.max_tokens);
            clients.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total || Instant::now() > deadline {
                        return out;
                    }
                    let body = json!({"model": format!("tenant-{:04}", i % count), "prompt": format!("request {i} says"),
                                      "max_tokens": max_tokens, "temperature": 0});
                    let t = Instant::now();
                    let Ok(resp) = http.post(&url).json(&body).send().await else { continue };
                    let Ok(v) = resp.json::<serde_json::Value>().await else { continue };
                    let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                    out.push((t.elapsed().as_secs_f64(), tokens));
                }
            }));
        }
        let mut results = Vec::new();
        for c in clients {
            results.extend(c.await.map_err(|e| e.to_string())?);
        }
        let seconds = begin.elapsed().as_secs_f64();
        let _ = stop_tx.send(());
        server
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let mut latencies: Vec<f64> = results.iter().map(|r| r.0).collect();
        latencies.sort_by(f64::total_cmp);
        let tokens: u64 = results.iter().map(|r| r.1).sum();
        let tokens_per_s = tokens as f64 / seconds;
        let ratio_to_one = scenarios
            .first()
            .map_or(1.0, |one| tokens_per_s / one.tokens_per_s);
        let s = Scenario {
            adapters: count,
            requests: results.len(),
            seconds,
            tokens_per_s,
            requests_per_s: results.len() as f64 / seconds,
            latency_p50_s: percentile(&latencies, 0.5),
            latency_p90_s: percentile(&latencies, 0.9),
            latency_p99_s: percentile(&latencies, 0.99),
            ratio_to_one,
        };
        eprintln!("{count} adapter(s): {:.1} tokens/s", s.tokens_per_s);
        scenarios.push(s);
    }
    Ok(BenchReport {
        scenarios,
        adapter_load_ms,
        adapter_bytes,
    })
}
