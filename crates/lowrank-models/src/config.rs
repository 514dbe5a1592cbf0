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
    /// Qwen2 without q/k/v biases, with an RMSNorm over each query and key head before RoPE.
    Qwen3,
    /// Phi-3/3.5/4-mini: fused `qkv_proj` and `gate_up_proj`, LongRoPE, partial rotary.
    Phi3,
    /// Gemma 2: GeGLU, (1 + w) norms around attention and MLP, scaled embeddings, soft-capped
    /// attention and output logits, sliding-window attention on alternate layers.
    Gemma2,
    /// Gemma 3's text model (`gemma3_text`): Gemma 2 with (1 + w) q/k norms, no soft-capping
    /// by default, five sliding-window layers to one global, each kind with its own RoPE.
    Gemma3,
}

impl Architecture {
    fn is_gemma(self) -> bool {
        matches!(self, Architecture::Gemma2 | Architecture::Gemma3)
    }
}

/// The RoPE of the sliding-window layers when it differs from the global layers' (Gemma 3).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// silu(gate)·up (SwiGLU).
    Silu,
    /// gelu_pytorch_tanh(gate)·up (Gemma's GeGLU).
    GeluTanh,
}

impl Architecture {
    const NAMES: &'static str = "llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text";

    fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            "phi3" => Architecture::Phi3,
            "gemma2" => Architecture::Gemma2,
            "gemma3_text" => Architecture::Gemma3,
            _ => return None,
        })
    }
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
    rms_norm_eps: Option<f64>,
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
    /// Gemma's name for the activation (it wins over `hidden_act`).
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    /// Gemma 3 (4.x layout): the sliding-window layers' RoPE base, and one global layer in
    /// this many.
    rope_local_base_freq: Option<f64>,
    sliding_window_pattern: Option<usize>,
    #[serde(default)]
    use_bidirectional_attention: Option<bool>,
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: bool,
    /// Qwen2/Qwen3: layers from this index on use the sliding window.
    max_window_layers: Option<usize>,
    /// `full_attention` / `sliding_attention` per layer (newer configs write it out).
    layer_types: Option<Vec<String>>,
    /// Phi-3: the context length RoPE was trained at (LongRoPE's switch point).
    original_max_position_embeddings: Option<usize>,
    /// Phi-3 writes it at the top level or inside `rope_parameters`.
    partial_rotary_factor: Option<f64>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
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
    /// Phi-3's LongRoPE: frequencies divided by `short_factor` (one per frequency) while a
    /// forward's positions stay within `original_max_position_embeddings`, by `long_factor`
    /// beyond; cos and sin multiplied by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
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
    /// The leading part of each head that RoPE rotates (`partial_rotary_factor` × head_dim);
    /// the rest passes through.
    pub rotary_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// q, k, v (and for Llama with attention_bias, o) have biases.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm over each query and key head (weights of head_dim) before RoPE (Qwen3).
    pub qk_norm: bool,
    /// q, k, v in one `qkv_proj` and gate, up in one `gate_up_proj` (Phi-3), stacked by rows.
    pub fused_projections: bool,
    pub activation: Activation,
    /// Every RMSNorm multiplies by (1 + w) rather than w (Gemma).
    pub norm_plus_one: bool,
    /// Norms on the attention's and the MLP's outputs too, before each residual add (Gemma 2:
    /// `post_attention_layernorm`, `post_feedforward_layernorm`; the MLP's input norm is then
    /// `pre_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// Embeddings multiplied by √hidden, rounded to f32 as transformers does in that dtype
    /// (Gemma).
    pub embed_scale: Option<f32>,
    /// The attention scores' scale: 1/√query_pre_attn_scalar (Gemma), else 1/√head_dim.
    pub attention_scale: f64,
    /// cap · tanh(x / cap) of the scaled attention scores (Gemma 2's attn_logit_softcapping).
    pub attention_softcap: Option<f64>,
    /// cap · tanh(x / cap) of the output logits (Gemma 2's final_logit_softcapping).
    pub final_softcap: Option<f64>,
    /// Per layer: attend to at most this many previous positions (Mistral, sliding-window
    /// layers of Qwen2/Qwen3/Gemma), or `None` for full causal attention.
    pub layer_windows: Vec<Option<usize>>,
    /// The sliding-window layers' own RoPE (Gemma 3); `None`: every layer uses the global one.
    pub local_rope: Option<LocalRope>,
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
        let (model_type, architecture) = architecture_of(&file).map_err(|(f, m)| bad(f, m))?;
        let gemma = architecture.is_gemma();
        if file.use_bidirectional_attention == Some(true) {
            return Err(bad(
                "use_bidirectional_attention",
                "bidirectional (embedding) models are not supported".into(),
            ));
        }
        let activation = activation_of(&file, gemma).map_err(|(f, m)| bad(f, m))?;
        // Pre-quantized checkpoints: bitsandbytes 4-bit (NF4/FP4) only; the error names the field.
        let quantization =
            lowrank_quant::QuantizationConfig::from_config(&raw, &path.display().to_string())?;
        let (num_kv_heads, head_dim) =
            attention_heads(&file, architecture).map_err(|(f, m)| bad(f, m))?;
        let Rope {
            theta: rope_theta,
            scaling: rope_scaling,
            local: local_rope,
            rotary_dim,
        } = Rope::read(&file, architecture, head_dim).map_err(|(f, m)| bad(f, m))?;
        // Gemma's config classes default the window to 4096 (null turns it off).
        let default_window = (gemma && raw.get("sliding_window").is_none()).then_some(4096);
        let layer_windows =
            layer_windows(&file, architecture, default_window).map_err(|(f, m)| bad(f, m))?;
        // Gemma 2 ties its head by default.
        let tie_default = architecture.is_gemma();
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
            rotary_dim,
            // transformers' per-class defaults.
            rms_norm_eps: file.rms_norm_eps.unwrap_or(match architecture {
                Architecture::Phi3 => 1e-5,
                _ => 1e-6,
            }),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: file.tie_word_embeddings.unwrap_or(tie_default),
            max_position_embeddings: file.max_position_embeddings,
            qkv_bias: architecture == Architecture::Qwen2 || file.attention_bias,
            o_bias: matches!(architecture, Architecture::Llama | Architecture::Qwen3)
                && file.attention_bias,
            mlp_bias: architecture == Architecture::Llama && file.mlp_bias,
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            local_rope,
            fused_projections: architecture == Architecture::Phi3,
            activation,
            norm_plus_one: gemma,
            sandwich_norms: gemma,
            embed_scale: gemma.then(|| (file.hidden_size as f64).sqrt() as f32),
            attention_scale: 1.0
                / match file.query_pre_attn_scalar.filter(|_| gemma) {
                    Some(s) => s,
                    // Gemma 2's default.
                    None if gemma => 256.0,
                    None => head_dim as f64,
                }
                .sqrt(),
            // Gemma 2's defaults (50, 30) when the fields are missing, Gemma 3's none; null turns
            // them off.
            attention_softcap: match architecture {
                Architecture::Gemma2 => softcap(&raw, path, "attn_logit_softcapping", Some(50.0))?,
                Architecture::Gemma3 => softcap(&raw, path, "attn_logit_softcapping", None)?,
                _ => None,
            },
            final_softcap: match architecture {
                Architecture::Gemma2 => softcap(&raw, path, "final_logit_softcapping", Some(30.0))?,
                Architecture::Gemma3 => softcap(&raw, path, "final_logit_softcapping", None)?,
                _ => None,
            },
            layer_windows,
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
        // The same count whether q/k/v and gate/up are fused or not.
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
        if self.qk_norm {
            attn += 2 * self.head_dim;
        }
        let norms = if self.sandwich_norms { 4 } else { 2 };
        let layer = attn + mlp + norms * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_layers * layer + h
    }
}

