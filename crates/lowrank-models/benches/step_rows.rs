//! The batched inference step (`Llama::forward_rows`) at 1 to 32 decoding rows, without the
//! server around it: each row has prefilled its own prompt, then every row decodes a token per
//! step. Prints wall and process CPU milliseconds per step and tokens per second, over the
//! base, with one random rank-16 LoRA (q and v) for every row, and with a different one per
//! row (the serving goal: many tenants' adapters cost about what one adapter costs).
//!
//! `cargo bench --workspace --bench step_rows -- MODEL_DIR [STEPS] [ROWS,ROWS,…] [f32|bf16|bf16-act|nf4] [RANK]`
//! (the weight formats of `common::set_weights`; rank 16 unless given, `bench-serve`'s is 8).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use lowrank_core::lora::{LoraAdapter, LoraConfig, LoraModule};
use lowrank_core::targets::ModuleSelector;
use lowrank_models::{KvCache, Llama, RowStep};

mod common;
use common::Res;

/// CPU seconds this process has used, all threads.
fn cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Which adapters a step's rows decode with.
#[derive(Clone, Copy)]
enum Lora {
    None,
    /// The same adapter for every row.
    Shared,
    /// A different adapter for each row.
    PerRow,
}

/// A random rank-`rank` LoRA on q and v.
fn adapter(model: &Llama, rank: usize) -> Res<LoraAdapter> {
    let config = LoraConfig::new(
        rank,
        2.0 * rank as f64,
        ModuleSelector::Names(vec!["q_proj".into(), "v_proj".into()]),
    );
    let mut modules = std::collections::BTreeMap::new();
    for l in model
        .linears()
        .into_iter()
        .filter(|l| config.targets_module(&l.name))
    {
        let a = Tensor::randn(0f32, 0.05, (rank, l.in_features), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 0.05, (l.out_features, rank), &Device::Cpu)?;
        let module = LoraModule {
            a,
            b,
            magnitude: None,
            scale: 2.0,
        };
        modules.insert(l.name, module);
    }
    Ok(LoraAdapter { config, modules })
}

fn main() -> Res<()> {
    let args = common::start();
    let dir = PathBuf::from(args.first().ok_or(
        "usage: step_rows MODEL_DIR [STEPS] [ROWS,ROWS,…] [f32|bf16|bf16-act|nf4] [RANK]",
    )?);
    let steps: usize = args.get(1).map_or(Ok(16), |s| s.parse())?;
    let row_counts: Vec<usize> = args
        .get(2)
        .map_or("1,2,4,8,16,32", |s| s.as_str())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let mut model = Llama::load(&dir, &Device::Cpu)?;
    common::set_weights(&mut model, args.get(3).map(String::as_str))?;
    let rank: usize = args.get(4).map_or(Ok(16), |s| s.parse())?;
    let adapters: Vec<LoraAdapter> = (0..32).map(|_| adapter(&model, rank)).collect::<Res<_>>()?;
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    println!(
        "threads: {}; ms per step (wall, process CPU), tokens/s",
        pool.current_num_threads()
    );
    pool.install(|| -> Res<()> {
        for lora in [Lora::None, Lora::Shared, Lora::PerRow] {
            for &rows in &row_counts {
                let mut caches: Vec<KvCache> = (0..rows)
                    .map(|_| KvCache::with_capacity(64 + steps))
                    .collect();
                let prompts: Vec<Vec<u32>> = (0..rows)
                    .map(|r| (0..16).map(|t| 3 + (r * 16 + t) as u32).collect())
                    .collect();
                let row_adapters = |r: usize| match lora {
                    Lora::None => Vec::new(),
                    Lora::Shared => vec![(&adapters[0], 1.0)],
                    Lora::PerRow => vec![(&adapters[r % adapters.len()], 1.0)],
                };
                let step = |tokens: &[Vec<u32>], caches: &mut [KvCache]| -> Res<Vec<u32>> {
                    let mut batch: Vec<RowStep> = caches
                        .iter_mut()
                        .zip(tokens)
                        .enumerate()
                        .map(|(r, (cache, tokens))| RowStep {
                            tokens,
                            cache,
                            adapters: row_adapters(r),
                        })
                        .collect();
                    let logits = model.forward_rows(&mut batch)?;
                    Ok(logits
                        .to_vec2::<f32>()?
                        .iter()
                        .map(|l| lowrank_models::generate::argmax(l))
                        .collect())
                };
                let mut next: Vec<Vec<u32>> = step(&prompts, &mut caches)?
                    .into_iter()
                    .map(|t| vec![t])
                    .collect();
                let (wall, cpu) = (Instant::now(), cpu_seconds());
                for _ in 0..steps {
                    next = step(&next, &mut caches)?
                        .into_iter()
                        .map(|t| vec![t])
                        .collect();
                }
                let (wall, cpu) = (
                    wall.elapsed().as_secs_f64() / steps as f64,
                    (cpu_seconds() - cpu) / steps as f64,
                );
                println!(
                    "{} {rows:3} rows: {:7.1} ms wall {:7.1} ms CPU {:7.1} tokens/s",
                    match lora {
                        Lora::None => "base        ",
                        Lora::Shared => "one LoRA    ",
                        Lora::PerRow => "LoRA per row",
                    },
                    wall * 1e3,
                    cpu * 1e3,
                    rows as f64 / wall
                );
            }
        }
        Ok(())
    })
}
