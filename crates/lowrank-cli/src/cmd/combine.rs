//! `lowrank combine`: several adapters into one plain LoRA adapter (task arithmetic, TIES, DARE,
//! …), exact where the method allows, with the error of every module printed. The math is in
//! `lowrank_algebra::combine`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lowrank_algebra::combine::{self, Input, MajoritySign, Method, Options};
use lowrank_algebra::factored::matrix_from_tensor;
use lowrank_core::lora::LoraAdapter;
use lowrank_models::hub::resolve_adapter_dir;
use lowrank_models::Llama;

use super::NamePath;

const LONG_HELP: &str = "\
Every method works on the updates the adapters make, ΔWᵢ = sᵢ·BᵢAᵢ, weighted by wᵢ (negative
weights subtract). A module missing from an adapter contributes zero; different ranks, scales
(rsLoRA too) and target sets combine. The output is a plain LoRA adapter with scale 1
(lora_alpha = r, rank_pattern/alpha_pattern where a module's rank differs).

  linear           Σ wᵢ·ΔWᵢ exactly, at its numerical rank (≤ Σ rᵢ), computed from the factors
  cat              Σ wᵢ·ΔWᵢ exactly, the factors stacked (rank Σ rᵢ)
  svd              Σ wᵢ·ΔWᵢ truncated to rank ≤ --rank (default: the largest input rank)
  ties             trim each ΔWᵢ to its top --density entries by magnitude, elect a sign per
                   entry from the trimmed weighted values wᵢ·ΔWᵢ (--majority-sign total: their
                   sum ≥ 0 → +; frequency: one vote per adapter), average the values of that
                   sign (the disjoint mean)
  dare_linear      keep each entry of ΔWᵢ with probability --density, rescale by 1/density,
                   Σ wᵢ·(…); the masks depend only on --seed, the module and the adapter's
                   position, so a rerun gives the same adapter
  dare_ties        DARE's drop and rescale, then TIES' election and mean
  magnitude_prune  trim as ties, then Σ wᵢ·(…)
  *_svd            the same merge truncated to rank ≤ --rank; without the suffix the merge is
                   stored exactly (generally full rank: up to min(d, k) per module)

Printed per module: the output rank and the relative Frobenius error of the saved adapter
against the method's target: Σ wᵢ·ΔWᵢ for linear/cat/svd (so the truncation error for svd), the
pruned merge for the others (with how far pruning moved it from Σ wᵢ·ΔWᵢ).

Differences from PEFT's add_weighted_adapter, on purpose: PEFT's linear/ties/dare/magnitude_prune
combine A and B separately (adding cross terms Bᵢ·Aⱼ and pruning factor entries, not ΔW's, and
requiring equal ranks); its svd paths apply the scale sᵢ twice; its TIES elects signs before
weighting, so a subtracted adapter votes with the opposite sign. Here every method means what
it says on Σ wᵢ·ΔWᵢ. Magnitude pruning keeps round(density·n) entries (PEFT: floor).

DoRA inputs combine by their effective update W' − W (W' = m/‖W + s·BA‖·(W + s·BA)), which
needs the base weights: --base MODEL. The result is then a plain LoRA adapter for that base.";

#[derive(clap::Args)]
#[command(after_long_help = LONG_HELP)]
pub struct Args {
    /// Adapter folders or Hub ids (org/name[@revision]) to combine, comma-separated.
    #[arg(long, required = true, value_delimiter = ',')]
    adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated; negative subtracts (e.g. 0.6,-0.4).
    #[arg(
        long,
        required = true,
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    weights: Vec<f64>,
    /// linear, cat, svd, ties, ties_svd, dare_linear, dare_linear_svd, dare_ties, dare_ties_svd,
    /// magnitude_prune, magnitude_prune_svd (see --help).
    #[arg(long, value_parser = parse_method)]
    method: Method,
    /// Output folder (new, or empty); written through a staging folder, so a failed run leaves
    /// nothing.
    #[arg(long)]
    out: PathBuf,
    /// ties/dare/magnitude_prune: the fraction of each update's entries kept, in (0, 1].
    #[arg(long)]
    density: Option<f64>,
    /// ties/dare_ties: elect an entry's sign by the sum of the weighted values (total) or by one
    /// vote per adapter (frequency) [default: total].
    #[arg(long, value_name = "total|frequency", value_parser = parse_majority_sign)]
    majority_sign: Option<MajoritySign>,
    /// svd and *_svd: the output rank per module [default: the largest input rank there].
    #[arg(long)]
    rank: Option<usize>,
    /// dare_*: seed of the random masks [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Base model (folder or Hub id): needed for DoRA inputs, and checks
    /// every adapter against it.
    #[arg(long)]
    base: Option<String>,
}

