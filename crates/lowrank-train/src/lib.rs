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
use lowrank_quant::QuantSpec;
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

impl Method {
    /// The name in tables and reports: LoRA, DoRA, full, AdaLoRA.
    pub fn label(self) -> &'static str {
        match self {
            Method::Lora => "LoRA",
            Method::Dora => "DoRA",
            Method::Full => "full",
            Method::Adalora => "AdaLoRA",
        }
    }
}

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

/// Everything `lowrank train` can be told: the CLI flattens this struct into its flags, so the
/// flag names, help and defaults below are the one description of a run (the library's
/// `Default` is a command line that gives only the required flags).
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct TrainOptions {
    /// Model folder, GGUF file (llama, qwen2), or Hub id org/name[@revision] (from the HF cache, else downloaded into it).
    #[arg(long)]
    pub model: String,
    /// JSONL: {"text"}, {"prompt","completion"} or {"messages":[{"role","content"}...]} per line.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: adapter (or full checkpoint), training_log.jsonl, loss.svg, checkpoints.
    #[arg(long)]
    pub out: PathBuf,
    /// Separate eval JSONL.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Hold out this share of --data for eval (seeded).
    #[arg(long)]
    pub eval_split: Option<f64>,
    /// lora, dora, adalora or full.
    #[arg(long, default_value_t = Method::Lora)]
    pub method: Method,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// LoRA dropout on the adapters' input.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// q_proj,v_proj | all-linear | a regex over module keys.
    #[arg(long, default_value = "all-linear")]
    pub targets: String,
    /// Scale α/√r instead of α/r.
    #[arg(long)]
    pub rslora: bool,
    /// kaiming, gaussian, pissa or olora.
    #[arg(long, default_value_t = Init::Kaiming)]
    pub init: Init,
    /// Continue from an existing PEFT adapter (folder or Hub id org/name[@revision]).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// adamw or sgd.
    #[arg(long, default_value_t = OptimizerKind::Adamw)]
    pub optimizer: OptimizerKind,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// AdamW betas, `B1,B2`.
    #[arg(long, default_value = "0.9,0.999", value_parser = parse_betas)]
    pub betas: (f64, f64),
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// constant, linear or cosine.
    #[arg(long, default_value_t = Schedule::Cosine)]
    pub lr_schedule: Schedule,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Sequences (or packed rows) per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip the global gradient norm; 0 disables.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop after N optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shuffle the lines each epoch (seeded); `--no-shuffle` keeps them in file order.
    #[arg(long = "no-shuffle", action = clap::ArgAction::SetFalse, help = "Keep the lines in file order")]
    pub shuffle: bool,
    /// Truncate each sequence to this many tokens (also the packed row length).
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Pack several sequences per row (no attention or loss across them).
    #[arg(long)]
    pub pack: bool,
    /// Recompute each layer's activations in backward to save memory.
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// f32, or bf16: the frozen base's linear weights kept in bf16 and their matmuls fed
    /// bf16 activations with f32 accumulation (adapters and optimizer state stay f32).
    #[arg(long, default_value_t = ComputeDtype::F32)]
    #[serde(default = "default_compute_dtype")]
    pub compute_dtype: ComputeDtype,
    /// Write a checkpoint every N steps.
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Evaluate every N steps.
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Continue a killed run: its --out folder or a checkpoint-N folder. The options, the
    /// model folder and the data's contents must be those the checkpoint was trained with.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// No progress bar or summary.
    #[arg(long)]
    pub quiet: bool,
    /// Testing: end after N optimizer steps as if killed (no final adapter), to test --resume.
    #[arg(long, hide = true)]
    #[serde(default)]
    pub stop_after: Option<usize>,
    /// Quantize the base's linear weights to 4 bits at load (QLoRA); the CLI sets it from
    /// `--quantize`, `--double-quant` and `--block-size`, which other commands share.
    #[arg(skip)]
    #[serde(default)]
    pub quantize: Option<QuantSpec>,
    /// `--method adalora`'s rank budget schedule and regularizer (PEFT's `AdaLoraConfig`).
    #[command(flatten)]
    #[serde(default)]
    pub adalora: AdaloraOptions,
}

/// `--betas B1,B2`.
fn parse_betas(s: &str) -> std::result::Result<(f64, f64), String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    match parts.as_slice() {
        [a, b] => Ok((
            a.parse().map_err(|e| format!("{a:?}: {e}"))?,
            b.parse().map_err(|e| format!("{b:?}: {e}"))?,
        )),
        _ => Err(format!("expected two numbers like 0.9,0.999, found {s:?}")),
    }
}

/// `--method adalora`: the rank budget schedule (PEFT's `AdaLoraConfig`; total steps are the
/// run's). `--alpha`, `--targets` and `--dropout` apply as for LoRA; `--rank` is not used.
/// Defaults are PEFT's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct AdaloraOptions {
    /// AdaLoRA: initial rank of every adapted module (`init_r`).
    #[arg(long, default_value_t = 12)]
    pub init_rank: usize,
    /// AdaLoRA: target average rank (`target_r`); the final budget is this × modules.
    #[arg(long, default_value_t = 8)]
    pub target_rank: usize,
    /// AdaLoRA: warmup steps at the full budget.
    #[arg(long, default_value_t = 0)]
    pub tinit: usize,
    /// AdaLoRA: final steps with the rank pattern frozen.
    #[arg(long, default_value_t = 0)]
    pub tfinal: usize,
    /// AdaLoRA: steps between two maskings (`deltaT`).
    #[arg(long, default_value_t = 1)]
    pub delta_t: usize,
    /// AdaLoRA: EMA coefficient of the importance (sensitivity).
    #[arg(long, default_value_t = 0.85)]
    pub beta1: f64,
    /// AdaLoRA: EMA coefficient of the importance's uncertainty.
    #[arg(long, default_value_t = 0.85)]
    pub beta2: f64,
    /// AdaLoRA: weight of the orthogonality regularizer added to the loss.
    #[arg(long, default_value_t = 0.5)]
    pub orth_reg_weight: f64,
}

/// The values clap gives `T`'s flags on a command line of only `required` (the defaults
/// written in the `#[arg]` attributes).
fn clap_defaults<T: clap::Args + clap::FromArgMatches>(required: &[&str]) -> T {
    let command = T::augment_args(clap::Command::new("defaults"));
    let matches = command
        .try_get_matches_from(std::iter::once("defaults").chain(required.iter().copied()))
        .expect("the defaults are valid flag values");
    T::from_arg_matches(&matches).expect("the defaults are valid flag values")
}

impl Default for AdaloraOptions {
    fn default() -> Self {
        clap_defaults(&[])
    }
}

/// Runs saved before `--compute-dtype` existed trained in f32.
fn default_compute_dtype() -> ComputeDtype {
    ComputeDtype::F32
}

impl Default for TrainOptions {
    /// The CLI's defaults, with no model or data and `out` as the output folder.
    fn default() -> Self {
        TrainOptions {
            model: String::new(),
            data: PathBuf::new(),
            ..clap_defaults(&["--model", "-", "--data", "-", "--out", "out"])
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
