//! Hugging Face models read from GGUF files (llama.cpp's format): the config.json the
//! metadata stands for, and the HF tensor names, with `convert_hf_to_gguf.py`'s conversions
//! undone (its tensor names, the q/k row permutation of llama-architecture attention, the
//! `1 + w` it stores for Gemma's norms).
//!
//! Adding an architecture is one [`ArchSpec`] row (with its per-layer tensor table) and its
//! hyper-parameters in [`GgufModel::config_json`]. Where the metadata is silent, the model is
//! what llama.cpp's loader makes of the file: e.g. Gemma's attention scale is 1/√head_dim and
//! Gemma 3 has one global-attention layer in six unless `attention.sliding_window_pattern`
//! says otherwise; Qwen3's GGUF has no sliding window.

use std::collections::HashMap;
use std::path::Path;

use lowrank_core::{Error, Result};
use lowrank_gguf::{GgufFile, TensorInfo, TensorType, Value as GgufValue};
use serde_json::{json, Value};

/// How an architecture of `general.architecture` maps to its Hugging Face model.
#[derive(Debug)]
pub struct ArchSpec {
    /// `general.architecture`, also the prefix of its hyper-parameter keys (`llama.block_count`).
    pub gguf: &'static str,
    /// config.json's `model_type`.
    pub model_type: &'static str,
    /// config.json's `architectures` entry.
    pub hf_class: &'static str,
    /// Other model types convert_hf_to_gguf.py writes as this architecture.
    pub converted_from: &'static [&'static str],
    /// `convert_hf_to_gguf.py` interleaves the rotary halves of each head's q/k rows
    /// (`LlamaModel.permute`); undone on load.
    pub permuted_qk: bool,
    /// Gemma: the converter stores each RMSNorm weight `w` as `1 + w` (the HF model computes
    /// `x · (1 + w)`, llama.cpp `x · w`).
    pub norm_plus_one: bool,
    /// Per-layer tensors: GGUF stem (`blk.N.<stem>.weight|bias`) → HF module
    /// (`model.layers.N.<module>.weight|bias`).
    pub layer_tensors: &'static [(&'static str, &'static str)],
}

const LLAMA_LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

const QWEN3_LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Phi-3 keeps its fused projections: `attn_qkv` and `ffn_up` holding gate and up.
const PHI3_LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_qkv", "self_attn.qkv_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_up", "mlp.gate_up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Gemma 2 norms around both blocks: HF's `post_attention_layernorm` is the attention output's
/// norm there, `pre_feedforward_layernorm` the MLP's input norm (GGUF's `ffn_norm`).
const GEMMA2_LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

const GEMMA3_LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The architectures read from and written to GGUF.
pub const ARCHITECTURES: &[ArchSpec] = &[
    ArchSpec {
        gguf: "llama",
        model_type: "llama",
        hf_class: "LlamaForCausalLM",
        converted_from: &["mistral"],
        permuted_qk: true,
        norm_plus_one: false,
        layer_tensors: LLAMA_LAYER,
    },
    ArchSpec {
        gguf: "qwen2",
        model_type: "qwen2",
        hf_class: "Qwen2ForCausalLM",
        converted_from: &[],
        permuted_qk: false,
        norm_plus_one: false,
        layer_tensors: LLAMA_LAYER,
    },
    ArchSpec {
        gguf: "qwen3",
        model_type: "qwen3",
        hf_class: "Qwen3ForCausalLM",
        converted_from: &[],
        permuted_qk: false,
        norm_plus_one: false,
        layer_tensors: QWEN3_LAYER,
    },
    ArchSpec {
        gguf: "phi3",
        model_type: "phi3",
        hf_class: "Phi3ForCausalLM",
        converted_from: &[],
        permuted_qk: false,
        norm_plus_one: false,
        layer_tensors: PHI3_LAYER,
    },
    ArchSpec {
        gguf: "gemma2",
        model_type: "gemma2",
        hf_class: "Gemma2ForCausalLM",
        converted_from: &[],
        permuted_qk: false,
        norm_plus_one: true,
        layer_tensors: GEMMA2_LAYER,
    },
    ArchSpec {
        gguf: "gemma3",
        model_type: "gemma3_text",
        hf_class: "Gemma3ForCausalLM",
        converted_from: &[],
        permuted_qk: false,
        norm_plus_one: true,
        layer_tensors: GEMMA3_LAYER,
    },
];