fn parse_method(s: &str) -> std::result::Result<Method, String> {
    s.parse()
}

fn parse_majority_sign(s: &str) -> std::result::Result<MajoritySign, String> {
    s.parse()
}

pub fn run(args: Args) -> Result<()> {
    if args.weights.len() != args.adapters.len() {
        bail!(
            "--weights: {} weight(s) for {} adapter(s) in --adapters; give one weight per adapter",
            args.weights.len(),
            args.adapters.len()
        );
    }
    let device = super::device();
    let base = args
        .base
        .as_deref()
        .map(|spec| -> Result<Llama> {
            let dir = lowrank_models::checkpoint::resolve_model_dir(spec)?;
            Llama::load(&dir, &device).naming("loading --base", &dir)
        })
        .transpose()?;
    let adapters = args
        .adapters
        .iter()
        .map(|spec| {
            let dir = resolve_adapter_dir(spec)?;
            match &base {
                Some(model) => model.load_adapter(&dir),
                None => LoraAdapter::load_standalone(&dir, &device),
            }
            .naming("loading adapter", spec)
        })
        .collect::<Result<Vec<_>>>()?;
    let inputs: Vec<Input> = adapters
        .iter()
        .zip(&args.adapters)
        .zip(&args.weights)
        .map(|((adapter, dir), weight)| Input {
            label: dir.display().to_string(),
            adapter,
            weight: *weight,
        })
        .collect();
    let options = Options {
        method: args.method,
        density: args.density,
        majority_sign: args.majority_sign,
        rank: args.rank,
        seed: args.seed,
    };
    let base_weight = |name: &str| {
        let model = base.as_ref().expect("only called with --base");
        let linear = model.linear(name).ok_or_else(|| {
            lowrank_algebra::Error::Invalid(format!(
                "module {name:?} is not a linear layer of --base"
            ))
        })?;
        matrix_from_tensor(&linear.base().to_dense(&device)?)
    };
    let mut combined = combine::combine(
        &inputs,
        &options,
        base.as_ref().map(|_| &base_weight as combine::BaseWeights),
    )?;
    if let Some(spec) = &args.base {
        combined.adapter.config.base_model = Some(spec.clone());
    }
    // Finite inputs can still overflow f32 once weighted and summed: write no such adapter.
    for (name, tensor) in combined.adapter.peft_tensors() {
        lowrank_core::finite::ensure_finite(&args.out, &name, &tensor).context(
            "the combined adapter does not fit in f32 (lower --weights); nothing was written",
        )?;
    }
    combine::output::save_to_new_dir(&combined.adapter, &args.out)?;
    print_report(&args, &combined);
    Ok(())
}

/// One line per module, a legend, and a JSON summary as the last line.
fn print_report(args: &Args, combined: &combine::Combined) {
    let method = args.method.name();
    let entrywise = args.method.pruning().is_some();
    let width = combined
        .modules
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let change_header = if entrywise { "  change vs Σ" } else { "" };
    println!(
        "{:<width$}  {:<19}  inputs  rank  rel. error{change_header}",
        "module", "method"
    );
    for m in &combined.modules {
        let change = m
            .change_from_sum
            .map(|c| format!("  {c:>11.4e}"))
            .unwrap_or_default();
        println!(
            "{:<width$}  {method:<19}  {:>6}  {:>4}  {:>10.3e}{change}",
            m.name, m.inputs, m.rank, m.relative_error
        );
    }
    let target = if entrywise {
        "the pruned merge; change vs Σ = ‖merge − Σ wᵢ·ΔWᵢ‖/‖Σ wᵢ·ΔWᵢ‖"
    } else {
        "Σ wᵢ·ΔWᵢ, ΔWᵢ = sᵢ·BᵢAᵢ (DoRA: W' − W)"
    };
    println!("rel. error = ‖saved − target‖_F / ‖target‖_F, target = {target}");
    let max_error = combined
        .modules
        .iter()
        .map(|m| m.relative_error)
        .fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({
            "out": args.out.display().to_string(),
            "method": method,
            "modules": combined.modules.len(),
            "max_relative_error": max_error,
            "parameters": combined.adapter.num_parameters(),
        })
    );
}