/// More decoder layers than this is a broken config.json, not a model.
const MAX_LAYERS: usize = 1 << 16;

/// A field's name and what is wrong with it.
type FieldError = (&'static str, String);

/// `model_type` and the architecture it names.
fn architecture_of(file: &ConfigFile) -> std::result::Result<(String, Architecture), FieldError> {
    let model_type = file.model_type.clone().ok_or_else(|| {
        (
            "model_type",
            format!("missing; expected one of {}", Architecture::NAMES),
        )
    })?;
    let architecture = Architecture::from_model_type(&model_type).ok_or_else(|| {
        // Gemma 3's multimodal checkpoints (vision tower + text model).
        let hint = if model_type == "gemma3" {
            " (Gemma 3 with its vision tower is not supported; text-only checkpoints such as gemma-3-1b are `gemma3_text`)"
        } else {
            ""
        };
        (
            "model_type",
            format!(
                "unsupported model type {model_type:?}{hint}; supported: {}",
                Architecture::NAMES
            ),
        )
    })?;
    Ok((model_type, architecture))
}

/// The MLP's activation: `hidden_activation` (Gemma) or `hidden_act`, with the family's default.
fn activation_of(file: &ConfigFile, gemma: bool) -> std::result::Result<Activation, FieldError> {
    let (act_field, act) = match (&file.hidden_activation, &file.hidden_act) {
        (Some(a), _) => ("hidden_activation", Some(a.as_str())),
        (None, a) => ("hidden_act", a.as_deref()),
    };
    match act.unwrap_or(if gemma { "gelu_pytorch_tanh" } else { "silu" }) {
        "silu" => Ok(Activation::Silu),
        "gelu_pytorch_tanh" if gemma => Ok(Activation::GeluTanh),
        other => Err((
            act_field,
            format!("expected \"silu\" (or \"gelu_pytorch_tanh\" for Gemma), found {other:?}"),
        )),
    }
}

/// Key/value heads and the head dimension, with transformers' per-class defaults.
fn attention_heads(
    file: &ConfigFile,
    architecture: Architecture,
) -> std::result::Result<(usize, usize), FieldError> {
    let num_kv_heads = file.num_key_value_heads.unwrap_or(file.num_attention_heads);
    if file.num_attention_heads == 0
        || num_kv_heads == 0
        || !file.num_attention_heads.is_multiple_of(num_kv_heads)
    {
        return Err((
            "num_key_value_heads",
            format!(
                "{num_kv_heads} key/value heads must divide {} attention heads",
                file.num_attention_heads
            ),
        ));
    }
    // transformers' config classes: Qwen3 defaults head_dim to 128, Gemma 2 to 256, the
    // others derive it.
    let head_dim = file.head_dim.unwrap_or(match architecture {
        Architecture::Qwen3 => 128,
        Architecture::Gemma2 | Architecture::Gemma3 => 256,
        _ => file.hidden_size / file.num_attention_heads,
    });
    if !head_dim.is_multiple_of(2) {
        return Err((
            "head_dim",
            format!("rotary embeddings need an even head_dim, found {head_dim}"),
        ));
    }
    Ok((num_kv_heads, head_dim))
}

/// The rotary embedding's settings, from `rope_theta`/`rope_scaling` or the newer
/// `rope_parameters` (one set per layer type on Gemma 3).
struct Rope {
    theta: f64,
    scaling: RopeScaling,
    /// Gemma 3's sliding-window layers' own base and scaling.
    local: Option<LocalRope>,
    rotary_dim: usize,
}

impl Rope {
    /// Reads and checks them; the sizes' ranges are checked here too, once the RoPE settings
    /// they are checked with are known.
    fn read(
        file: &ConfigFile,
        architecture: Architecture,
        head_dim: usize,
    ) -> std::result::Result<Self, FieldError> {
        // rope_parameters (newer transformers) holds rope_theta and the scaling together; Gemma
        // 3 writes one set per layer type.
        let rope_parameters = file.rope_parameters.as_ref().filter(|v| !v.is_null());
        if let Some(p) = rope_parameters.filter(|p| !p.is_object()) {
            return Err(("rope_parameters", format!("expected an object, found {p}")));
        }
        let per_type = rope_parameters.filter(|p| p.get("full_attention").is_some());
        let rope_params = match per_type {
            Some(p) => p.get("full_attention"),
            None => rope_parameters,
        }
        .filter(|v| v.is_object());
        let params_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(t) => Some(t.as_f64().ok_or_else(|| {
                (
                    "rope_parameters.rope_theta",
                    format!("expected a number, found {t}"),
                )
            })?),
            None => None,
        };
        let rope_theta = file
            .rope_theta
            .or(params_theta)
            .unwrap_or(match architecture {
                Architecture::Qwen2 | Architecture::Gemma3 => 1_000_000.0,
                _ => 10_000.0,
            });
        let local_rope = if architecture == Architecture::Gemma3 {
            let local = per_type.and_then(|p| p.get("sliding_attention"));
            let theta = local
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .or(file.rope_local_base_freq)
                .unwrap_or(10_000.0);
            let scaling = parse_rope_scaling(local, file.max_position_embeddings, 0)
                .map_err(|m| ("rope_parameters", m))?;
            Some(LocalRope { theta, scaling })
        } else {
            None
        };
        let scaling = file
            .rope_scaling
            .as_ref()
            .filter(|v| !v.is_null())
            .or(rope_params);
        let original_max = scaling
            .and_then(|v| v.get("original_max_position_embeddings"))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .or(file.original_max_position_embeddings)
            .unwrap_or(file.max_position_embeddings);
        let scaling_field = if file.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            "rope_scaling"
        } else {
            "rope_parameters"
        };
        let rope_scaling = parse_rope_scaling(scaling, file.max_position_embeddings, original_max)
            .map_err(|m| (scaling_field, m))?;
        check_ranges(
            file,
            head_dim,
            rope_theta,
            &rope_scaling,
            local_rope.as_ref(),
        )?;
        let partial_rotary_factor = scaling
            .and_then(|v| v.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .or(file.partial_rotary_factor)
            .unwrap_or(1.0);
        // transformers: int(head_dim * partial_rotary_factor).
        let rotary_dim = (head_dim as f64 * partial_rotary_factor) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err((
                    "partial_rotary_factor",
                    format!(
                        "{partial_rotary_factor} of head_dim {head_dim} gives {rotary_dim} rotary dimensions; expected an even number from 2 to head_dim"
                    ),
                ));
        }
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &rope_scaling
        {
            for (name, factors) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if factors.len() != rotary_dim / 2 {
                    return Err((
                        "rope_scaling",
                        format!(
                            "longrope {name} has {} entries; expected {} (rotary dimensions / 2)",
                            factors.len(),
                            rotary_dim / 2
                        ),
                    ));
                }
            }
        }
        Ok(Rope {
            theta: rope_theta,
            scaling: rope_scaling,
            local: local_rope,
            rotary_dim,
        })
    }
}

