//! Hugging Face models read from GGUF files (llama.cpp's format): the config.json the
//! metadata stands for, and the HF tensor names, with `convert_hf_to_gguf.py`'s conversions
//! undone (its tensor names, and the q/k row permutation of llama-architecture attention).
//!
//! Adding an architecture is one [`ArchSpec`] row, plus rows in [`LAYER_TENSORS`] for the
//! per-layer tensors it has beyond the llama ones (e.g. qwen3's `attn_q_norm`).

use std::collections::HashMap;
use std::path::Path;

use lowrank_core::{Error, Result};
use lowrank_gguf::{GgufFile, TensorInfo, TensorType};
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
}

/// The architectures read from and written to GGUF.
pub const ARCHITECTURES: &[ArchSpec] = &[
    ArchSpec {
        gguf: "llama",
        model_type: "llama",
        hf_class: "LlamaForCausalLM",
        converted_from: &["mistral"],
        permuted_qk: true,
    },
    ArchSpec {
        gguf: "qwen2",
        model_type: "qwen2",
        hf_class: "Qwen2ForCausalLM",
        converted_from: &[],
        permuted_qk: false,
    },
];

/// Tensors outside the layers: GGUF name stem → HF module.
const GLOBAL_TENSORS: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// Per-layer tensors (`blk.N.<stem>.weight|bias` → `model.layers.N.<module>.weight|bias`).
pub const LAYER_TENSORS: &[(&str, &str)] = &[
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

/// The HF name of GGUF tensor `name`, if it is one the table knows.
pub fn hf_tensor_name(name: &str) -> Option<String> {
    let (stem, kind) = name.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    if let Some(rest) = stem.strip_prefix("blk.") {
        let (layer, stem) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (_, module) = LAYER_TENSORS.iter().find(|(g, _)| *g == stem)?;
        return Some(format!("model.layers.{layer}.{module}.{kind}"));
    }
    let (_, module) = GLOBAL_TENSORS.iter().find(|(g, _)| *g == stem)?;
    Some(format!("{module}.{kind}"))
}

/// The GGUF name of HF tensor `name` (the inverse of [`hf_tensor_name`]).
pub fn gguf_tensor_name(name: &str) -> Option<String> {
    let (module, kind) = name.rsplit_once('.')?;
    if let Some(rest) = module.strip_prefix("model.layers.") {
        let (layer, module) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (stem, _) = LAYER_TENSORS.iter().find(|(_, m)| *m == module)?;
        return Some(format!("blk.{layer}.{stem}.{kind}"));
    }
    let (stem, _) = GLOBAL_TENSORS.iter().find(|(_, m)| *m == module)?;
    Some(format!("{stem}.{kind}"))
}

/// Whether `path` is a GGUF file (a file starting with the GGUF magic).
pub fn is_gguf(path: &Path) -> bool {
    path.is_file() && lowrank_gguf::is_gguf(path)
}

pub(crate) fn gguf_error(e: lowrank_gguf::GgufError) -> Error {
    Error::Msg(e.to_string())
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
        let file = GgufFile::open(path).map_err(gguf_error)?;
        let name = file.str("general.architecture").map_err(gguf_error)?;
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
                return Err(Error::Msg(format!(
                    "{}: tensor \"rope_freqs.weight\" (Llama 3.1 rope scaling, precomputed) is not supported from GGUF",
                    path.display()
                )));
            }
            let hf = hf_tensor_name(&t.name).ok_or_else(|| {
                Error::Msg(format!(
                    "{}: tensor {:?} is not one a {} model has",
                    path.display(),
                    t.name,
                    arch.gguf
                ))
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
        let key = |k: &str| format!("{}.{k}", self.arch.gguf);
        let e = gguf_error;
        let heads = f.u64(&key("attention.head_count")).map_err(e)?;
        let embed = self.tensor("model.embed_tokens.weight").ok_or_else(|| {
            Error::Msg(format!(
                "{}: no tensor \"token_embd.weight\"",
                self.path().display()
            ))
        })?;
        let mut cfg = json!({
            "architectures": [self.arch.hf_class],
            "model_type": self.arch.model_type,
            "vocab_size": embed.shape()[0],
            "hidden_size": f.u64(&key("embedding_length")).map_err(e)?,
            "intermediate_size": f.u64(&key("feed_forward_length")).map_err(e)?,
            "num_hidden_layers": f.u64(&key("block_count")).map_err(e)?,
            "num_attention_heads": heads,
            "num_key_value_heads": f.u64_opt(&key("attention.head_count_kv")).map_err(e)?.unwrap_or(heads),
            "rms_norm_eps": f.f64(&key("attention.layer_norm_rms_epsilon")).map_err(e)?,
            // llama.cpp's default when the key is absent.
            "rope_theta": f.f64_opt(&key("rope.freq_base")).map_err(e)?.unwrap_or(10_000.0),
            "hidden_act": "silu",
            "tie_word_embeddings": self.tensor("lm_head.weight").is_none(),
            "torch_dtype": match embed.tensor_type {
                TensorType::F16 => "float16",
                TensorType::BF16 => "bfloat16",
                _ => "float32",
            },
        });
        let obj = cfg.as_object_mut().expect("an object");
        if let Some(ctx) = f.u64_opt(&key("context_length")).map_err(e)? {
            obj.insert("max_position_embeddings".into(), ctx.into());
        }
        if let Some(head_dim) = f.u64_opt(&key("attention.key_length")).map_err(e)? {
            obj.insert("head_dim".into(), head_dim.into());
        }
        if self.arch.model_type == "llama" {
            let has = |n: &str| self.tensor(n).is_some();
            obj.insert(
                "attention_bias".into(),
                has("model.layers.0.self_attn.o_proj.bias").into(),
            );
            obj.insert(
                "mlp_bias".into(),
                has("model.layers.0.mlp.up_proj.bias").into(),
            );
        }
        match f.str_opt(&key("rope.scaling.type")).map_err(e)? {
            None | Some("none") => {}
            Some("linear") => {
                let factor = f.f64(&key("rope.scaling.factor")).map_err(e)?;
                obj.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "linear", "factor": factor}),
                );
            }
            Some(other) => {
                return Err(Error::field(
                    self.path(),
                    &key("rope.scaling.type"),
                    format!("rope scaling {other:?} is not supported; supported: none, linear"),
                ))
            }
        }
        for (gguf_key, hf_key) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ] {
            if let Some(id) = f.u64_opt(gguf_key).map_err(e)? {
                obj.insert(hf_key.into(), id.into());
            }
        }
        Ok(cfg)
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
            Error::Msg(format!(
                "{}: missing tensor {:?} ({name})",
                self.path().display(),
                gguf_tensor_name(name).unwrap_or_default()
            ))
        })?;
        let (shape, data) = self.file.dequantize(&info.name).map_err(gguf_error)?;
        let heads = if !self.arch.permuted_qk {
            None
        } else if name.contains(".self_attn.q_proj.") {
            Some(num_heads)
        } else if name.contains(".self_attn.k_proj.") {
            Some(num_kv_heads)
        } else {
            None
        };
        let data = match heads {
            Some(heads) => unpermute_rows(&data, &shape, heads).ok_or_else(|| {
                Error::Msg(format!(
                    "{}: tensor {:?} of shape {shape:?} does not split into {heads} heads of even size",
                    self.path().display(),
                    info.name
                ))
            })?,
            None => data,
        };
        Ok((shape, data))
    }
}

