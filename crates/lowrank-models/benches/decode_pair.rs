//! Unmerged LoRA decoding against merged (and the base) in one process, token by token.
//!
//! `cargo bench -p lowrank-models --bench decode_pair -- MODEL_DIR ADAPTER_DIR [TOKENS]`
//! (`scripts/bench.py` runs it on its SmolLM-135M-shaped model and adapter).
//!
//! Decoding is bound by memory bandwidth, and on a shared host that moves by tens of percent
//! within seconds, so separate runs cannot show a 5% difference. Here they decode in
//! lockstep over their own KV caches — one token each in turn, the order rotating every step —
//! and each step's times are compared with each other: the figures are medians of per-step
//! ratios, taken over the same seconds of memory traffic.
//!
//! Each decode is `Llama::forward`, as `lowrank generate` runs it: a step with an unmerged
//! adapter has the pool's other thread awake as its helper (`lowrank_kernels::with_helpers`).
//!
//! A fourth decode splits unmerged decoding's extra time in two: the same adapter code path
//! with every module's A and B replaced by those of the first module of the same shapes, so
//! the few distinct factors stay in cache. Its time over merged is what the LoRA arithmetic
//! and bookkeeping cost; the rest of unmerged's is what reading A and B from memory costs.
//!
//! The bandwidth bound is read the same way: every fourth step the pool's threads sum a 1 GiB
//! buffer (one long stream each, on 2 MiB pages as the weights are), and each decode's bytes of
//! weights per token over its time in that step, as a share of that reading, is one sample of
//! its share of the bound.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use lowrank_core::lora::LoraAdapter;
use lowrank_models::{ActiveAdapter, KvCache, Llama};
use rayon::prelude::*;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Bytes a batch-1 decoding step reads from the weights: every decoder linear and the head.
fn weight_bytes(model: &Llama) -> usize {
    let head = model.head_weight();
    model.linear_memory().bytes + head.elem_count() * head.dtype().size_in_bytes()
}

/// GB/s of the thread pool summing `buffer` (f32) once.
fn read_bandwidth(buffer: &Tensor) -> Res<f64> {
    let (storage, _) = buffer.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return Err("the bandwidth buffer must be an f32 CPU tensor".into());
    };
    // One long stream per thread: the hardware prefetchers run ahead best on those.
    let per_thread = data.len().div_ceil(rayon::current_num_threads());
    let start = Instant::now();
    let total: f32 = data
        .par_chunks(per_thread)
        .map(|chunk| {
            // Sixteen independent sums, so the loop vectorises and no add waits on the last.
            let mut acc = [0f32; 16];
            for block in chunk.chunks_exact(16) {
                for (a, x) in acc.iter_mut().zip(block) {
                    *a += x;
                }
            }
            acc.iter().sum::<f32>()
        })
        .sum();
    let secs = start.elapsed().as_secs_f64();
    std::hint::black_box(total);
    Ok((data.len() * 4) as f64 / secs / 1e9)
}

/// `adapter` with each module's A and B replaced by those of the first module (in key order)
/// with the same shapes, and the bytes of the distinct factors left. The modules share the
/// tensors themselves, which decoding's packed copy of the factors keeps shared.
fn with_shared_factors(adapter: &LoraAdapter) -> (LoraAdapter, usize) {
    let mut shared = adapter.clone();
    let mut first: HashMap<(Vec<usize>, Vec<usize>), (Tensor, Tensor)> = HashMap::new();
    for module in shared.modules.values_mut() {
        let shapes = (module.a.dims().to_vec(), module.b.dims().to_vec());
        let (a, b) = first
            .entry(shapes)
            .or_insert_with(|| (module.a.clone(), module.b.clone()));
        module.a = a.clone();
        module.b = b.clone();
    }
    let bytes = first
        .values()
        .map(|(a, b)| (a.elem_count() + b.elem_count()) * 4)
        .sum();
    (shared, bytes)
}

