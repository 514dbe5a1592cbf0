//! `lowrank merge`: W ← W + s·BA (DoRA: W ← m/‖W + s·BA‖·(W + s·BA)) written as a complete
//! Hugging Face checkpoint folder in the base's dtype.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

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

/// Files copied unchanged from the base checkpoint.
const COPIED: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

pub fn run(args: Args) -> Result<()> {
    let mut loaded = load_model(&args.model)?;
    if args.out.join("model.safetensors").exists() || args.out.join("config.json").exists() {
        bail!("{}: already holds a checkpoint; choose an empty folder", args.out.display());
    }
    let adapters = load_adapters(&loaded.model, &args.adapter)?;
    for (i, (adapter, weight)) in adapters.iter().enumerate() {
        loaded.model.merge_adapter(&format!("adapter{i}"), adapter, *weight)?;
    }
    // Write into a temporary sibling folder, then rename, so a failed run leaves nothing half-written.
    let parent = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = tempfile::Builder::new().prefix(".lowrank-merge-").tempdir_in(&parent)?;
    let weights = loaded.model.named_weights()?;
    lowrank_core::files::write_safetensors(&staging.path().join("model.safetensors"), &weights)?;
    for name in COPIED {
        let src = loaded.dir.join(name);
        if src.exists() {
            std::fs::copy(&src, staging.path().join(name)).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    if args.out.exists() {
        // An existing empty folder: move the files in.
        for entry in std::fs::read_dir(staging.path())? {
            let entry = entry?;
            std::fs::rename(entry.path(), args.out.join(entry.file_name()))?;
        }
    } else {
        std::fs::rename(staging.keep(), &args.out).with_context(|| format!("creating {}", args.out.display()))?;
    }
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
