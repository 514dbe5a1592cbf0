//! A tiny Llama-architecture model with random weights, written as a Hugging Face checkpoint
//! folder (config.json, generation_config.json, model.safetensors with transformers' tensor
//! names, tokenizer files) that `Llama::load` and transformers' `LlamaForCausalLM` both read.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::charset;

/// The shape of the demo's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TinyConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
}

/// transformers' `initializer_range` for Llama: weights ~ N(0, 0.02²).
const INIT_STD: f32 = 0.02;

impl TinyConfig {
    /// The `config.json` of this shape over the demo tokenizer's vocabulary.
    pub fn config_json(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": charset::vocab_size(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.hidden_size / self.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "attention_bias": false,
            "mlp_bias": false,
            "initializer_range": INIT_STD,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
            "use_cache": true
        })
    }

    /// Parameters of a model of this shape.
    pub fn num_parameters(&self) -> Result<usize> {
        let config =
            lowrank_models::ModelConfig::from_value(self.config_json(), Path::new("config.json"))?;
        Ok(config.num_parameters())
    }

    /// Every weight under its transformers name with its shape, in checkpoint order.
    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let head_dim = h / self.num_heads;
        let (q, kv, i, v) = (
            self.num_heads * head_dim,
            self.num_kv_heads * head_dim,
            self.intermediate_size,
            charset::vocab_size(),
        );
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        out.push(("lm_head.weight".to_string(), vec![v, h]));
        out
    }

    /// Writes a randomly initialized checkpoint (as transformers initializes Llama: normal
    /// weights, unit norms) with the demo tokenizer into `dir`. Deterministic in `seed`.
    pub fn write_random(&self, dir: &Path, seed: u64) -> Result<()> {
        if !(self.hidden_size.is_multiple_of(self.num_heads)
            && self.num_heads.is_multiple_of(self.num_kv_heads))
        {
            bail!(
                "hidden size {} / {} heads / {} kv heads do not divide",
                self.hidden_size,
                self.num_heads,
                self.num_kv_heads
            );
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let normal =
            Normal::new(0f32, INIT_STD).map_err(|e| anyhow::anyhow!("normal distribution: {e}"))?;
        let mut tensors = Vec::new();
        for (name, shape) in self.tensor_shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            tensors.push((name, Tensor::from_vec(data, shape, &Device::Cpu)?));
        }
        std::fs::create_dir_all(dir)?;
        lowrank_core::files::write_safetensors(&dir.join("model.safetensors"), &tensors)?;
        lowrank_core::files::write_json(&dir.join("config.json"), &self.config_json())?;
        lowrank_core::files::write_json(
            &dir.join("generation_config.json"),
            &json!({"bos_token_id": 1, "eos_token_id": 2, "do_sample": false}),
        )?;
        charset::write_tokenizer(dir)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lowrank_models::{Llama, Tokenizer};

    fn small() -> TinyConfig {
        TinyConfig {
            hidden_size: 32,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            intermediate_size: 48,
            max_position_embeddings: 64,
        }
    }

    #[test]
    fn the_checkpoint_loads_and_runs() {
        let dir = tempfile::tempdir().unwrap();
        small().write_random(dir.path(), 5).unwrap();
        let model = Llama::load(dir.path(), &Device::Cpu).unwrap();
        let tok = Tokenizer::load(dir.path()).unwrap();
        let c = model.config();
        assert_eq!(
            (c.vocab_size, c.num_layers, c.num_kv_heads, c.head_dim),
            (charset::vocab_size(), 2, 2, 8)
        );
        assert_eq!(c.num_parameters(), small().num_parameters().unwrap());
        let stored: usize = model
            .named_weights()
            .unwrap()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        assert_eq!(stored, c.num_parameters());
        assert_eq!(model.linears().len(), 2 * 7);
        let ids = tok.encode("copy: ab = ab", true).unwrap();
        let logits = model
            .forward(
                &Tensor::new(ids.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
                &[],
            )
            .unwrap();
        assert_eq!(logits.dims(), &[1, ids.len(), charset::vocab_size()]);
        // Random init: small logits, near-uniform predictions.
        let max: f32 = logits
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(max > 0.0 && max < 2.0, "{max}");
    }

    #[test]
    fn weights_are_deterministic_in_the_seed() {
        let read = |seed| {
            let dir = tempfile::tempdir().unwrap();
            small().write_random(dir.path(), seed).unwrap();
            std::fs::read(dir.path().join("model.safetensors")).unwrap()
        };
        assert_eq!(read(1), read(1));
        assert_ne!(read(1), read(2));
    }

    #[test]
    fn shapes_that_do_not_divide_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bad = TinyConfig {
            num_kv_heads: 3,
            ..small()
        };
        assert!(bad.write_random(dir.path(), 0).is_err());
    }
}
