//! `config.json` of a Llama-family checkpoint, as transformers reads it.

use std::path::Path;

use lowrank_core::{Error, Result};
use serde::Deserialize;
use serde_json::Value;

/// The architectures this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

/// Wire form of config.json; defaults are transformers' for the given `model_type`.
#[derive(Debug, Clone, Deserialize)]
struct ConfigFile {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// Newer transformers put rope_theta and rope_scaling together here.
    rope_parameters: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: bool,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// RoPE frequency scaling (`rope_scaling`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling of the frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// A validated model configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// q, k, v (and for Llama with attention_bias, o) have biases.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Attend to at most this many previous positions (Mistral).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype name the checkpoint declares (`float32`, `bfloat16`, ...), if any.
    pub torch_dtype: Option<String>,
    /// `quantization_config` of a pre-quantized bitsandbytes 4-bit checkpoint.
    pub quantization: Option<lowrank_quant::QuantizationConfig>,
    /// The raw JSON, kept to write merged checkpoints with the same config.
    pub raw: Value,
}

/// `bos_token_id` / `eos_token_id`: one token id, a list of them, or null. Anything else is an
/// error rather than "no such token": generation would silently never stop.
pub(crate) fn token_ids(v: &Option<Value>) -> std::result::Result<Vec<u32>, String> {
    let id = |x: &Value| {
        x.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| format!("expected a token id (an integer from 0 to 2^32 - 1) or a list of them, found {x}"))
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(id).collect(),
        Some(x) => Ok(vec![id(x)?]),
    }
}

impl ModelConfig {
    /// The config of the model at `model`: its folder's config.json, or a GGUF file's metadata.
    pub fn load_for_model(model: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(model) {
            return crate::gguf::GgufModel::open(model)?.config();
        }
        Self::load(&model.join("config.json"))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let raw: Value = lowrank_core::files::read_json(path)?;
        Self::from_value(raw, path)
    }

