//! `lowrank inspect`: what an adapter (a folder or a Hub id) holds.

use std::path::PathBuf;

use super::NamePath;
use anyhow::Result;
use lowrank_core::adalora::{is_adalora_dir, AdaloraAdapter};
use lowrank_core::lora::{LoraAdapter, LoraVariant, CONFIG_FILE, WEIGHTS_FILE};
use lowrank_models::hub::{resolve_adapter_dir, Wanted};
use lowrank_models::ModelConfig;
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Adapter folder (adapter_config.json + adapter_model.safetensors), or Hub id
    /// org/name[@revision].
    adapter: PathBuf,
    /// Base model (folder, GGUF file or Hub id; only its config is read or fetched), for the share of
    /// its parameters (default: the adapter's base_model_name_or_path, when that resolves).
    #[arg(long)]
    model: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct ModuleReport {
    module: String,
    /// AdaLoRA: the kept rank (its `rank_pattern`).
    rank: usize,
    /// AdaLoRA: the initial rank (`init_r`) the rank was allocated from.
    #[serde(skip_serializing_if = "Option::is_none")]
    initial_rank: Option<usize>,
    alpha: f64,
    scale: f64,
    out_features: usize,
    in_features: usize,
    /// r·(d+k), plus d for DoRA's magnitude; AdaLoRA: r·(d+k+1) of the kept rank.
    parameters: usize,
}

#[derive(Serialize)]
struct Report {
    method: &'static str,
    use_rslora: bool,
    modules: Vec<ModuleReport>,
    trainable_parameters: usize,
    base_model: Option<String>,
    base_parameters: Option<usize>,
    /// trainable / base, in percent.
    share_percent: Option<f64>,
    file_bytes: u64,
}

pub fn run(mut args: Args) -> Result<()> {
    args.adapter = resolve_adapter_dir(&args.adapter)?;
    if is_adalora_dir(&args.adapter) {
        return run_adalora(args);
    }
    let adapter = LoraAdapter::load_standalone(&args.adapter, &super::device())
        .naming("reading adapter", &args.adapter)?;
    let config = &adapter.config;
    let modules: Vec<ModuleReport> = adapter
        .modules
        .iter()
        .map(|(name, m)| ModuleReport {
            module: name.clone(),
            rank: m.rank(),
            initial_rank: None,
            alpha: config.alpha_for(name),
            scale: m.scale,
            out_features: m.b.dim(0).unwrap_or(0),
            in_features: m.a.dim(1).unwrap_or(0),
            parameters: m.num_parameters(),
        })
        .collect();
    let method = match config.variant {
        LoraVariant::Lora => "LoRA",
        LoraVariant::Dora => "DoRA",
    };
    let trainable = adapter.num_parameters();
    let base_model = args.model.clone().or_else(|| config.base_model.clone());
    print_report(
        &args,
        method,
        config.use_rslora,
        modules,
        trainable,
        base_model,
    )
}

/// An AdaLoRA adapter: every module with its kept rank of the initial one.
fn run_adalora(args: Args) -> Result<()> {
    let adapter = AdaloraAdapter::load_standalone(&args.adapter, &super::device())
        .naming("reading adapter", &args.adapter)?;
    let config = &adapter.config;
    let modules: Vec<ModuleReport> = adapter
        .modules
        .iter()
        .map(|(name, m)| ModuleReport {
            module: name.clone(),
            rank: config.rank_for(name),
            initial_rank: Some(config.schedule.init_r),
            alpha: config.alpha,
            scale: config.scale(),
            out_features: m.b.dim(0).unwrap_or(0),
            in_features: m.a.dim(1).unwrap_or(0),
            parameters: m.num_parameters(),
        })
        .collect();
    let trainable = adapter.num_parameters();
    let base_model = args.model.clone().or_else(|| config.base_model.clone());
    print_report(&args, "AdaLoRA", false, modules, trainable, base_model)
}

fn print_report(
    args: &Args,
    method: &'static str,
    use_rslora: bool,
    modules: Vec<ModuleReport>,
    trainable: usize,
    base_model: Option<String>,
) -> Result<()> {
    let base_config = |spec: &str| -> Result<ModelConfig> {
        let dir = lowrank_models::hub::resolve(spec, Wanted::ModelConfig)?;
        Ok(ModelConfig::load_for_model(&dir)?)
    };
    // A --model given must resolve; the adapter's own base_model_name_or_path is a best effort.
    let base_parameters = match (&args.model, base_model.as_deref()) {
        (Some(spec), _) => Some(base_config(spec)?.num_parameters()),
        (None, Some(spec)) => base_config(spec).ok().map(|c| c.num_parameters()),
        (None, None) => None,
    };
    let file_bytes = [CONFIG_FILE, WEIGHTS_FILE]
        .iter()
        .filter_map(|f| std::fs::metadata(args.adapter.join(f)).ok())
        .map(|m| m.len())
        .sum();
    let report = Report {
        method,
        use_rslora,
        trainable_parameters: trainable,
        share_percent: base_parameters.map(|b| 100.0 * trainable as f64 / b as f64),
        base_model,
        base_parameters,
        modules,
        file_bytes,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} adapter{}: {}",
        report.method,
        if report.use_rslora {
            " (rsLoRA: α/√r)"
        } else {
            ""
        },
        args.adapter.display()
    );
    println!(
        "{:<44} {:>5} {:>8} {:>9} {:>11} {:>10}",
        "module", "rank", "alpha", "scale", "shape", "params"
    );
    for m in &report.modules {
        let shape = format!("{}x{}", m.out_features, m.in_features);
        let rank = match m.initial_rank {
            Some(init) => format!("{}/{init}", m.rank),
            None => m.rank.to_string(),
        };
        println!(
            "{:<44} {:>5} {:>8} {:>9.4} {:>11} {:>10}",
            m.module, rank, m.alpha, m.scale, shape, m.parameters
        );
    }
    print!("trainable parameters: {}", report.trainable_parameters);
    match (report.base_parameters, report.share_percent) {
        (Some(b), Some(p)) => println!(" = {p:.4}% of the base's {b}"),
        _ => println!(" (base model not found locally: pass --model for the share)"),
    }
    println!("file size: {} bytes", report.file_bytes);
    Ok(())
}