/// Sizes and constants a forward pass divides by, takes powers of or allocates from: zero,
/// negative or non-finite values would give NaN everywhere (or nothing) instead of an error.
fn check_ranges(
    file: &ConfigFile,
    head_dim: usize,
    rope_theta: f64,
    rope_scaling: &RopeScaling,
    local_rope: Option<&LocalRope>,
) -> std::result::Result<(), FieldError> {
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
    // Per-layer settings are sized by it before any tensor is read.
    if file.num_hidden_layers > MAX_LAYERS {
        return Err((
            "num_hidden_layers",
            format!(
                "{} is more layers than any model has (at most {MAX_LAYERS})",
                file.num_hidden_layers
            ),
        ));
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
    if let Some(eps) = file.rms_norm_eps {
        positive("rms_norm_eps", eps)?;
    }
    positive("rope_theta", rope_theta)?;
    if let Some(local) = local_rope {
        positive("rope_local_base_freq", local.theta)?;
    }
    match rope_scaling {
        RopeScaling::None => {}
        &RopeScaling::Linear { factor } => {
            positive("rope_scaling", factor).map_err(|(f, m)| (f, format!("factor {m}")))?
        }
        &RopeScaling::Llama3 {
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
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } => {
            for v in short_factor.iter().chain(long_factor) {
                positive("rope_scaling", *v).map_err(|(f, m)| (f, format!("every factor {m}")))?;
            }
            positive("rope_scaling", *attention_factor)
                .map_err(|(f, m)| (f, format!("attention_factor {m}")))?;
            if *original_max_position_embeddings == 0 {
                return Err((
                    "original_max_position_embeddings",
                    "must be at least 1, found 0".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Each layer's sliding window, as transformers' config classes decide it: Mistral's and
/// Phi-3's apply to every layer; Qwen2/Qwen3 use it only with `use_sliding_window`, on the
/// layers `layer_types` marks `sliding_attention` (by default those from `max_window_layers`
/// on); Gemma's on the layers `layer_types` marks, by default all but every second (Gemma 2)
/// or every `sliding_window_pattern`-th (Gemma 3) layer.
fn layer_windows(
    file: &ConfigFile,
    architecture: Architecture,
    default_window: Option<usize>,
) -> std::result::Result<Vec<Option<usize>>, FieldError> {
    let n = file.num_hidden_layers;
    let window = match architecture {
        Architecture::Llama => None,
        Architecture::Mistral
        | Architecture::Phi3
        | Architecture::Gemma2
        | Architecture::Gemma3 => file.sliding_window.or(default_window),
        Architecture::Qwen2 | Architecture::Qwen3 => {
            file.sliding_window.filter(|_| file.use_sliding_window)
        }
    };
    let Some(window) = window else {
        return Ok(vec![None; n]);
    };
    if window == 0 {
        return Err(("sliding_window", "must be at least 1".into()));
    }
    let types = match &file.layer_types {
        Some(types) => types.clone(),
        None if matches!(architecture, Architecture::Mistral | Architecture::Phi3) => {
            vec!["sliding_attention".into(); n]
        }
        // Gemma: every layer but each `pattern`-th slides (Gemma 2: every other one).
        None if architecture.is_gemma() => {
            let pattern = match architecture {
                Architecture::Gemma2 => 2,
                _ => file.sliding_window_pattern.unwrap_or(6).max(1),
            };
            (0..n)
                .map(|i| {
                    if (i + 1) % pattern != 0 {
                        "sliding_attention".into()
                    } else {
                        "full_attention".into()
                    }
                })
                .collect()
        }
        None => {
            let first = file.max_window_layers.unwrap_or(28);
            (0..n)
                .map(|i| {
                    if i >= first {
                        "sliding_attention".into()
                    } else {
                        "full_attention".into()
                    }
                })
                .collect()
        }
    };
    if types.len() != n {
        return Err((
            "layer_types",
            format!("{} entries for {n} layers", types.len()),
        ));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(None),
            "sliding_attention" => Ok(Some(window)),
            other => Err((
                "layer_types",
                format!(
                    "unknown layer type {other:?}; expected full_attention or sliding_attention"
                ),
            )),
        })
        .collect()
}

/// A soft-capping field: its value, `default` when missing, `None` when null.
fn softcap(
    raw: &Value,
    path: &Path,
    field: &'static str,
    default: Option<f64>,
) -> Result<Option<f64>> {
    match raw.get(field) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(cap) if cap.is_finite() && cap > 0.0 => Ok(Some(cap)),
            _ => Err(Error::field(
                path,
                field,
                format!("expected a positive number or null, found {v}"),
            )),
        },
    }
}

fn parse_rope_scaling(
    v: Option<&Value>,
    max_position_embeddings: usize,
    original_max_position_embeddings: usize,
) -> std::result::Result<RopeScaling, String> {
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
        // Older Phi-3 configs name it "su" or "yarn" (transformers maps both to longrope).
        "longrope" | "su" | "yarn" if v.get("short_factor").is_some() => {
            let factors = |key: &str| -> std::result::Result<Vec<f64>, String> {
                v.get(key)
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| format!("rope type longrope needs `{key}`, a list of numbers"))
            };
            let original = original_max_position_embeddings as f64;
            // transformers' `_compute_longrope_parameters`.
            let factor = v
                .get("factor")
                .and_then(Value::as_f64)
                .unwrap_or(max_position_embeddings as f64 / original);
            let attention_factor = match v.get("attention_factor").and_then(Value::as_f64) {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / original.ln()).sqrt(),
            };
            Ok(RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings,
                attention_factor,
            })
        }
        other => Err(format!(
            "unsupported rope type {other:?}; supported: default, linear, llama3, longrope"
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

    /// The newer families' transformers defaults, and Gemma 3's per-layer-type RoPE.
    #[test]
    fn family_defaults_follow_transformers() {
        let with = |model_type: &str| {
            let mut v = base();
            v["model_type"] = json!(model_type);
            v
        };
        let q = parse(with("qwen3")).unwrap();
        assert!(q.qk_norm && !q.qkv_bias && q.head_dim == 128);
        let p = parse(with("phi3")).unwrap();
        assert!(p.fused_projections && p.rms_norm_eps == 1e-5 && p.rotary_dim == p.head_dim);
        let g = parse(with("gemma2")).unwrap();
        assert_eq!(g.activation, Activation::GeluTanh);
        assert_eq!(
            (g.attention_softcap, g.final_softcap),
            (Some(50.0), Some(30.0))
        );
        assert!(g.norm_plus_one && g.sandwich_norms && g.tie_word_embeddings);
        assert_eq!(g.head_dim, 256);
        assert_eq!(g.attention_scale, 1.0 / 16.0);
        // Layer 0 slides, layer 1 attends to everything.
        assert_eq!(g.layer_windows, vec![Some(4096), None]);
        let mut v = with("gemma3_text");
        v["num_hidden_layers"] = json!(3);
        v["sliding_window"] = json!(8);
        v["sliding_window_pattern"] = json!(3);
        v["rope_theta"] = json!(1e6);
        v["rope_local_base_freq"] = json!(1e4);
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
        let g3 = parse(v).unwrap();
        assert!(g3.qk_norm && g3.attention_softcap.is_none() && g3.final_softcap.is_none());
        assert_eq!(g3.layer_windows, vec![Some(8), Some(8), None]);
        assert_eq!(g3.rope_theta, 1e6);
        assert_eq!(g3.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        let local = g3.local_rope.unwrap();
        assert_eq!((local.theta, local.scaling), (1e4, RopeScaling::None));
    }

    #[test]
    fn bad_family_configs_name_the_field() {
        let cases = [
            (
                json!({"model_type":"phi3","partial_rotary_factor":0.5,
                    "rope_scaling":{"rope_type":"longrope","short_factor":[1.0],"long_factor":[1.0, 2.0]}}),
                "`rope_scaling`",
            ),
            (
                json!({"model_type":"phi3","partial_rotary_factor":0.1}),
                "`partial_rotary_factor`",
            ),
            (
                json!({"model_type":"gemma2","hidden_activation":"relu"}),
                "`hidden_activation`",
            ),
            (
                json!({"model_type":"gemma3"}),
                "vision tower is not supported",
            ),
            (
                json!({"model_type":"gemma3_text","use_bidirectional_attention":true}),
                "`use_bidirectional_attention`",
            ),
            (
                json!({"model_type":"qwen3","use_sliding_window":true,"sliding_window":4,
                    "layer_types":["full_attention"]}),
                "`layer_types`",
            ),
        ];
        for (extra, expect) in cases {
            let mut v = base();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains("config.json") && err.contains(expect), "{err}");
        }
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
            ("num_hidden_layers", json!(1u64 << 44)),
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