/// Undoes `LlamaModel.permute` of convert_hf_to_gguf.py: within each head, GGUF row `2j + s`
/// is HF row `s * head_rows / 2 + j` (the rotary halves were interleaved). None when the rows
/// do not split into `heads` heads of even size.
fn unpermute_rows(data: &[f32], shape: &[usize], heads: usize) -> Option<Vec<f32>> {
    let rows = *shape.first()?;
    let cols: usize = shape[1..].iter().product();
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let head_rows = rows / heads;
    let half = head_rows / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let hf = h * head_rows + s * half + j;
                let gguf = h * head_rows + 2 * j + s;
                out[hf * cols..(hf + 1) * cols]
                    .copy_from_slice(&data[gguf * cols..(gguf + 1) * cols]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(hf_tensor_name(gguf).as_deref(), Some(hf));
            assert_eq!(gguf_tensor_name(hf).as_deref(), Some(gguf));
        }
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
    }

    /// The inverse of convert_hf_to_gguf.py's `permute` (reshape(n_head, 2, rows/n_head/2, cols)
    /// .swapaxes(1, 2)): 2 heads of 4 rows, row r holding the value r.
    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        // permute([0..8]) per head [a0 a1 b0 b1] -> [a0 b0 a1 b1]: rows 0 2 1 3 | 4 6 5 7.
        let gguf = [0., 2., 1., 3., 4., 6., 5., 7.];
        let hf = unpermute_rows(&gguf, &[8, 1], 2).unwrap();
        assert_eq!(hf, [0., 1., 2., 3., 4., 5., 6., 7.]);
        assert!(unpermute_rows(&gguf, &[8, 1], 3).is_none());
    }
}
