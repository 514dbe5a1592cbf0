//! One file per subcommand; shared loading helpers here.

pub mod analyze;
pub mod bench_serve;
pub mod combine;
pub mod demo;
pub mod eval;
pub mod export_gguf;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod quantize;
pub mod serve;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use lowrank_core::lora::LoraAdapter;
use lowrank_models::hub::resolve_adapter_dir;
use lowrank_models::{ActiveAdapter, Llama, LoadOptions, Tokenizer};
use lowrank_quant::{QuantSpec, QuantType};

/// Puts what was being done with a path in front of an error ("loading adapter DIR: ..."),
/// leaving the path out when the error names it already: the library's errors name the file
/// at fault, and "loading adapter a: a/adapter_config.json: ..." says the folder twice.
pub trait NamePath<T> {
    fn naming(self, what: &str, path: &Path) -> Result<T>;
}

impl<T, E: Into<anyhow::Error>> NamePath<T> for std::result::Result<T, E> {
    fn naming(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| {
            let e: anyhow::Error = e.into();
            let path = path.display().to_string();
            if format!("{e:#}").contains(&path) {
                e.context(what.to_string())
            } else {
                e.context(format!("{what} {path}"))
            }
        })
    }
}

/// The compute device. CPU for now; a CUDA build would choose it here.
pub fn device() -> Device {
    Device::Cpu
}

/// A base model with its tokenizer.
pub struct Loaded {
    pub dir: PathBuf,
    pub model: Llama,
    pub tokenizer: Tokenizer,
}

/// Loads `--model`, quantizing its linear weights to 4 bits when `--quantize` says so; a 4-bit
/// model (quantized now or pre-quantized) reports its linear weights' memory on stderr.
pub fn load_model_with(spec: &str, quant: &QuantArgs) -> Result<Loaded> {
    let dir = lowrank_models::checkpoint::resolve_model_dir(spec)?;
    let opts = LoadOptions {
        quantize: quant.spec()?,
    };
    let model = Llama::load_with(&dir, &device(), &opts).naming("loading model", &dir)?;
    if model.is_quantized() {
        eprintln!("{}", model.linear_memory().summary());
    }
    let tokenizer = Tokenizer::load(&dir)?;
    Ok(Loaded {
        dir,
        model,
        tokenizer,
    })
}

/// `--quantize nf4|fp4 [--double-quant] [--block-size N]`: a 4-bit base (QLoRA), quantized at
/// load: every linear weight of the decoder layers; embeddings, norms and lm_head stay full
/// precision (as transformers' `BitsAndBytesConfig(load_in_4bit=True)`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct QuantArgs {
    /// Quantize the decoder layers' linear weights to 4 bits at load: nf4 or fp4.
    #[arg(long, value_name = "nf4|fp4")]
    pub quantize: Option<QuantType>,
    /// With --quantize: quantize the per-block absmax too (≈4.13 instead of 4.5 bits/parameter).
    #[arg(long, requires = "quantize")]
    pub double_quant: bool,
    /// With --quantize: values per absmax block, a power of two from 32 to 4096 [default: 64].
    #[arg(long, value_parser = parse_block_size, requires = "quantize")]
    pub block_size: Option<usize>,
}

impl QuantArgs {
    /// The quantization the flags ask for (none without `--quantize`).
    pub fn spec(&self) -> Result<Option<QuantSpec>> {
        let spec = |kind| {
            let block_size = self.block_size.unwrap_or(lowrank_quant::DEFAULT_BLOCK_SIZE);
            QuantSpec::new(kind, self.double_quant, block_size)
        };
        Ok(self.quantize.map(spec).transpose()?)
    }
}

/// `--block-size`: a power of two from 32 to 4096.
pub fn parse_block_size(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    lowrank_quant::validate_block_size(n).map_err(|e| e.to_string())?;
    Ok(n)
}

/// The model a command runs and the adapters it applies (`eval`, `generate`).
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model folder, GGUF file (llama, qwen2, qwen3, phi3, gemma2, gemma3), or Hub id org/name[@revision] (from the HF cache, else downloaded into it).
    #[arg(long)]
    pub model: String,
    /// PEFT adapter folder or Hub id org/name[@revision], optionally with `:WEIGHT`; repeat to stack adapters.
    #[arg(long)]
    pub adapter: Vec<AdapterSpec>,
    /// Merge the adapters into the weights instead of applying them unmerged.
    #[arg(long)]
    pub merge: bool,
}

/// `--adapter PATH[:WEIGHT]`: an adapter folder or Hub id (`org/name[@revision]`) and the
/// multiplier on its ΔW (default 1).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub path: PathBuf,
    pub weight: f64,
}

impl std::str::FromStr for AdapterSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        // A trailing `:number` is a weight; anything else is part of the path.
        if let Some((path, weight)) = s.rsplit_once(':') {
            if let Ok(weight) = weight.parse::<f64>() {
                // The weight multiplies f32 updates.
                if !(weight.is_finite() && weight.abs() <= f64::from(f32::MAX)) {
                    return Err(format!(
                        "adapter weight {weight} is not a finite f32 number (|weight| ≤ {:e})",
                        f32::MAX
                    ));
                }
                return Ok(AdapterSpec {
                    path: path.into(),
                    weight,
                });
            }
        }
        Ok(AdapterSpec {
            path: s.into(),
            weight: 1.0,
        })
    }
}

/// Loads every `--adapter` against `model`.
pub fn load_adapters(model: &Llama, specs: &[AdapterSpec]) -> Result<Vec<(LoraAdapter, f64)>> {
    specs
        .iter()
        .map(|s| {
            let dir = resolve_adapter_dir(&s.path)?;
            let adapter = model
                .load_adapter(&dir)
                .naming("loading adapter", &s.path)?;
            Ok((adapter, s.weight))
        })
        .collect()
}

/// Either merges the adapters into the model (`--merge`) and returns no active adapters, or
/// returns them to be applied unmerged.
pub fn activate<'a>(
    model: &mut Llama,
    adapters: &'a [(LoraAdapter, f64)],
    merge: bool,
) -> Result<Vec<ActiveAdapter<'a>>> {
    if merge {
        for (i, (adapter, weight)) in adapters.iter().enumerate() {
            model.merge_adapter(&format!("adapter{i}"), adapter, *weight)?;
        }
        return Ok(vec![]);
    }
    Ok(adapters
        .iter()
        .map(|(adapter, weight)| ActiveAdapter::with_coefficient(adapter, *weight))
        .collect())
}

/// Reads a JSONL file into JSON values, naming file:line on a bad line.
pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = lowrank_core::files::read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
        out.push(value);
    }
    if out.is_empty() {
        bail!("{}: no data lines", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_spec_takes_an_optional_weight() {
        let a: AdapterSpec = "out/a:0.7".parse().unwrap();
        assert_eq!(
            a,
            AdapterSpec {
                path: "out/a".into(),
                weight: 0.7
            }
        );
        let b: AdapterSpec = "out/b".parse().unwrap();
        assert_eq!(b.weight, 1.0);
        let c: AdapterSpec = "c:-1".parse().unwrap();
        assert_eq!(c.weight, -1.0);
        let d: AdapterSpec = "dir:with/colon".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("dir:with/colon"));
    }
}