/// Tensors outside the layers: GGUF name stem → HF module.
const GLOBAL_TENSORS: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// Phi-3's LongRoPE factors, which config.json holds (`rope_scaling.long_factor` and
/// `short_factor`), not a weight.
const PHI3_ROPE_FACTORS: [&str; 2] = ["rope_factors_long.weight", "rope_factors_short.weight"];

impl ArchSpec {
    /// A metadata key of this architecture: `<arch>.<k>`.
    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.gguf)
    }

    /// The HF name of GGUF tensor `name`, if it is one this architecture has.
    pub fn hf_tensor_name(&self, name: &str) -> Option<String> {
        let (stem, kind) = name.rsplit_once('.')?;
        if kind != "weight" && kind != "bias" {
            return None;
        }
        if let Some(rest) = stem.strip_prefix("blk.") {
            let (layer, stem) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let (_, module) = self.layer_tensors.iter().find(|(g, _)| *g == stem)?;
            return Some(format!("model.layers.{layer}.{module}.{kind}"));
        }
        let (_, module) = GLOBAL_TENSORS.iter().find(|(g, _)| *g == stem)?;
        Some(format!("{module}.{kind}"))
    }

    /// The GGUF name of HF tensor `name` (the inverse of [`Self::hf_tensor_name`]).
    pub fn gguf_tensor_name(&self, name: &str) -> Option<String> {
        let (module, kind) = name.rsplit_once('.')?;
        if let Some(rest) = module.strip_prefix("model.layers.") {
            let (layer, module) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let (stem, _) = self.layer_tensors.iter().find(|(_, m)| *m == module)?;
            return Some(format!("blk.{layer}.{stem}.{kind}"));
        }
        let (stem, _) = GLOBAL_TENSORS.iter().find(|(_, m)| *m == module)?;
        Some(format!("{stem}.{kind}"))
    }

    /// The heads whose rows llama.cpp reorders ([`reorder_rotary_rows`]) in module or tensor
    /// `name`: the query's (`heads`) and the key's (`kv_heads`), for the architectures that
    /// permute them.
    pub(crate) fn rotary_heads(&self, name: &str, heads: usize, kv_heads: usize) -> Option<usize> {
        let is = |module: &str| name.ends_with(module) || name.contains(&format!("{module}."));
        if !self.permuted_qk {
            None
        } else if is(".self_attn.q_proj") {
            Some(heads)
        } else if is(".self_attn.k_proj") {
            Some(kv_heads)
        } else {
            None
        }
    }

    /// Whether HF tensor `name` is an RMSNorm weight GGUF holds as `1 + w`.
    pub fn stores_norm_plus_one(&self, hf_name: &str) -> bool {
        self.norm_plus_one && hf_name.ends_with("norm.weight")
    }

    /// The query pre-attention scalar llama.cpp assumes for Gemma (it has no key for it):
    /// the head size, or hidden/heads for the 27B models (gemma_pytorch's config).
    pub fn gemma_query_scalar(&self, layers: u64, hidden: u64, heads: u64, head_dim: u64) -> u64 {
        let is_27b = match self.gguf {
            "gemma2" => layers == 46,
            _ => layers == 62,
        };
        if is_27b && heads > 0 {
            hidden / heads
        } else {
            head_dim
        }
    }

    /// The layers llama.cpp's loader makes sliding-window ones when the file has no
    /// `attention.sliding_window_pattern`: `il % n < n - 1` with n = 2 (Gemma 2), 6 (Gemma 3).
    pub fn default_sliding_pattern(&self) -> u64 {
        if self.gguf == "gemma2" {
            2
        } else {
            6
        }
    }
}

