//! Prefill of one prompt (`Llama::forward_rows` over one row of N tokens into an empty cache),
//! repeated in one process so that the weights are loaded and the kernels warm: the figure
//! `generate`'s first step gives, without the load around it. Prints milliseconds per prefill
//! and tokens per second.
//!
//! `cargo bench -p lowrank-models --bench prefill -- MODEL_DIR [REPEATS] [TOKENS] [bf16|bf16-act|nf4]`

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use lowrank_core::QuantSpec;
use lowrank_models::{KvCache, Llama, RowStep};
use lowrank_quant::QuantType;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> Res<()> {
    lowrank_kernels::process::set_up();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let dir = PathBuf::from(
        args.first()
            .ok_or("usage: prefill MODEL_DIR [REPEATS] [TOKENS] [bf16|bf16-act|nf4]")?,
    );
    let repeats: usize = args.get(1).map_or(Ok(8), |s| s.parse())?;
    let tokens: usize = args.get(2).map_or(Ok(256), |s| s.parse())?;
    let mut model = Llama::load(&dir, &Device::Cpu)?;
    match args.get(3).map(String::as_str) {
        None => {}
        Some("bf16") => model.cast_for_inference(candle_core::DType::BF16)?,
        Some("bf16-act") => {
            model.cast_for_inference(candle_core::DType::BF16)?;
            model.round_activations_to_bf16()?;
        }
        Some("nf4") => {
            model.quantize_linears(&QuantSpec::new(QuantType::Nf4, true, 64)?)?;
            model.cast_for_inference(candle_core::DType::BF16)?;
        }
        Some(other) => {
            return Err(format!("weights `{other}`: expected bf16, bf16-act or nf4").into())
        }
    }
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
