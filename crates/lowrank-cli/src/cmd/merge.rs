//! `lowrank merge`: W ← W + s·BA (DoRA: W ← m/‖W + s·BA‖·(W + s·BA)) written as a complete
//! Hugging Face checkpoint folder in the base's dtype.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::{load_adapters, load_model, AdapterSpec};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder or repo id in the local HF cache.
    #[arg(long)]
    model: String,
    /// PEFT adapter folder, optionally `PATH:WEIGHT`; repeat to merge several.
    #[arg(long, required = true)]
    adapter: Vec<AdapterSpec>,
    /// Output folder (created; must not hold a checkpoint already).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let mut loaded = load_model(&args.model)?;
    if args.out.join("model.safetensors").exists() || args.out.join("config.json").exists() {
        bail!("{}: already holds a checkpoint; choose an empty folder", args.out.display());
    }
    let adapters = load_adapters(&loaded.model, &args.adapter)?;
    for (i, (adapter, weight)) in adapters.iter().enumerate() {
        loaded.model.merge_adapter(&format!("adapter{i}"), adapter, *weight)?;
    }
    loaded.model.save_pretrained(&loaded.dir, &args.out)?;
    let weights = loaded.model.named_weights()?;
    let bytes: u64 = weights.iter().map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum();
    eprintln!(
        "merged {} adapter(s) into {} ({:?}, {:.1} MB of weights)",
        adapters.len(),
        args.out.display(),
        loaded.model.stored_dtype(),
        bytes as f64 / 1e6
    );
    Ok(())
}
