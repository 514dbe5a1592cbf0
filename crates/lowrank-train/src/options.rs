//! What a run is told: [`TrainOptions`] (the `lowrank train` flags, their defaults and
//! checks), the named choices it is made of, and [`TrainReport`], what a finished run reports.

use std::path::PathBuf;

use lowrank_core::adalora::AdaloraSchedule;
use lowrank_core::lora::ALL_LINEAR;
use lowrank_core::targets::ModuleSelector;
use lowrank_core::{Error, Result};
use lowrank_quant::QuantSpec;
use serde::{Deserialize, Serialize};

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
    /// Model folder, GGUF file (llama, qwen2, qwen3, phi3, gemma2, gemma3), or Hub id org/name[@revision] (from the HF cache, else downloaded into it).
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

impl AdaloraOptions {
    /// The budget schedule of a run over modules of initial rank `init_r` (`--init-rank`, or
    /// the rank of the adapter a run continues); the run's total steps are set when known.
    pub fn schedule(&self, init_r: usize) -> AdaloraSchedule {
        AdaloraSchedule {
            init_r,
            target_r: self.target_rank,
            tinit: self.tinit,
            tfinal: self.tfinal,
            delta_t: self.delta_t,
            beta1: self.beta1,
            beta2: self.beta2,
            orth_reg_weight: self.orth_reg_weight,
            total_step: None,
        }
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

/// `--targets`: `all-linear`, a comma-separated list of module names, or a regex (any of
/// `*+?()[]|^$\` makes it one) that must match the whole module key.
pub fn parse_targets(spec: &str) -> Result<ModuleSelector> {
    let spec = spec.trim();
    if spec == "all-linear" {
        return Ok(ModuleSelector::Names(
            ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
        ));
    }
    if spec.chars().any(|c| "*+?()[]|^$\\".contains(c)) {
        return ModuleSelector::regex(spec)
            .map_err(|e| Error::option("targets", format!("invalid regex: {e}")));
    }
    let names: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(Error::option("targets", "no module names given"));
    }
    Ok(ModuleSelector::Names(names))
}

pub(crate) fn bad(field: &str, msg: impl Into<String>) -> Error {
    Error::option(field, msg.into())
}

pub(crate) fn validate(o: &TrainOptions) -> Result<()> {
    if o.method != Method::Full {
        if o.rank == 0 {
            return Err(bad("rank", "must be at least 1"));
        }
        // The scale α/r is applied in f32.
        if !(o.alpha.is_finite() && o.alpha > 0.0 && o.alpha <= f64::from(f32::MAX)) {
            return Err(bad(
                "alpha",
                format!(
                    "must be a positive number at most {:e}, found {}",
                    f32::MAX,
                    o.alpha
                ),
            ));
        }
    }
    if !(0.0..1.0).contains(&o.dropout) {
        return Err(bad(
            "dropout",
            format!("expected a value in [0, 1), found {}", o.dropout),
        ));
    }
    if !o.lr.is_finite() || o.lr <= 0.0 {
        return Err(bad(
            "lr",
            format!("must be a positive number, found {}", o.lr),
        ));
    }
    if !(0.0..1.0).contains(&o.betas.0) || !(0.0..1.0).contains(&o.betas.1) {
        return Err(bad(
            "betas",
            format!("each must be in [0, 1), found {:?}", o.betas),
        ));
    }
    if !(o.eps.is_finite() && o.eps > 0.0) {
        return Err(bad(
            "eps",
            format!("must be a positive number, found {}", o.eps),
        ));
    }
    if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
        return Err(bad(
            "weight_decay",
            format!("must be a number ≥ 0, found {}", o.weight_decay),
        ));
    }
    // inf clips nothing, as 0 does.
    if o.max_grad_norm.is_nan() || o.max_grad_norm < 0.0 {
        return Err(bad(
            "max_grad_norm",
            format!(
                "must be a number ≥ 0 (0 disables clipping), found {}",
                o.max_grad_norm
            ),
        ));
    }
    for (field, value) in [("batch_size", o.batch_size), ("grad_accum", o.grad_accum)] {
        if value == 0 {
            return Err(bad(field, "must be at least 1"));
        }
    }
    if o.max_len < 2 {
        return Err(bad(
            "max_len",
            "must be at least 2 (one token predicts the next)",
        ));
    }
    if o.epochs == 0 && o.max_steps.is_none() {
        return Err(bad("epochs", "must be at least 1 (or give --max-steps)"));
    }
    for (field, value) in [
        ("max_steps", o.max_steps),
        ("save_every", o.save_every),
        ("eval_every", o.eval_every),
    ] {
        if value == Some(0) {
            return Err(bad(field, "must be at least 1"));
        }
    }
    if o.compute_dtype == ComputeDtype::Bf16 && o.method == Method::Full {
        return Err(bad(
            "compute_dtype",
            "bf16 applies to a frozen base; full fine-tuning trains every weight in f32",
        ));
    }
    if o.compute_dtype == ComputeDtype::Bf16 && o.quantize.is_some() {
        return Err(bad(
            "compute_dtype",
            "bf16 applies to a dense base; a 4-bit base (--quantize) already multiplies from its packed codes in f32",
        ));
    }
    if o.method == Method::Full && o.init_adapter.is_some() {
        return Err(bad("init_adapter", "cannot be combined with --method full"));
    }
    if o.method == Method::Dora
        && matches!(o.init, Init::Pissa | Init::Olora)
        && o.init_adapter.is_none()
    {
        return Err(bad(
            "init",
            "PiSSA/OLoRA with DoRA cannot be saved as an adapter for the original base (PEFT's conversion drops the magnitude); use --method lora",
        ));
    }
    if o.method == Method::Adalora {
        let a = &o.adalora;
        if a.init_rank == 0 || a.target_rank > a.init_rank {
            return Err(Error::Msg(format!(
                "--target-rank {} and --init-rank {}: need 1 ≤ --target-rank ≤ --init-rank",
                a.target_rank, a.init_rank
            )));
        }
        if a.delta_t == 0 {
            return Err(bad("delta_t", "must be at least 1"));
        }
        if !(a.beta1 > 0.0 && a.beta1 < 1.0 && a.beta2 > 0.0 && a.beta2 < 1.0) {
            return Err(Error::Msg(format!(
                "--beta1 {} and --beta2 {}: each must be in (0, 1)",
                a.beta1, a.beta2
            )));
        }
        if a.orth_reg_weight.is_nan() || a.orth_reg_weight < 0.0 {
            return Err(bad("orth_reg_weight", "must be ≥ 0"));
        }
    }
    if o.eval_data.is_some() && o.eval_split.is_some() {
        return Err(bad(
            "eval_split",
            "give --eval-data or --eval-split, not both",
        ));
    }
    Ok(())
}
