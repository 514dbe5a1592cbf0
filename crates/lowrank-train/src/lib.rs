//! lowrank-train: fine-tuning Llama-family models with LoRA, DoRA or all weights ("full"),
//! writing adapters in HF PEFT's format.
//!
//! One module per job: [`data`] (JSONL formats, loss masks, batches), [`optim`] (SGD, AdamW),
//! [`schedule`] (learning-rate schedules), [`init`] (adapter initialisations as PEFT does them),
//! [`trainer`] (the loop, checkpoints, resume), [`plot`] (loss.svg), [`memory`] (RSS, estimate),
//! [`adalora`] (AdaLoRA: trainable P·Λ·Q, orthogonality regularizer, rank allocation, rank report),
//! [`comm`] (the communicator of data-parallel training; MPI with the `mpi` feature).

pub mod adalora;
pub mod comm;
pub mod data;
pub mod init;
pub mod memory;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod trainer;

use std::path::PathBuf;

pub use lowrank_core::{Error, Result};
use serde::{Deserialize, Serialize};
pub use trainer::{train, train_with};

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident, $what:literal, { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name { $($(#[$vm])* #[serde(rename = $text)] $variant),+ }

        impl $name {
            pub fn as_str(&self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(concat!("unknown ", $what, " {:?}; expected one of: {}"), s, [$($text),+].join(", "))),
                }
            }
        }
    };
}

named_enum!(
    /// What is trained.
    Method, "method", {
        /// Low-rank adapters on the targeted linears; everything else frozen.
        Lora = "lora",
        /// LoRA plus a trainable magnitude per output row (Liu et al. 2024).
        Dora = "dora",
        /// Every weight of the model (the baseline LoRA is measured against).
        Full = "full",
        /// AdaLoRA (Zhang et al. 2023): ΔW = P·Λ·Q whose singular values are masked down to
        /// a rank budget by learned importance (PEFT's `AdaLoraModel`).
        Adalora = "adalora",
    }
);

named_enum!(
    /// The dtype the frozen base's matmuls take (`--compute-dtype`).
    ComputeDtype, "compute dtype", {
        /// Everything in f32.
        F32 = "f32",
        /// Mixed precision: the frozen base's linear weights stored in bf16 and their matmuls
        /// fed bf16 activations, accumulated in f32; adapters, their gradients, the optimizer
        /// state, norms, attention, the head and the loss stay f32.
        Bf16 = "bf16",
    }
);

named_enum!(
    /// The 4-bit code of a quantized base (bitsandbytes' `bnb_4bit_quant_type`).
    QuantKind, "quant type", {
        /// NormalFloat4: quantiles of N(0, 1), for normally distributed weights.
        Nf4 = "nf4",
        /// 4-bit float (1 sign, 2 exponent, 1 mantissa bits).
        Fp4 = "fp4",
    }
);

/// `--quantize nf4|fp4 [--double-quant] [--block-size N]`: train adapters over a 4-bit base
/// (every linear weight of the decoder layers quantized at load, as QLoRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantizeOptions {
    pub quant_type: QuantKind,
    pub double_quant: bool,
    pub block_size: usize,
}

impl QuantizeOptions {
    /// The checked spec (block size a power of two in 32..=4096).
    pub fn spec(&self) -> lowrank_core::Result<lowrank_core::QuantSpec> {
        let kind = match self.quant_type {
            QuantKind::Nf4 => lowrank_quant::QuantType::Nf4,
            QuantKind::Fp4 => lowrank_quant::QuantType::Fp4,
        };
        lowrank_core::QuantSpec::new(kind, self.double_quant, self.block_size)
    }
}

named_enum!(
    /// How new adapter tensors start (PEFT's `init_lora_weights`).
    Init, "init", {
        /// A ~ kaiming_uniform(a=√5) (= U(±1/√in)), B = 0 (PEFT's default, `true`).
        Kaiming = "kaiming",
        /// A ~ N(0, 1/r), B = 0.
        Gaussian = "gaussian",
        /// A, B from the top-r singular triplets of W, W ← W − s·BA (PiSSA).
        Pissa = "pissa",
        /// B, A from the QR decomposition of W, W ← W − s·BA (OLoRA).
        Olora = "olora",
    }
);

named_enum!(
    /// The optimizer.
    OptimizerKind, "optimizer", {
        /// torch.optim.AdamW: decoupled weight decay, bias-corrected moments.
        Adamw = "adamw",
        /// torch.optim.SGD without momentum (weight decay as L2 added to the gradient).
        Sgd = "sgd",
    }
);

named_enum!(
    /// Learning-rate schedule after linear warmup, as transformers' `get_*_schedule_with_warmup`.
    Schedule, "lr schedule", {
        Constant = "constant",
        Linear = "linear",
        Cosine = "cosine",
    }
);

