//! Memory: the process's peak resident set (VmHWM) and an up-front estimate of training memory.

use lowrank_models::ModelConfig;

/// Peak resident set size in MB from /proc/self/status (0 where unavailable).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A rough estimate of training memory, bytes by part.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryEstimate {
    /// The model's weights (f32).
    pub weights: u64,
    /// Gradients and optimizer state of the trainable tensors.
    pub trainable_state: u64,
    /// Activations kept for backward, for one micro-batch.
    pub activations: u64,
    pub total: u64,
}

/// Estimates memory for `trainable` parameters with `optimizer_slots` state tensors each
/// (AdamW 2, SGD 0), a micro-batch of `batch`×`seq` tokens and optional gradient checkpointing.
pub fn estimate(
    config: &ModelConfig,
    trainable: usize,
    optimizer_slots: usize,
    batch: usize,
    seq: usize,
    grad_checkpoint: bool,
) -> MemoryEstimate {
    let f = 4u64;
    let weights = config.num_parameters() as u64 * f;
    // gradient + accumulated gradient + optimizer slots + the Var copy.
    let trainable_state = trainable as u64 * f * (3 + optimizer_slots as u64);
    let tokens = (batch * seq) as u64;
    let (h, i) = (config.hidden_size as u64, config.intermediate_size as u64);
    let heads = config.num_heads as u64;
    let q = heads * config.head_dim as u64;
    let kv = config.num_kv_heads as u64 * config.head_dim as u64;
    // Per token and layer: norms, q/k/v (+rope copies), attention scores and probabilities
    // (heads × seq each), attention output, MLP gate/up/act/product.
    let per_layer =
        tokens * (6 * h + 3 * q + 4 * kv + 4 * i) * f + tokens * heads * seq as u64 * 3 * f;
    let layers = config.num_layers as u64;
    let kept = if grad_checkpoint {
        tokens * h * f * layers + per_layer
    } else {
        per_layer * layers
    };
    let logits = tokens * config.vocab_size as u64 * f * 3;
    let activations = kept + logits;
    MemoryEstimate {
        weights,
        trainable_state,
        activations,
        total: weights + trainable_state + activations,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_is_positive_on_linux() {
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(super::peak_rss_mb() > 0.0);
        }
    }
}
