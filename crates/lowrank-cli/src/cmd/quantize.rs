//! `lowrank quantize`: quantize a model's linear weights to 4 bits (NF4/FP4, optionally with
//! double quantization) and write a checkpoint in the bitsandbytes serialization transformers
//! uses (`load_in_4bit=True`): packed uint8 `weight`, `weight.absmax`, `weight.quant_map`,
//! `weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__*`,
//! and `quantization_config` in config.json.

use std::path::PathBuf;

use super::NamePath;
use anyhow::{bail, Result};
use lowrank_models::{Llama, LoadOptions};
use lowrank_quant::{QuantSpec, QuantType};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder, GGUF file (llama, qwen2, qwen3, phi3, gemma2, gemma3), or Hub id org/name[@revision] (from the HF cache, else downloaded into it).
    #[arg(long)]
    model: String,
    /// Output folder (created; must not hold a checkpoint already).
    #[arg(long)]
    out: PathBuf,
    /// nf4 or fp4.
    #[arg(long, value_name = "nf4|fp4")]
    quant: QuantType,
    /// Quantize the per-block absmax too (≈4.13 instead of 4.5 bits/parameter).
    #[arg(long)]
    double_quant: bool,
    /// Values per absmax block, a power of two from 32 to 4096.
    #[arg(long, default_value_t = lowrank_quant::DEFAULT_BLOCK_SIZE, value_parser = super::parse_block_size)]
    block_size: usize,
}

pub fn run(args: Args) -> Result<()> {
    let dir = lowrank_models::checkpoint::resolve_model_dir(&args.model)?;
    if args.out.join("model.safetensors").exists() || args.out.join("config.json").exists() {
        bail!(
            "{}: already holds a checkpoint; choose an empty folder",
            args.out.display()
        );
    }
    let spec = QuantSpec::new(args.quant, args.double_quant, args.block_size)?;
    let model = Llama::load_with(
        &dir,
        &super::device(),
        &LoadOptions {
            quantize: Some(spec),
        },
    )
    .naming("loading model", &dir)?;
    let memory = model.linear_memory();
    model.save_pretrained(&dir, &args.out)?;
    eprintln!("{}", memory.summary());
    let bytes = std::fs::metadata(args.out.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "wrote {} ({}{}, block size {}; {:.2} MB)",
        args.out.display(),
        args.quant,
        if args.double_quant {
            " + double quant"
        } else {
            ""
        },
        args.block_size,
        bytes as f64 / 1e6
    );
    println!(
        "{}",
        serde_json::json!({
            "out": args.out,
            "quant_type": args.quant.as_str(),
            "double_quant": args.double_quant,
            "block_size": args.block_size,
            "linear_parameters": memory.params,
            "linear_bytes": memory.bytes,
            "bits_per_param": memory.quantized_bits_per_param(),
        })
    );
    Ok(())
}