/// Everything `lowrank train` can be told; the CLI maps its flags 1:1 onto these fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Model folder or repo id in the local HF cache.
    pub model: String,
    /// Quantize the base's linear weights to 4 bits at load (QLoRA).
    #[serde(default)]
    pub quantize: Option<QuantizeOptions>,
    /// The frozen base's matmul dtype (bf16: mixed precision over a dense base).
    #[serde(default = "default_compute_dtype")]
    pub compute_dtype: ComputeDtype,
    /// Training data, JSONL: `{"text"}`, `{"prompt","completion"}` or `{"messages":[...]}`.
    pub data: PathBuf,
    /// Output folder: adapter (or full checkpoint), training_log.jsonl, loss.svg, checkpoints.
    pub out: PathBuf,
    pub eval_data: Option<PathBuf>,
    /// Hold out this share of the training lines (seeded) for evaluation.
    pub eval_split: Option<f64>,
    pub method: Method,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// `q_proj,v_proj`, `all-linear`, or a regex over module keys (full match).
    pub targets: String,
    pub rslora: bool,
    pub init: Init,
    /// Continue from an existing PEFT adapter folder.
    pub init_adapter: Option<PathBuf>,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub lr_schedule: Schedule,
    pub warmup_steps: usize,
    /// Sequences (or packed rows) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this; 0 disables.
    pub max_grad_norm: f64,
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<usize>,
    pub seed: u64,
    /// Shuffle the lines each epoch (seeded); `false` keeps file order.
    pub shuffle: bool,
    /// Truncate each sequence to this many tokens (also the packed row length).
    pub max_len: usize,
    /// Pack several sequences into each row (no attention or loss across them).
    pub pack: bool,
    /// Recompute each layer's activations in backward to save memory.
    pub grad_checkpoint: bool,
    /// Write a checkpoint every N optimizer steps.
    pub save_every: Option<usize>,
    /// Evaluate every N optimizer steps (always at the start and the end when there is eval data).
    pub eval_every: Option<usize>,
    /// Continue a killed run from its output folder (latest checkpoint) or a checkpoint folder.
    pub resume: Option<PathBuf>,
    /// No progress bar and no summary lines on stderr.
    pub quiet: bool,
    /// End the run after this many steps as if it were killed (no final adapter); for testing
    /// `resume`.
    #[serde(default)]
    pub stop_after: Option<usize>,
    /// `--method adalora`'s rank budget schedule and regularizer (PEFT's `AdaLoraConfig`).
    #[serde(default)]
    pub adalora: AdaloraOptions,
}

/// AdaLoRA's options; the total step count is the run's. Defaults are PEFT's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdaloraOptions {
    /// Initial rank of every module (`init_r`).
    pub init_rank: usize,
    /// Target average rank (`target_r`): the final budget is target_rank × modules.
    pub target_rank: usize,
    /// Warmup steps at the full budget (`tinit`).
    pub tinit: usize,
    /// Final steps with the pattern frozen (`tfinal`).
    pub tfinal: usize,
    /// Steps between two maskings (`deltaT`).
    pub delta_t: usize,
    /// EMA coefficient of the sensitivity.
    pub beta1: f64,
    /// EMA coefficient of the uncertainty.
    pub beta2: f64,
    /// Weight of the orthogonality regularizer added to the loss.
    pub orth_reg_weight: f64,
}

impl Default for AdaloraOptions {
    fn default() -> Self {
        AdaloraOptions {
            init_rank: 12,
            target_rank: 8,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
        }
    }
}

/// Runs saved before `--compute-dtype` existed trained in f32.
fn default_compute_dtype() -> ComputeDtype {
    ComputeDtype::F32
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            model: String::new(),
            quantize: None,
            compute_dtype: ComputeDtype::F32,
            data: PathBuf::new(),
            out: PathBuf::from("out"),
            eval_data: None,
            eval_split: None,
            method: Method::Lora,
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: "all-linear".into(),
            rslora: false,
            init: Init::Kaiming,
            init_adapter: None,
            optimizer: OptimizerKind::Adamw,
            lr: 2e-4,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            lr_schedule: Schedule::Cosine,
            warmup_steps: 0,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: 1.0,
            epochs: 1,
            max_steps: None,
            seed: 0,
            shuffle: true,
            max_len: 512,
            pack: false,
            grad_checkpoint: false,
            save_every: None,
            eval_every: None,
            resume: None,
            quiet: false,
            stop_after: None,
            adalora: AdaloraOptions::default(),
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    /// Optimizer steps taken (including those before a resume).
    pub steps: usize,
    /// Loss of the last step (mean token loss, before its update).
    pub final_loss: f64,
    /// Eval loss after training, when there is eval data.
    pub eval_loss: Option<f64>,
    /// Eval loss of the base model without any adapter.
    pub base_eval_loss: Option<f64>,
    pub trainable_parameters: usize,
    pub model_parameters: usize,
    pub peak_rss_mb: f64,
    /// Wall time of this invocation.
    pub seconds: f64,
    pub out: PathBuf,
    /// Per-step losses of this run (after a resume: from the resumed step on).
    pub losses: Vec<f64>,
}
