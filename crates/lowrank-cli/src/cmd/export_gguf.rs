//! `lowrank export-gguf`: a LoRA adapter as llama.cpp's GGUF-LoRA file (what its
//! `convert_lora_to_gguf.py` writes), for `llama-cli --lora` and Ollama's `ADAPTER`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lowrank_core::lora::LoraAdapter;
use lowrank_models::hub::{resolve, resolve_adapter_dir, Wanted};
use lowrank_models::ModelConfig;

use super::{device, NamePath};

#[derive(clap::Args)]
pub struct Args {
    /// PEFT LoRA adapter folder or Hub id org/name[@revision].
    adapter: PathBuf,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// Base model (folder, GGUF file or Hub id; only its config is read) [default: the
    /// adapter's base_model_name_or_path].
    #[arg(long)]
    model: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let dir = resolve_adapter_dir(&args.adapter)?;
    let adapter =
        LoraAdapter::load_standalone(&dir, &device()).naming("loading adapter", &args.adapter)?;
    let base = match args
        .model
        .clone()
        .or_else(|| adapter.config.base_model.clone())
    {
        Some(spec) => spec,
        None => anyhow::bail!(
            "{}: adapter_config.json names no base_model_name_or_path; pass --model BASE",
            dir.display()
        ),
    };
    let base_dir = resolve(&base, Wanted::ModelConfig)
        .with_context(|| "--model: the base model's config is needed")?;
    let config = ModelConfig::load_for_model(&base_dir)?;
    let name = std::fs::canonicalize(&dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let gguf = lowrank_models::gguf_export::lora_adapter_gguf(&adapter, &name, &config)
        .naming("exporting adapter", &args.adapter)?;
    lowrank_core::files::write_atomic(&args.out, &gguf.to_bytes())?;
    eprintln!(
        "wrote {} ({} LoRA modules, GGUF-LoRA for llama.cpp)",
        args.out.display(),
        adapter.modules.len()
    );
    Ok(())
}
