//! Writing GGUF for llama.cpp: a LoRA adapter in its GGUF-LoRA format, as llama.cpp's
//! `convert_lora_to_gguf.py` writes it (`general.type = adapter`, `adapter.type = lora`,
//! `adapter.lora.alpha`, `blk.N.<tensor>.weight.lora_a` / `.lora_b`, the q/k permutation of
//! llama-architecture models applied to B's rows).

use lowrank_core::lora::{LoraAdapter, LoraVariant};
use lowrank_core::{Error, Result};
use lowrank_gguf::{GgufWriter, TensorType, Value};

use crate::config::RopeScaling;
use crate::gguf::{reorder_rotary_rows, ArchSpec, RotaryRows, ARCHITECTURES};
use crate::ModelConfig;

/// gguf-py's `GGML_QUANT_VERSION`, written as `general.quantization_version`.
const QUANTIZATION_VERSION: u32 = 2;

/// The GGUF architecture a model of `config` converts to.
pub fn arch_of(config: &ModelConfig) -> Result<&'static ArchSpec> {
    ARCHITECTURES
        .iter()
        .find(|a| {
            a.model_type == config.model_type
                || a.converted_from.contains(&config.model_type.as_str())
        })
        .ok_or_else(|| {
            Error::Msg(format!(
                "model type {:?} has no GGUF architecture here; supported: {}",
                config.model_type,
                ARCHITECTURES
                    .iter()
                    .map(|a| a.model_type)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// gguf-py's `Metadata.id_to_title`: words split on `-` and spaces, all-lowercase words
/// title-cased unless they look like versions or numbers (`v1.2`, `7b`).
pub fn id_to_title(id: &str) -> String {
    id.trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| {
            let lower = w.chars().any(char::is_lowercase) && !w.chars().any(char::is_uppercase);
            let version = w.starts_with(|c: char| c.is_ascii_digit())
                || (w.starts_with('v')
                    && w.len() > 1
                    && w[1..]
                        .split('.')
                        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())));
            if lower && !version {
                python_title(w)
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Python's `str.title()`: the first letter of each run of letters upper case, the rest lower.
fn python_title(w: &str) -> String {
    let mut out = String::with_capacity(w.len());
    let mut in_word = false;
    for c in w.chars() {
        if in_word {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        in_word = c.is_alphabetic();
    }
    out
}

/// The rows of a q/k projection (or its LoRA B) in llama.cpp's order: convert_hf_to_gguf.py's
/// `LlamaModel.permute`, the inverse of [`crate::gguf`]'s.
pub fn permute_rows(data: &[f32], rows: usize, heads: usize) -> Result<Vec<f32>> {
    reorder_rotary_rows(data, rows, heads, RotaryRows::ToGguf).ok_or_else(|| {
        Error::Msg(format!(
            "{rows} rows do not split into {heads} heads of even size"
        ))
    })
}

/// The alpha llama.cpp needs for every module to get PEFT's scale: llama.cpp scales each
/// tensor pair by `alpha / rank` (its own rank), so one alpha serves every module exactly when
/// `scale × rank` is the same for all: plain LoRA, rank patterns; not rsLoRA with several ranks
/// or alpha patterns that differ.
fn shared_alpha(adapter: &LoraAdapter) -> Result<f64> {
    let config = &adapter.config;
    if !config.use_rslora && config.alpha_pattern.is_empty() {
        return Ok(config.alpha);
    }
    let mut first: Option<(&str, f64)> = None;
    for (name, module) in &adapter.modules {
        let alpha = module.scale * module.rank() as f64;
        match first {
            None => first = Some((name, alpha)),
            Some((other, a)) if (a - alpha).abs() > 1e-6 * a.abs().max(alpha.abs()) => {
                return Err(Error::Msg(format!(
                    "llama.cpp's GGUF-LoRA has one alpha (each module scaled by alpha / its rank); this adapter needs {a} for {other} and {alpha} for {name} (rsLoRA or alpha_pattern with different ranks or alphas). Merge it instead: lowrank merge ... --out merged.gguf"
                )))
            }
            Some(_) => {}
        }
    }
    Ok(first.map_or(config.alpha, |(_, a)| a))
}

/// The GGUF-LoRA file of `adapter` (a PEFT LoRA adapter of a model of `config`), named
/// `name` (`general.name`, as the converter titles the adapter folder's name).
pub fn lora_adapter_gguf(
    adapter: &LoraAdapter,
    name: &str,
    config: &ModelConfig,
) -> Result<GgufWriter> {
    if adapter.config.variant == LoraVariant::Dora
        || adapter.modules.values().any(|m| m.magnitude.is_some())
    {
        return Err(Error::Msg(
            "DoRA adapters cannot be written as GGUF: llama.cpp has no DoRA. Merge the adapter instead: lowrank merge ... --out merged.gguf".into(),
        ));
    }
    let arch = arch_of(config)?;
    let alpha = shared_alpha(adapter)?;
    let mut w = GgufWriter::new();
    w.add("general.architecture", Value::String(arch.gguf.into()));
    w.add("general.type", Value::String("adapter".into()));
    w.add("adapter.type", Value::String("lora".into()));
    w.add("general.name", Value::String(id_to_title(name)));
    w.add("adapter.lora.alpha", Value::F32(alpha as f32));
    w.add(
        "general.quantization_version",
        Value::U32(QUANTIZATION_VERSION),
    );
    for (key, module) in &adapter.modules {
        let weight = format!("{key}.weight");
        let gguf = arch
            .gguf_tensor_name(&weight)
            .ok_or_else(|| Error::Msg(format!("module {key} has no GGUF tensor name")))?;
        let a = module.a.to_dtype(candle_core::DType::F32)?;
        let b = module.b.to_dtype(candle_core::DType::F32)?;
        let (a_dims, b_dims) = (a.dims().to_vec(), b.dims().to_vec());
        let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let mut b: Vec<f32> = b.flatten_all()?.to_vec1()?;
        if let Some(heads) = arch.rotary_heads(key, config.num_heads, config.num_kv_heads) {
            b = permute_rows(&b, b_dims[0], heads)
                .map_err(|e| Error::Msg(format!("{key}: {e}")))?;
        }
        w.add_tensor(&format!("{gguf}.lora_a"), &a_dims, &a, TensorType::F32);
        w.add_tensor(&format!("{gguf}.lora_b"), &b_dims, &b, TensorType::F32);
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_follow_gguf_py() {
        assert_eq!(id_to_title("llama-tied__lora-qv"), "Llama Tied__Lora Qv");
        assert_eq!(id_to_title("SmolLM2-135M-v1.2"), "SmolLM2 135M v1.2");
        assert_eq!(id_to_title("qwen2-7b-chat"), "Qwen2 7b Chat");
    }

    #[test]
    fn size_labels_follow_gguf_py() {
        assert_eq!(size_label(30_880), "31K");
        assert_eq!(size_label(134_515_008), "135M");
        assert_eq!(size_label(1_543_714_304), "1.5B");
        assert_eq!(size_label(500), "0.50K");
    }

    #[test]
    fn permute_is_the_converters() {
        // 2 heads of 4 rows: per head [a0 a1 b0 b1] -> [a0 b0 a1 b1].
        let rows: Vec<f32> = (0..8).map(|r| r as f32).collect();
        assert_eq!(
            permute_rows(&rows, 8, 2).unwrap(),
            [0., 2., 1., 3., 4., 6., 5., 7.]
        );
    }

    /// Found while merging the reader's and the writer's copies: no rows divided by zero.
    #[test]
    fn no_rows_is_an_error() {
        let err = permute_rows(&[], 0, 2).unwrap_err().to_string();
        assert!(err.contains("0 rows"), "{err}");
    }
}

/// gguf-py's `size_label` of a dense model: the parameter count in K/M/B/T with at least two
/// significant digits (`31K`, `1.5B`, `135M`).
pub fn size_label(params: usize) -> String {
    let n = params as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let digits = format!("{}", scaled.round_ties_even() as u64)
        .trim_start_matches('0')
        .len();
    format!(
        "{scaled:.prec$}{suffix}",
        prec = 2usize.saturating_sub(digits)
    )
}

/// The tensor type a whole GGUF model is written in (`--outtype` of convert_hf_to_gguf.py).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufFileType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl GgufFileType {
    /// `general.file_type` (llama.cpp's `llama_ftype`).
    fn ftype(self) -> u32 {
        match self {
            GgufFileType::F32 => 0,
            GgufFileType::F16 => 1,
            GgufFileType::Q8_0 => 7,
            GgufFileType::Bf16 => 32,
        }
    }

    /// The type of a weight of `shape`, as the converter picks it: vectors and norms stay
    /// f32; Q8_0 rows that are not whole blocks fall back to f16.
    fn tensor_type(self, gguf_name: &str, shape: &[usize]) -> TensorType {
        if shape.len() <= 1 || gguf_name.ends_with("_norm.weight") {
            return TensorType::F32;
        }
        match self {
            GgufFileType::F32 => TensorType::F32,
            GgufFileType::F16 => TensorType::F16,
            GgufFileType::Bf16 => TensorType::BF16,
            GgufFileType::Q8_0 if shape[shape.len() - 1].is_multiple_of(32) => TensorType::Q8_0,
            GgufFileType::Q8_0 => TensorType::F16,
        }
    }
}

impl std::str::FromStr for GgufFileType {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(GgufFileType::F32),
            "f16" => Ok(GgufFileType::F16),
            "bf16" => Ok(GgufFileType::Bf16),
            "q8_0" => Ok(GgufFileType::Q8_0),
            other => Err(format!("{other:?}: expected f32, f16, bf16 or q8_0")),
        }
    }
}

/// A whole model as the GGUF file convert_hf_to_gguf.py writes for its HF checkpoint: the
/// hyper-parameters llama.cpp reads, the tokenizer and chat template, every weight in
/// `file_type` (q/k rows permuted for the llama architecture). `name` is `general.name`.
pub fn model_gguf(
    model: &crate::Llama,
    tokenizer: &crate::Tokenizer,
    name: &str,
    file_type: GgufFileType,
) -> Result<GgufWriter> {
    let config = model.config();
    let arch = arch_of(config)?;
    check_expressible(config, arch)?;
    let mut w = GgufWriter::new();
    add_hyperparameters(&mut w, config, arch, name, file_type);
    let extra_tensors = match arch.gguf {
        "phi3" => add_phi3_keys(&mut w, config, arch),
        _ => Vec::new(),
    };
    if arch.norm_plus_one {
        add_gemma_keys(&mut w, config, arch);
    }
    if arch.gguf == "gemma2" {
        w.add("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    }
    w.add(
        "general.quantization_version",
        Value::U32(QUANTIZATION_VERSION),
    );
    for (k, v) in crate::gguf_tokenizer::to_gguf_metadata(tokenizer, config.vocab_size, config)? {
        w.add(&k, v);
    }
    let mut weights = model.named_weights()?;
    // The converter's order: the checkpoint's, which safetensors sorts by name.
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, values) in extra_tensors {
        w.add_tensor(name, &[values.len()], &values, TensorType::F32);
    }
    for (hf_name, tensor) in weights {
        // Gemma 2's converter drops lm_head (llama.cpp always ties it).
        if arch.gguf == "gemma2" && hf_name == "lm_head.weight" {
            continue;
        }
        let gguf = arch
            .gguf_tensor_name(&hf_name)
            .ok_or_else(|| Error::Msg(format!("tensor {hf_name} has no GGUF name")))?;
        let shape = tensor.dims().to_vec();
        let mut values: Vec<f32> = tensor
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        if let Some(heads) = arch.rotary_heads(&hf_name, config.num_heads, config.num_kv_heads) {
            values = permute_rows(&values, shape[0], heads)
                .map_err(|e| Error::Msg(format!("{hf_name}: {e}")))?;
        }
        if arch.stores_norm_plus_one(&hf_name) {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        w.add_tensor(&gguf, &shape, &values, file_type.tensor_type(&gguf, &shape));
    }
    Ok(w)
}

/// The window of the sliding-window layers (one size: [`check_expressible`] refuses others).
fn sliding_window(config: &ModelConfig) -> Option<usize> {
    config.layer_windows.iter().flatten().next().copied()
}

/// A count as GGUF's u32 metadata value.
fn u32_of(v: usize) -> Value {
    Value::U32(v as u32)
}

/// Refuses, by name, what llama.cpp's architecture for `config` cannot express.
fn check_expressible(config: &ModelConfig, arch: &ArchSpec) -> Result<()> {
    let refuse = |what: &str| -> Result<()> {
        Err(Error::Msg(format!(
            "{what}: llama.cpp's {} architecture cannot express it; not written to GGUF",
            arch.gguf
        )))
    };
    match (&config.rope_scaling, arch.gguf) {
        (RopeScaling::None | RopeScaling::Linear { .. }, _) => {}
        (RopeScaling::LongRope { .. }, "phi3") => {}
        (RopeScaling::Llama3 { .. }, _) => {
            return refuse("Llama 3.1 rope scaling (llama.cpp's precomputed rope_freqs tensor)")
        }
        (RopeScaling::LongRope { .. }, _) => return refuse("LongRoPE"),
    }
    let window = sliding_window(config);
    if config
        .layer_windows
        .iter()
        .flatten()
        .any(|&w| Some(w) != window)
    {
        return refuse("sliding windows of different sizes");
    }
    let gemma = arch.norm_plus_one;
    match arch.gguf {
        // Phi-3: the window is written (llama.cpp reads it and, for now, ignores it).
        "phi3" if config.layer_windows.iter().any(Option::is_none) && window.is_some() => {
            return refuse("a sliding window on some layers only")
        }
        "phi3" => {}
        _ if gemma => {
            let layers = config.num_layers as u64;
            let scalar = arch.gemma_query_scalar(
                layers,
                config.hidden_size as u64,
                config.num_heads as u64,
                config.head_dim as u64,
            );
            let scale = 1.0 / (scalar as f64).sqrt();
            if (config.attention_scale - scale).abs() > 1e-9 * scale {
                let ours = 1.0 / (config.attention_scale * config.attention_scale);
                return refuse(&format!(
                    "query_pre_attn_scalar {} (llama.cpp takes {scalar} for this model)",
                    (ours * 1e6).round() / 1e6
                ));
            }
            if let Some(local) = &config.local_rope {
                if local.scaling != RopeScaling::None {
                    return refuse("RoPE scaling on the sliding-window layers");
                }
            }
        }
        _ if window.is_some() => return refuse("sliding-window attention"),
        _ => {}
    }
    Ok(())
}

/// The keys every architecture has: general.*, sizes, heads, RoPE base and linear scaling,
/// the norm epsilon, the file type.
fn add_hyperparameters(
    w: &mut GgufWriter,
    config: &ModelConfig,
    arch: &ArchSpec,
    name: &str,
    file_type: GgufFileType,
) {
    let gemma = arch.norm_plus_one;
    w.add("general.architecture", Value::String(arch.gguf.into()));
    w.add("general.type", Value::String("model".into()));
    w.add("general.name", Value::String(id_to_title(name)));
    w.add(
        "general.size_label",
        Value::String(size_label(config.num_parameters())),
    );
    w.add(&arch.key("block_count"), u32_of(config.num_layers));
    w.add(
        &arch.key("context_length"),
        u32_of(config.max_position_embeddings),
    );
    w.add(&arch.key("embedding_length"), u32_of(config.hidden_size));
    w.add(
        &arch.key("feed_forward_length"),
        u32_of(config.intermediate_size),
    );
    w.add(&arch.key("attention.head_count"), u32_of(config.num_heads));
    w.add(
        &arch.key("attention.head_count_kv"),
        u32_of(config.num_kv_heads),
    );
    // Gemma 2's converter writes no RoPE base (llama.cpp then takes 10000).
    if arch.gguf != "gemma2" || config.rope_theta != 10_000.0 {
        w.add(
            &arch.key("rope.freq_base"),
            Value::F32(config.rope_theta as f32),
        );
    }
    w.add(
        &arch.key("attention.layer_norm_rms_epsilon"),
        Value::F32(config.rms_norm_eps as f32),
    );
    if gemma || config.raw.get("head_dim").is_some_and(|v| !v.is_null()) && arch.gguf != "phi3" {
        w.add(&arch.key("attention.key_length"), u32_of(config.head_dim));
        w.add(&arch.key("attention.value_length"), u32_of(config.head_dim));
    }
    if let RopeScaling::Linear { factor } = config.rope_scaling {
        w.add(
            &arch.key("rope.scaling.type"),
            Value::String("linear".into()),
        );
        w.add(&arch.key("rope.scaling.factor"), Value::F32(factor as f32));
    }
    w.add("general.file_type", Value::U32(file_type.ftype()));
    if arch.permuted_qk {
        // LlamaModel.set_gguf_parameters adds these two.
        w.add(&arch.key("vocab_size"), u32_of(config.vocab_size));
        w.add(&arch.key("rope.dimension_count"), u32_of(config.head_dim));
    }
}

/// Phi-3's keys (rotary dimensions, window, LongRoPE's attention factor and original context);
/// returns LongRoPE's factor tensors, written before the weights.
fn add_phi3_keys(
    w: &mut GgufWriter,
    config: &ModelConfig,
    arch: &ArchSpec,
) -> Vec<(&'static str, Vec<f32>)> {
    let window = sliding_window(config);
    let mut extra_tensors = Vec::new();
    w.add(&arch.key("rope.dimension_count"), u32_of(config.rotary_dim));
    w.add(
        &arch.key("attention.sliding_window"),
        u32_of(window.unwrap_or(0)),
    );
    let original = match &config.rope_scaling {
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } => {
            w.add(
                &arch.key("rope.scaling.attn_factor"),
                Value::F32(*attention_factor as f32),
            );
            let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
            extra_tensors.push(("rope_factors_long.weight", f32s(long_factor)));
            extra_tensors.push(("rope_factors_short.weight", f32s(short_factor)));
            Some(*original_max_position_embeddings)
        }
        _ => config.raw["original_max_position_embeddings"]
            .as_u64()
            .map(|v| v as usize),
    };
    if let Some(original) = original {
        w.add(
            &arch.key("rope.scaling.original_context_length"),
            u32_of(original),
        );
    }
    extra_tensors
}

/// Gemma's keys: soft-capping, the sliding-window layers' RoPE base, the window and, where it
/// is not llama.cpp's default, which layers have it.
fn add_gemma_keys(w: &mut GgufWriter, config: &ModelConfig, arch: &ArchSpec) {
    let window = sliding_window(config);
    if let Some(cap) = config.attention_softcap {
        w.add(&arch.key("attn_logit_softcapping"), Value::F32(cap as f32));
    }
    if let Some(cap) = config.final_softcap {
        w.add(&arch.key("final_logit_softcapping"), Value::F32(cap as f32));
    }
    if let Some(local) = &config.local_rope {
        w.add(
            &arch.key("rope.freq_base_swa"),
            Value::F32(local.theta as f32),
        );
    }
    if let Some(window) = window {
        w.add(&arch.key("attention.sliding_window"), u32_of(window));
    }
    // The converter writes no pattern: llama.cpp's default must then be the model's, else
    // the layers are written out (a key llama.cpp reads).
    let sliding: Vec<bool> = config.layer_windows.iter().map(Option::is_some).collect();
    let n = arch.default_sliding_pattern() as usize;
    let default = (0..config.num_layers).all(|il| sliding[il] == (il % n < n - 1));
    if window.is_some() && !default {
        w.add(
            &arch.key("attention.sliding_window_pattern"),
            Value::Array(sliding.into_iter().map(Value::Bool).collect()),
        );
    }
}
