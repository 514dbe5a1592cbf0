//! Prefill of one prompt (`Llama::forward_rows` over one row of N tokens into an empty cache),
//! repeated in one process so that the weights are loaded and the kernels warm: the figure
//! `generate`'s first step gives, without the load around it. Prints milliseconds per prefill
//! and tokens per second.
//!
//! `cargo bench -p lowrank-models --bench prefill -- MODEL_DIR [REPEATS] [TOKENS] [bf16|bf16-act|nf4]`

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use lowrank_models::{KvCache, Llama, RowStep};

mod common;
use common::Res;

fn main() -> Res<()> {
    let args = common::start();
    let dir = PathBuf::from(
        args.first()
            .ok_or("usage: prefill MODEL_DIR [REPEATS] [TOKENS] [bf16|bf16-act|nf4]")?,
    );
    let repeats: usize = args.get(1).map_or(Ok(8), |s| s.parse())?;
    let tokens: usize = args.get(2).map_or(Ok(256), |s| s.parse())?;
    let mut model = Llama::load(&dir, &Device::Cpu)?;
    common::set_weights(&mut model, args.get(3).map(String::as_str))?;
    let prompt: Vec<u32> = (0..tokens).map(|t| 3 + t as u32).collect();
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    pool.install(|| -> Res<()> {
        for _ in 0..repeats {
            let mut cache = KvCache::with_capacity(tokens);
            let start = Instant::now();
            let mut batch = [RowStep {
                tokens: &prompt,
                cache: &mut cache,
                adapters: Vec::new(),
            }];
            model.forward_rows(&mut batch)?;
            let wall = start.elapsed().as_secs_f64();
            println!(
                "{tokens} tokens: {:7.1} ms {:7.1} tokens/s",
                wall * 1e3,
                tokens as f64 / wall
            );
        }
        Ok(())
    })
}