    pub fn from_value(raw: Value, path: &Path) -> Result<Self> {
        let file: ConfigFile = lowrank_core::files::from_json_value(raw.clone(), path)?;
        let bad = |field: &str, msg: String| Error::field(path, field, msg);
        let model_type = file.model_type.clone().ok_or_else(|| {
            bad(
                "model_type",
                "missing; expected one of llama, mistral, qwen2".into(),
            )
        })?;
        let architecture = match model_type.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(bad(
                    "model_type",
                    format!("unsupported model type {other:?}; supported: llama, mistral, qwen2"),
                ))
            }
        };
        if let Some(act) = &file.hidden_act {
            if act != "silu" {
                return Err(bad(
                    "hidden_act",
                    format!("only \"silu\" is supported, found {act:?}"),
                ));
            }
        }
        // Pre-quantized checkpoints: bitsandbytes 4-bit (NF4/FP4) only; the error names the field.
        let quantization =
            lowrank_quant::QuantizationConfig::from_config(&raw, &path.display().to_string())
                .map_err(|e| Error::Msg(e.to_string()))?;
        let num_kv_heads = file.num_key_value_heads.unwrap_or(file.num_attention_heads);
        if file.num_attention_heads == 0
            || num_kv_heads == 0
            || !file.num_attention_heads.is_multiple_of(num_kv_heads)
        {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{num_kv_heads} key/value heads must divide {} attention heads",
                    file.num_attention_heads
                ),
            ));
        }
        let head_dim = file
            .head_dim
            .unwrap_or(file.hidden_size / file.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("rotary embeddings need an even head_dim, found {head_dim}"),
            ));
        }
        // rope_parameters (newer transformers) holds rope_theta and the scaling together.
        let rope_params = file.rope_parameters.as_ref().filter(|v| !v.is_null());
        if let Some(p) = rope_params.filter(|p| !p.is_object()) {
            return Err(bad(
                "rope_parameters",
                format!("expected an object, found {p}"),
            ));
        }
        let params_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(t) => Some(t.as_f64().ok_or_else(|| {
                bad(
                    "rope_parameters.rope_theta",
                    format!("expected a number, found {t}"),
                )
            })?),
            None => None,
        };
        let rope_theta =
            file.rope_theta
                .or(params_theta)
                .unwrap_or(if architecture == Architecture::Qwen2 {
                    1_000_000.0
                } else {
                    10_000.0
                });
        let (scaling_field, scaling) = match file.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            Some(v) => ("rope_scaling", Some(v)),
            None => ("rope_parameters", rope_params),
        };
        let rope_scaling = parse_rope_scaling(scaling).map_err(|m| bad(scaling_field, m))?;
        let sliding_window = match architecture {
            Architecture::Mistral => file.sliding_window,
            Architecture::Qwen2 if file.use_sliding_window => {
                return Err(bad(
                    "use_sliding_window",
                    "Qwen2 sliding-window layers are not supported".into(),
                ))
            }
            _ => None,
        };
        check_ranges(&file, head_dim, rope_theta, &rope_scaling, sliding_window)
            .map_err(|(field, msg)| bad(field, msg))?;
        let tie_default = false;
        let dtype = file.torch_dtype.clone().or(file.dtype.clone());
        Ok(ModelConfig {
            architecture,
            model_type,
            vocab_size: file.vocab_size,
            hidden_size: file.hidden_size,
            intermediate_size: file.intermediate_size,
            num_layers: file.num_hidden_layers,
            num_heads: file.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: file.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: file.tie_word_embeddings.unwrap_or(tie_default),
            max_position_embeddings: file.max_position_embeddings,
            qkv_bias: architecture == Architecture::Qwen2 || file.attention_bias,
            o_bias: architecture == Architecture::Llama && file.attention_bias,
            mlp_bias: architecture == Architecture::Llama && file.mlp_bias,
            sliding_window,
            bos_token_id: token_ids(&file.bos_token_id)
                .map_err(|m| bad("bos_token_id", m))?
                .first()
                .copied(),
            eos_token_ids: token_ids(&file.eos_token_id).map_err(|m| bad("eos_token_id", m))?,
            torch_dtype: dtype,
            quantization,
            raw,
        })
    }

    /// Bytes of KV cache one position takes: an f32 key and value per layer and KV head.
    pub fn kv_cache_bytes_per_token(&self) -> u64 {
        (self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4) as u64
    }

    /// Parameters of the model (embeddings, lm_head unless tied, layers, norms).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        let mut mlp = 3 * h * self.intermediate_size;
        if self.mlp_bias {
            mlp += 2 * self.intermediate_size + h;
        }
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_layers * layer + h
    }
}

/// Sizes and constants a forward pass divides by, takes powers of or allocates from: zero,
/// negative or non-finite values would give NaN everywhere (or nothing) instead of an error.
fn check_ranges(
    file: &ConfigFile,
    head_dim: usize,
    rope_theta: f64,
    rope_scaling: &RopeScaling,
    sliding_window: Option<usize>,
) -> std::result::Result<(), (&'static str, String)> {
    let sizes = [
        ("vocab_size", file.vocab_size),
        ("hidden_size", file.hidden_size),
        ("intermediate_size", file.intermediate_size),
        ("num_hidden_layers", file.num_hidden_layers),
        ("head_dim", head_dim),
        ("max_position_embeddings", file.max_position_embeddings),
    ];
    for (field, value) in sizes {
        if value == 0 {
            return Err((field, "must be at least 1, found 0".into()));
        }
    }
    if sliding_window == Some(0) {
        return Err(("sliding_window", "must be at least 1, found 0".into()));
    }
    // Computed in f32: a value beyond f32's range is infinite there.
    let positive = |field: &'static str, v: f64| {
        if v.is_finite() && v > 0.0 && v <= f64::from(f32::MAX) {
            Ok(())
        } else {
            Err((
                field,
                format!("must be a positive finite number, found {v}"),
            ))
        }
    };
    positive("rms_norm_eps", file.rms_norm_eps)?;
    positive("rope_theta", rope_theta)?;
    match *rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            positive("rope_scaling", factor).map_err(|(f, m)| (f, format!("factor {m}")))?
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            for (key, v) in [
                ("factor", factor),
                ("low_freq_factor", low_freq_factor),
                ("high_freq_factor", high_freq_factor),
                (
                    "original_max_position_embeddings",
                    original_max_position_embeddings,
                ),
            ] {
                positive("rope_scaling", v).map_err(|(f, m)| (f, format!("{key} {m}")))?;
            }
            // The smooth interpolation divides by their difference.
            if high_freq_factor <= low_freq_factor {
                return Err((
                    "rope_scaling",
                    format!("high_freq_factor ({high_freq_factor}) must be greater than low_freq_factor ({low_freq_factor})"),
                ));
            }
        }
    }
    Ok(())
}

