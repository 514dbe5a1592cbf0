//! `lowrank merge`: W ← W + s·BA (DoRA: W ← m/‖W + s·BA‖·(W + s·BA)) written as a complete
//! Hugging Face checkpoint folder in the base's dtype. Over a 4-bit base (pre-quantized, or
//! `--quantize`d at load) the base is dequantized and the result written in full precision,
//! or with `--requantize` quantized again (bitsandbytes layout) with the error it introduced
//! printed.

use std::path::PathBuf;

use anyhow::{bail, Result};

use lowrank_models::gguf_export::GgufFileType;

use super::{load_adapters, load_model_with, AdapterSpec, QuantArgs};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder, GGUF file (llama, qwen2, qwen3, phi3, gemma2, gemma3), or Hub id org/name[@revision] (from the HF cache, else downloaded into it).
    #[arg(long)]
    model: String,
    /// PEFT adapter folder or Hub id org/name[@revision], optionally with `:WEIGHT`; repeat to merge several.
    #[arg(long, required = true)]
    adapter: Vec<AdapterSpec>,
    /// Output folder (created; must not hold a checkpoint already), or a `.gguf` file: the
    /// merged model for llama.cpp, as its convert_hf_to_gguf.py writes it (llama, qwen2, qwen3, phi3, gemma2, gemma3).
    #[arg(long)]
    out: PathBuf,
    /// With `--out x.gguf`: the type of the weights, f32, f16, bf16 or q8_0 (vectors and
    /// norms stay f32, as the converter keeps them) [default: f16].
    #[arg(long, value_name = "f32|f16|bf16|q8_0")]
    gguf_type: Option<GgufFileType>,
    /// Write the merged weights 4-bit again (the base's quant type, double quantization and
    /// block size, or those of --quantize) and print the quantization error introduced.
    #[arg(long)]
    requantize: bool,
    #[command(flatten)]
    quant: QuantArgs,
}

pub fn run(args: Args) -> Result<()> {
    let to_gguf = args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if args.gguf_type.is_some() && !to_gguf {
        bail!("--gguf-type needs --out FILE.gguf");
    }
    if to_gguf && args.requantize {
        bail!(
            "--requantize writes a bitsandbytes checkpoint; with --out FILE.gguf use --gguf-type"
        );
    }
    let mut loaded = load_model_with(&args.model, &args.quant)?;
    if args.out.join("model.safetensors").exists() || args.out.join("config.json").exists() {
        bail!(
            "{}: already holds a checkpoint; choose an empty folder",
            args.out.display()
        );
    }
    // The 4-bit format to requantize to: that of the base's weights.
    let requant = if args.requantize {
        let first = loaded.model.linears().into_iter().find_map(|l| {
            loaded
                .model
                .linear(&l.name)
                .and_then(|x| x.base().as_quantized().cloned())
        });
        match first {
            Some(q) => Some(lowrank_quant::QuantSpec::new(
                q.kind(),
                q.is_double_quant(),
                q.block_size(),
            )?),
            None => bail!(
                "--requantize needs a 4-bit base: a pre-quantized checkpoint or --quantize nf4|fp4"
            ),
        }
    } else {
        None
    };
    let adapters = load_adapters(&loaded.model, &args.adapter)?;
    for (i, (adapter, weight)) in adapters.iter().enumerate() {
        loaded
            .model
            .merge_adapter(&format!("adapter{i}"), adapter, *weight)?;
    }
    if to_gguf {
        loaded.model.dequantize_linears()?;
        let file_type = args.gguf_type.unwrap_or(GgufFileType::F16);
        let name = args
            .out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let gguf = lowrank_models::gguf_export::model_gguf(
            &loaded.model,
            &loaded.tokenizer,
            &name,
            file_type,
        )?;
        let bytes = gguf.to_bytes();
        lowrank_core::files::write_atomic(&args.out, &bytes)?;
        eprintln!(
            "merged {} adapter(s) into {} (GGUF {file_type:?}, {:.1} MB)",
            adapters.len(),
            args.out.display(),
            bytes.len() as f64 / 1e6
        );
        return Ok(());
    }
    match &requant {
        Some(spec) => {
            // Layers no adapter touched are still packed and are written as they were.
            let stats = loaded.model.quantize_linears(spec)?;
            eprintln!(
                "requantized {} merged parameters to {}{}: relative error ‖W − q(W)‖/‖W‖ = {:.6}, rms {:.3e}, max |error| {:.3e}",
                stats.numel,
                spec.kind,
                if spec.double_quant { " + double quant" } else { "" },
                stats.relative_error(),
                stats.rms_error(),
                stats.max_abs_error
            );
            println!(
                "{}",
                serde_json::json!({
                    "requantized_parameters": stats.numel,
                    "relative_error": stats.relative_error(),
                    "rms_error": stats.rms_error(),
                    "max_abs_error": stats.max_abs_error,
                })
            );
        }
        None => loaded.model.dequantize_linears()?,
    }
    loaded.model.save_pretrained(&loaded.dir, &args.out)?;
    let bytes: u64 = std::fs::metadata(args.out.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "merged {} adapter(s) into {} ({}, {:.1} MB of weights)",
        adapters.len(),
        args.out.display(),
        if requant.is_some() {
            "4-bit".to_string()
        } else {
            format!("{:?}", loaded.model.stored_dtype())
        },
        bytes as f64 / 1e6
    );
    Ok(())
}