fn main() -> Res<()> {
    // As the CLI does: no spinning in candle's pool, freed memory kept by malloc, the main
    // thread one of rayon's workers.
    lowrank_kernels::process::set_up();
    // cargo bench appends `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [model_dir, adapter_dir, rest @ ..] = args.as_slice() else {
        eprintln!("usage: decode_pair MODEL_DIR ADAPTER_DIR [TOKENS]");
        std::process::exit(2);
    };
    let tokens: usize = match rest.first() {
        Some(n) => n.parse()?,
        None => 128,
    };
    let device = Device::Cpu;
    let unmerged_model = Llama::load(Path::new(model_dir), &device)?;
    let adapter = unmerged_model.load_adapter(Path::new(adapter_dir))?;
    let mut merged_model = Llama::load(Path::new(model_dir), &device)?;
    merged_model.merge_adapter("bench", &adapter, 1.0)?;
    let active = [ActiveAdapter::new(&adapter)];
    let (cached, cached_bytes) = with_shared_factors(&adapter);
    let cached_active = [ActiveAdapter::new(&cached)];
    // (name, model, adapters); each with its own cache.
    let runs: [(&str, &Llama, &[ActiveAdapter]); 4] = [
        ("unmerged", &unmerged_model, &active),
        ("merged", &merged_model, &[]),
        ("base", &unmerged_model, &[]),
        ("unmerged, factors cached", &unmerged_model, &cached_active),
    ];
    let mut caches: Vec<KvCache> = runs.iter().map(|_| KvCache::new()).collect();
    let prompt = Tensor::new(&[1u32, 2, 3, 4, 5, 6, 7, 8], &device)?.unsqueeze(0)?;
    for ((_, model, adapters), cache) in runs.iter().zip(caches.iter_mut()) {
        model.forward(&prompt, Some(cache), adapters)?;
    }
    let adapter_bytes: usize = adapter
        .modules
        .values()
        .map(|m| (m.a.elem_count() + m.b.elem_count()) * 4)
        .sum();
    let bytes = [
        weight_bytes(&unmerged_model) + adapter_bytes,
        weight_bytes(&merged_model),
        weight_bytes(&unmerged_model),
        weight_bytes(&unmerged_model) + cached_bytes,
    ];
    let buffer = Tensor::ones(1usize << 28, DType::F32, &device)?;
    lowrank_kernels::back_with_huge_pages(&[&buffer]);
    read_bandwidth(&buffer)?;
    let mut bandwidths = Vec::new();
    let mut shares = vec![Vec::new(); runs.len()];
    let mut times = vec![Vec::with_capacity(tokens); runs.len()];
    for step in 0..tokens {
        let token = Tensor::new(&[(10 + step % 1000) as u32], &device)?.unsqueeze(0)?;
        for k in 0..runs.len() {
            let i = (step + k) % runs.len();
            let (_, model, adapters) = runs[i];
            let start = Instant::now();
            model.forward(&token, Some(&mut caches[i]), adapters)?;
            times[i].push(start.elapsed().as_secs_f64());
        }
        if step % 4 == 0 {
            let bandwidth = read_bandwidth(&buffer)?;
            bandwidths.push(bandwidth);
            for i in 0..runs.len() {
                let rate = bytes[i] as f64 / times[i][step] / 1e9;
                shares[i].push(rate / bandwidth);
            }
        }
    }
    for ((name, _, _), t) in runs.iter().zip(&times) {
        println!(
            "{name}: {:.2} ms per token (median)",
            1e3 * median(t.clone())
        );
    }
    let ratio =
        |a: usize, b: usize| median(times[a].iter().zip(&times[b]).map(|(x, y)| x / y).collect());
    println!(
        "per-step ratios over {tokens} tokens: unmerged / merged {:.3}, base / merged {:.3}, \
         unmerged with its factors in cache / merged {:.3}",
        ratio(0, 1),
        ratio(2, 1),
        ratio(3, 1)
    );
    println!(
        "read bandwidth ({} threads summing 1 GiB, every fourth step): {:.1} to {:.1} GB/s, median {:.1}",
        rayon::current_num_threads(),
        bandwidths.iter().copied().fold(f64::INFINITY, f64::min),
        bandwidths.iter().copied().fold(0.0, f64::max),
        median(bandwidths.clone())
    );
    for (((name, _, _), share), bytes) in runs.iter().zip(shares).zip(bytes) {
        println!(
            "{name}: {:.1} MB of weights per token, {:.0}% of the bound (median of per-step shares)",
            bytes as f64 / 1e6,
            100.0 * median(share)
        );
    }
    Ok(())
}