fn parse_rope_scaling(v: Option<&Value>) -> std::result::Result<RopeScaling, String> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    if !v.is_object() {
        return Err(format!("expected an object, found {v}"));
    }
    let kind = match v.get("rope_type").or_else(|| v.get("type")) {
        None => "default",
        Some(k) => k
            .as_str()
            .ok_or_else(|| format!("the rope type must be a string, found {k}"))?,
    };
    let num = |key: &str| {
        v.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope type {kind:?} needs a numeric `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "unsupported rope type {other:?}; supported: default, linear, llama3"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type":"llama","vocab_size":100,"hidden_size":32,"intermediate_size":64,
               "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2})
    }

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_value(v, Path::new("config.json"))
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = parse(base()).unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.rope_theta, 10_000.0);
        assert!(!c.tie_word_embeddings && !c.qkv_bias);
        let mut q = base();
        q["model_type"] = json!("qwen2");
        let q = parse(q).unwrap();
        assert!(q.qkv_bias && !q.o_bias);
    }

    #[test]
    fn llama3_rope_and_explicit_head_dim() {
        let mut v = base();
        v["head_dim"] = json!(16);
        v["rope_scaling"] = json!({"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64});
        let c = parse(v).unwrap();
        assert_eq!(c.head_dim, 16);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (json!({"model_type":"gpt2"}), "missing field"),
            (
                {
                    let mut v = base();
                    v["model_type"] = json!("gpt2");
                    v
                },
                "`model_type`",
            ),
            (
                {
                    let mut v = base();
                    v["num_key_value_heads"] = json!(3);
                    v
                },
                "`num_key_value_heads`",
            ),
            (
                {
                    let mut v = base();
                    v["hidden_act"] = json!("gelu");
                    v
                },
                "`hidden_act`",
            ),
            (
                {
                    let mut v = base();
                    v["rope_scaling"] = json!({"rope_type":"yarn","factor":2.0});
                    v
                },
                "`rope_scaling`",
            ),
            (
                {
                    let mut v = base();
                    v["rope_scaling"] = json!({"rope_type":"llama3","factor":2.0});
                    v
                },
                "low_freq_factor",
            ),
        ];
        for (v, expect) in cases {
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains("config.json") && err.contains(expect), "{err}");
        }
    }

    /// Found by the fuzz suite: ids of another type were dropped and ids past u32 truncated,
    /// so generation never saw its end-of-sequence token.
    #[test]
    fn token_ids_of_the_wrong_type_or_range_are_errors() {
        for (field, value) in [
            ("bos_token_id", json!(false)),
            ("eos_token_id", json!("2")),
            ("eos_token_id", json!([2, "x"])),
            ("eos_token_id", json!(4_294_967_298u64)),
            ("bos_token_id", json!(-1)),
        ] {
            let mut v = base();
            v[field] = value.clone();
            let err = parse(v).unwrap_err().to_string();
            assert!(
                err.contains("config.json") && err.contains(&format!("`{field}`")),
                "{value}: {err}"
            );
        }
        let mut v = base();
        v["bos_token_id"] = json!(1);
        v["eos_token_id"] = json!([2, 7]);
        let c = parse(v).unwrap();
        assert_eq!((c.bos_token_id, c.eos_token_ids), (Some(1), vec![2, 7]));
        let mut v = base();
        v["eos_token_id"] = Value::Null;
        assert!(parse(v).unwrap().eos_token_ids.is_empty());
    }

    /// Found by the fuzz suite: a rope_parameters or rope_scaling that is not an object, or a
    /// rope type or rope_theta of the wrong type, was ignored (plain RoPE at the default θ).
    #[test]
    fn rope_fields_of_the_wrong_type_are_errors() {
        for (field, value, named) in [
            ("rope_parameters", json!([null]), "`rope_parameters`"),
            (
                "rope_parameters",
                json!({"rope_theta": "5e5"}),
                "`rope_parameters.rope_theta`",
            ),
            (
                "rope_parameters",
                json!({"rope_type": 3}),
                "`rope_parameters`",
            ),
            ("rope_scaling", json!("linear"), "`rope_scaling`"),
            (
                "rope_scaling",
                json!({"type": ["linear"], "factor": 2.0}),
                "`rope_scaling`",
            ),
        ] {
            let mut v = base();
            v[field] = value.clone();
            let err = parse(v).unwrap_err().to_string();
            assert!(
                err.contains("config.json") && err.contains(named),
                "{value}: {err}"
            );
        }
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 5e5, "rope_type": "default"});
        assert_eq!(parse(v).unwrap().rope_theta, 5e5);
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let cases = [
            ("rms_norm_eps", json!(0.0)),
            ("rms_norm_eps", json!(-1e-6)),
            ("rope_theta", json!(0.0)),
            ("rope_theta", json!(1e300)),
            ("num_hidden_layers", json!(0)),
            ("hidden_size", json!(0)),
            ("intermediate_size", json!(0)),
            ("vocab_size", json!(0)),
            ("max_position_embeddings", json!(0)),
            ("head_dim", json!(0)),
        ];
        for (field, value) in cases {
            let mut v = base();
            v[field] = value.clone();
            let err = parse(v).unwrap_err().to_string();
            assert!(
                err.contains("config.json") && err.contains(&format!("`{field}`")),
                "{field} = {value}: {err}"
            );
        }
        for scaling in [
            json!({"rope_type":"linear","factor":0.0}),
            json!({"rope_type":"llama3","factor":8.0,"low_freq_factor":4.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}),
            json!({"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":-1}),
        ] {
            let mut v = base();
            v["rope_scaling"] = scaling.clone();
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains("`rope_scaling`"), "{scaling}: {err}");
        }
    }

    #[test]
    fn parameter_count_of_a_known_shape() {
        // SmolLM2-135M: 134,515,008 parameters (tied embeddings).
        let c = parse(json!({"model_type":"llama","vocab_size":49152,"hidden_size":576,"intermediate_size":1536,
            "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"tie_word_embeddings":true}))
        .unwrap();
        assert_eq!(c.num_parameters(), 134_515_008);
    }

    #[test]
    fn bitsandbytes_4bit_quantization_config_is_read_and_others_rejected() {
        let base = || {
            serde_json::json!({"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":1})
        };
        let mut v = base();
        v["quantization_config"] = serde_json::json!({"quant_method":"bitsandbytes","load_in_4bit":true,
            "bnb_4bit_quant_type":"nf4","bnb_4bit_use_double_quant":true});
        let c = ModelConfig::from_value(v, Path::new("config.json")).unwrap();
        let q = c.quantization.unwrap();
        assert!(q.bnb_4bit_use_double_quant && q.bnb_4bit_quant_type == "nf4");
        assert!(ModelConfig::from_value(base(), Path::new("c"))
            .unwrap()
            .quantization
            .is_none());
        for (qc, field) in [
            (
                serde_json::json!({"quant_method":"gptq","bits":4}),
                "quant_method",
            ),
            (
                serde_json::json!({"quant_method":"bitsandbytes","load_in_8bit":true}),
                "load_in_4bit",
            ),
            (
                serde_json::json!({"quant_method":"bitsandbytes","load_in_4bit":true,"bnb_4bit_quant_type":"int4"}),
                "bnb_4bit_quant_type",
            ),
        ] {
            let mut v = base();
            v["quantization_config"] = qc;
            let err = ModelConfig::from_value(v, Path::new("config.json"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field) && err.contains("config.json"), "{err}");
        }
    }
}