/// Whether `path` is a GGUF file (a file starting with the GGUF magic).
pub fn is_gguf(path: &Path) -> bool {
    path.is_file() && lowrank_gguf::is_gguf(path)
}

/// An open GGUF model: the file, its architecture and the HF name of each tensor.
pub struct GgufModel {
    file: GgufFile,
    arch: &'static ArchSpec,
    /// HF name → index into `file.tensors()`.
    by_hf_name: HashMap<String, usize>,
}

impl GgufModel {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let name = file.str("general.architecture")?;
        let arch = ARCHITECTURES
            .iter()
            .find(|a| a.gguf == name)
            .ok_or_else(|| {
                Error::field(
                    path,
                    "general.architecture",
                    format!(
                        "architecture {name:?} is not supported from GGUF; supported: {}",
                        ARCHITECTURES
                            .iter()
                            .map(|a| a.gguf)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        let mut by_hf_name = HashMap::new();
        for (i, t) in file.tensors().iter().enumerate() {
            if t.name == "rope_freqs.weight" {
                return Err(Error::tensors(
                    path,
                    "tensor \"rope_freqs.weight\" (Llama 3.1 rope scaling, precomputed) is not supported from GGUF",
                ));
            }
            if arch.gguf == "phi3" && PHI3_ROPE_FACTORS.contains(&t.name.as_str()) {
                continue;
            }
            let hf = arch.hf_tensor_name(&t.name).ok_or_else(|| {
                Error::tensors(
                    path,
                    format!("tensor {:?} is not one a {} model has", t.name, arch.gguf),
                )
            })?;
            by_hf_name.insert(hf, i);
        }
        Ok(GgufModel {
            file,
            arch,
            by_hf_name,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn arch(&self) -> &'static ArchSpec {
        self.arch
    }

    /// The GGUF tensor holding HF tensor `name`.
    pub fn tensor(&self, hf_name: &str) -> Option<&TensorInfo> {
        self.by_hf_name
            .get(hf_name)
            .map(|&i| &self.file.tensors()[i])
    }

    /// HF names of every tensor.
    pub fn hf_names(&self) -> impl Iterator<Item = &str> {
        self.by_hf_name.keys().map(String::as_str)
    }

    /// The config.json the metadata stands for (transformers' field names).
    pub fn config_json(&self) -> Result<Value> {
        let f = &self.file;
        let heads = f.u64(&self.arch.key("attention.head_count"))?;
        let hidden = f.u64(&self.arch.key("embedding_length"))?;
        let layers = f.u64(&self.arch.key("block_count"))?;
        let embed = self
            .tensor("model.embed_tokens.weight")
            .ok_or_else(|| Error::tensors(self.path(), "no tensor \"token_embd.weight\""))?;
        let head_dim = match f.u64_opt(&self.arch.key("attention.key_length"))? {
            Some(d) => d,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        let rope_theta = f
            .f64_opt(&self.arch.key("rope.freq_base"))?
            .unwrap_or(10_000.0);
        let gemma = self.arch.norm_plus_one;
        let mut cfg = json!({
            "architectures": [self.arch.hf_class],
            "model_type": self.arch.model_type,
            "vocab_size": embed.shape()[0],
            "hidden_size": hidden,
            "intermediate_size": f.u64(&self.arch.key("feed_forward_length"))?,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": f.u64_opt(&self.arch.key("attention.head_count_kv"))?.unwrap_or(heads),
            // Written out: transformers' defaults differ per family (Qwen3 128, Gemma 256).
            "head_dim": head_dim,
            "rms_norm_eps": f.f64(&self.arch.key("attention.layer_norm_rms_epsilon"))?,
            // llama.cpp's default when the key is absent.
            "rope_theta": rope_theta,
            "tie_word_embeddings": self.tensor("lm_head.weight").is_none(),
            "torch_dtype": match embed.tensor_type {
                TensorType::F16 => "float16",
                TensorType::BF16 => "bfloat16",
                _ => "float32",
            },
        });
        let obj = cfg.as_object_mut().expect("an object");
        // llama.cpp's Gemma graphs use GELU (tanh approximation), the others SiLU.
        if gemma {
            obj.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
        } else {
            obj.insert("hidden_act".into(), "silu".into());
        }
        if let Some(ctx) = f.u64_opt(&self.arch.key("context_length"))? {
            obj.insert("max_position_embeddings".into(), ctx.into());
        }
        let has = |n: &str| self.tensor(n).is_some();
        if matches!(self.arch.model_type, "llama" | "qwen3") {
            obj.insert(
                "attention_bias".into(),
                has("model.layers.0.self_attn.q_proj.bias").into(),
            );
        }
        if self.arch.model_type == "llama" {
            obj.insert(
                "mlp_bias".into(),
                has("model.layers.0.mlp.up_proj.bias").into(),
            );
        }
        let scaling = self.rope_scaling()?;
        match self.arch.gguf {
            "gemma2" | "gemma3" => {
                self.gemma_fields(obj, layers, hidden, heads, head_dim, scaling)?
            }
            "phi3" => self.phi3_fields(obj, head_dim)?,
            _ => {
                if let Some(scaling) = scaling {
                    obj.insert("rope_scaling".into(), scaling);
                }
            }
        }
        for (gguf_key, hf_key) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = f.u64_opt(gguf_key)? {
                obj.insert(hf_key.into(), id.into());
            }
        }
        // Written out when absent: transformers' defaults (Phi-3's 32000) may lie past the
        // vocabulary.
        obj.entry("pad_token_id").or_insert(Value::Null);
        Ok(cfg)
    }

    /// `rope.scaling.*` as config.json's `rope_scaling` (None: no scaling).
    fn rope_scaling(&self) -> Result<Option<Value>> {
        let f = &self.file;
        match f.str_opt(&self.arch.key("rope.scaling.type"))? {
            None | Some("none") => Ok(None),
            Some("linear") => {
                let factor = f.f64(&self.arch.key("rope.scaling.factor"))?;
                Ok(Some(json!({"rope_type": "linear", "factor": factor})))
            }
            // Phi-3's factors are tensors, read by `phi3_fields`.
            Some("longrope") if self.arch.gguf == "phi3" => Ok(None),
            Some(other) => Err(Error::field(
                self.path(),
                &self.arch.key("rope.scaling.type"),
                format!(
                    "rope scaling {other:?} is not supported; supported: none, linear{}",
                    if self.arch.gguf == "phi3" {
                        ", longrope"
                    } else {
                        ""
                    }
                ),
            )),
        }
    }

    /// Gemma 2/3: soft-capping, sliding windows and their layers, the attention scale, and
    /// Gemma 3's two RoPEs (global layers: `rope.freq_base` and the scaling; sliding layers:
    /// `rope.freq_base_swa`, unscaled, as llama.cpp's loader has it).
    fn gemma_fields(
        &self,
        obj: &mut serde_json::Map<String, Value>,
        layers: u64,
        hidden: u64,
        heads: u64,
        head_dim: u64,
        scaling: Option<Value>,
    ) -> Result<()> {
        let f = &self.file;
        let gemma2 = self.arch.gguf == "gemma2";
        obj.insert(
            "query_pre_attn_scalar".into(),
            self.arch
                .gemma_query_scalar(layers, hidden, heads, head_dim)
                .into(),
        );
        // Absent keys: llama.cpp's defaults (Gemma 2: 50 and 30, Gemma 3: none).
        let cap = |k: &str, default: Option<f64>| -> Result<Value> {
            Ok(match f.f64_opt(&self.arch.key(k))?.or(default) {
                Some(v) if v > 0.0 => v.into(),
                _ => Value::Null,
            })
        };
        obj.insert(
            "attn_logit_softcapping".into(),
            cap("attn_logit_softcapping", gemma2.then_some(50.0))?,
        );
        obj.insert(
            "final_logit_softcapping".into(),
            cap("final_logit_softcapping", gemma2.then_some(30.0))?,
        );
        let window = match f.u64_opt(&self.arch.key("attention.sliding_window"))? {
            Some(0) => None,
            Some(w) => Some(w),
            None if gemma2 => Some(4096),
            None => None,
        };
        let sliding: Vec<bool> = match window {
            None => vec![false; layers as usize],
            Some(w) => {
                obj.insert("sliding_window".into(), w.into());
                self.sliding_layers(layers)?
            }
        };
        let layer_types: Vec<&str> = sliding
            .iter()
            .map(|&s| {
                if s {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        obj.insert("layer_types".into(), json!(layer_types));
        if gemma2 {
            if let Some(scaling) = scaling {
                obj.insert("rope_scaling".into(), scaling);
            }
            return Ok(());
        }
        let theta = obj["rope_theta"].clone();
        let local_theta = f
            .f64_opt(&self.arch.key("rope.freq_base_swa"))?
            .unwrap_or(10_000.0);
        let mut global = scaling.unwrap_or_else(|| json!({"rope_type": "default"}));
        global["rope_theta"] = theta;
        obj.insert(
            "rope_parameters".into(),
            json!({"full_attention": global,
                   "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}),
        );
        obj.remove("rope_theta");
        Ok(())
    }

    /// Which layers use the sliding window: `attention.sliding_window_pattern` (one bool per
    /// layer, or n: `il % n < n - 1`), else the architecture's default pattern.
    fn sliding_layers(&self, layers: u64) -> Result<Vec<bool>> {
        let name = self.arch.key("attention.sliding_window_pattern");
        let pattern = match self.file.get(&name) {
            None => self.arch.default_sliding_pattern(),
            Some(GgufValue::Array(items)) => {
                let flags: Option<Vec<bool>> = items
                    .iter()
                    .map(|v| match v {
                        GgufValue::Bool(b) => Some(*b),
                        _ => None,
                    })
                    .collect();
                return flags.filter(|f| f.len() as u64 == layers).ok_or_else(|| {
                    Error::field(
                        self.path(),
                        &name,
                        format!("expected {layers} bools, one per layer"),
                    )
                });
            }
            Some(v) => v.as_u64().ok_or_else(|| {
                Error::field(
                    self.path(),
                    &name,
                    "expected an integer or an array of bools",
                )
            })?,
        };
        Ok((0..layers)
            .map(|il| pattern == 0 || il % pattern < pattern - 1)
            .collect())
    }

    /// Phi-3: partial rotary embedding (`rope.dimension_count`), LongRoPE (its factors are
    /// the tensors `rope_factors_long/short.weight`) and the sliding window (config.json's,
    /// which the converter writes and llama.cpp ignores).
    fn phi3_fields(&self, obj: &mut serde_json::Map<String, Value>, head_dim: u64) -> Result<()> {
        let f = &self.file;
        let rope_dims = f
            .u64_opt(&self.arch.key("rope.dimension_count"))?
            .unwrap_or(head_dim);
        if head_dim > 0 && rope_dims != head_dim {
            obj.insert(
                "partial_rotary_factor".into(),
                (rope_dims as f64 / head_dim as f64).into(),
            );
        }
        let original = f.u64_opt(&self.arch.key("rope.scaling.original_context_length"))?;
        if let Some(original) = original {
            obj.insert("original_max_position_embeddings".into(), original.into());
        }
        let factors = |name: &str| -> Result<Option<Vec<f64>>> {
            if self.file.tensor(name).is_none() {
                return Ok(None);
            }
            let (_, values) = self.file.dequantize(name)?;
            Ok(Some(values.into_iter().map(f64::from).collect()))
        };
        match (
            factors(PHI3_ROPE_FACTORS[0])?,
            factors(PHI3_ROPE_FACTORS[1])?,
        ) {
            (Some(long), Some(short)) => {
                let original = original.ok_or_else(|| {
                    Error::field(
                        self.path(),
                        &self.arch.key("rope.scaling.original_context_length"),
                        "missing (LongRoPE needs it)",
                    )
                })?;
                obj.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "longrope", "long_factor": long, "short_factor": short,
                           "original_max_position_embeddings": original}),
                );
            }
            (None, None) => {}
            _ => {
                return Err(Error::tensors(
                    self.path(),
                    "LongRoPE needs both rope_factors_long.weight and rope_factors_short.weight",
                ))
            }
        }
        if let Some(w) = f.u64_opt(&self.arch.key("attention.sliding_window"))? {
            if w > 0 {
                obj.insert("sliding_window".into(), w.into());
            }
        }
        Ok(())
    }

    /// The model's config, as [`crate::ModelConfig::from_value`] validates it.
    pub fn config(&self) -> Result<crate::ModelConfig> {
        crate::ModelConfig::from_value(self.config_json()?, self.path())
    }

    /// HF tensor `name` in f32 with its row-major shape, q/k rows put back in HF order.
    pub fn load_f32(
        &self,
        name: &str,
        num_heads: usize,
        num_kv_heads: usize,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensor(name).ok_or_else(|| {
            Error::tensors(
                self.path(),
                format!(
                    "missing tensor {:?} ({name})",
                    self.arch.gguf_tensor_name(name).unwrap_or_default()
                ),
            )
        })?;
        let (shape, mut data) = self.file.dequantize(&info.name)?;
        if self.arch.stores_norm_plus_one(name) {
            // Exact for stored values of at least 1/2 (every real Gemma norm): the model's
            // 1 + w is then the stored value again, bit for bit.
            data.iter_mut().for_each(|v| *v -= 1.0);
        }
        let data = match self.arch.rotary_heads(name, num_heads, num_kv_heads) {
            Some(heads) => {
                let rows = shape.first().copied().unwrap_or(0);
                reorder_rotary_rows(&data, rows, heads, RotaryRows::FromGguf).ok_or_else(|| {
                Error::tensors(
                    self.path(),
                    format!(
                        "tensor {:?} of shape {shape:?} does not split into {heads} heads of even size",
                        info.name
                    ),
                )
            })?
            }
            None => data,
        };
        Ok((shape, data))
    }
}

/// Which way [`reorder_rotary_rows`] goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RotaryRows {
    /// HF's order to llama.cpp's (convert_hf_to_gguf.py's `LlamaModel.permute`).
    ToGguf,
    /// llama.cpp's order back to HF's.
    FromGguf,
}

/// The rows of a q/k projection (or its LoRA B) between HF's and llama.cpp's order: within
/// each head, GGUF row `2j + s` is HF row `s * head_rows / 2 + j` (the rotary halves are
/// interleaved). None when there are no rows or they do not split into `heads` heads of even
/// size.
pub(crate) fn reorder_rotary_rows(
    data: &[f32],
    rows: usize,
    heads: usize,
    way: RotaryRows,
) -> Option<Vec<f32>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let cols = data.len().checked_div(rows)?;
    let head_rows = rows / heads;
    let half = head_rows / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let hf = h * head_rows + s * half + j;
                let gguf = h * head_rows + 2 * j + s;
                let (from, to) = match way {
                    RotaryRows::ToGguf => (hf, gguf),
                    RotaryRows::FromGguf => (gguf, hf),
                };
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&data[from * cols..(from + 1) * cols]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broken GGUF file keeps lowrank_gguf's typed error (which names the file).
    #[test]
    fn a_truncated_gguf_is_a_gguf_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, b"GGUF").unwrap();
        let err = GgufModel::open(&path).err().unwrap();
        assert!(
            matches!(err, Error::Gguf(_)) && err.to_string().contains("model.gguf"),
            "{err:?}"
        );
    }

    const LLAMA: &ArchSpec = &ARCHITECTURES[0];

    #[test]
    fn names_map_both_ways() {
        for (gguf, hf) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            ("output_norm.weight", "model.norm.weight"),
            (
                "blk.11.attn_q.bias",
                "model.layers.11.self_attn.q_proj.bias",
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            (
                "blk.3.ffn_down.weight",
                "model.layers.3.mlp.down_proj.weight",
            ),
        ] {
            assert_eq!(LLAMA.hf_tensor_name(gguf).as_deref(), Some(hf));
            assert_eq!(LLAMA.gguf_tensor_name(hf).as_deref(), Some(gguf));
        }
        assert_eq!(LLAMA.hf_tensor_name("rope_freqs.weight"), None);
        assert_eq!(LLAMA.hf_tensor_name("blk.x.attn_q.weight"), None);
    }

    /// Gemma's and Phi-3's own names (gguf-py's tensor_mapping for those architectures).
    #[test]
    fn family_names_map_both_ways() {
        let spec = |name: &str| ARCHITECTURES.iter().find(|a| a.gguf == name).unwrap();
        for (arch, gguf, hf) in [
            (
                "gemma2",
                "blk.1.ffn_norm.weight",
                "model.layers.1.pre_feedforward_layernorm.weight",
            ),
            (
                "gemma2",
                "blk.1.post_attention_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            (
                "gemma3",
                "blk.0.post_ffw_norm.weight",
                "model.layers.0.post_feedforward_layernorm.weight",
            ),
            (
                "gemma3",
                "blk.2.attn_q_norm.weight",
                "model.layers.2.self_attn.q_norm.weight",
            ),
            (
                "qwen3",
                "blk.0.attn_k_norm.weight",
                "model.layers.0.self_attn.k_norm.weight",
            ),
            (
                "phi3",
                "blk.0.attn_qkv.weight",
                "model.layers.0.self_attn.qkv_proj.weight",
            ),
            (
                "phi3",
                "blk.0.ffn_up.weight",
                "model.layers.0.mlp.gate_up_proj.weight",
            ),
        ] {
            assert_eq!(
                spec(arch).hf_tensor_name(gguf).as_deref(),
                Some(hf),
                "{arch}"
            );
            assert_eq!(
                spec(arch).gguf_tensor_name(hf).as_deref(),
                Some(gguf),
                "{arch}"
            );
        }
        assert_eq!(spec("phi3").hf_tensor_name("blk.0.attn_q.weight"), None);
        assert!(spec("gemma2").stores_norm_plus_one("model.norm.weight"));
        assert!(!spec("qwen3").stores_norm_plus_one("model.norm.weight"));
    }

    /// The inverse of convert_hf_to_gguf.py's `permute` (reshape(n_head, 2, rows/n_head/2, cols)
    /// .swapaxes(1, 2)): 2 heads of 4 rows, row r holding the value r.
    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        // permute([0..8]) per head [a0 a1 b0 b1] -> [a0 b0 a1 b1]: rows 0 2 1 3 | 4 6 5 7.
        let gguf = [0., 2., 1., 3., 4., 6., 5., 7.];
        let hf = reorder_rotary_rows(&gguf, 8, 2, RotaryRows::FromGguf).unwrap();
        assert_eq!(hf, [0., 1., 2., 3., 4., 5., 6., 7.]);
        assert!(reorder_rotary_rows(&gguf, 8, 3, RotaryRows::FromGguf).is_none());
    }
}
