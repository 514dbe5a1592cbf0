//! `lowrank train`: fine-tune with LoRA, DoRA or all weights; flags map 1:1 onto
//! `lowrank_train::TrainOptions`. Built with the `mpi` feature, each process is one rank of
//! the MPI job it was started in (`mpirun`, `srun`), training data-parallel.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lowrank_models::hub::resolve_adapter_dir;
use lowrank_train::comm::Communicator;
use lowrank_train::{ComputeDtype, Init, Method, OptimizerKind, Schedule, TrainOptions};

#[derive(clap::Args)]
#[cfg_attr(
    feature = "mpi",
    command(
        after_help = "Data parallel: `mpirun -np N lowrank train ...` (or Slurm's `srun`) trains on N processes; --batch-size × --grad-accum stays the whole step's batch. Rank 0 writes --out."
    )
)]
pub struct Args {
    /// Model folder, GGUF file (llama, qwen2, qwen3, phi3, gemma2, gemma3), or Hub id org/name[@revision] (from the HF cache, else downloaded into it).
    #[arg(long)]
    model: String,
    /// JSONL: {"text"}, {"prompt","completion"} or {"messages":[{"role","content"}...]} per line.
    #[arg(long)]
    data: PathBuf,
    /// Output folder: adapter (or full checkpoint), training_log.jsonl, loss.svg, checkpoints.
    #[arg(long)]
    out: PathBuf,
    /// Separate eval JSONL.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Hold out this share of --data for eval (seeded).
    #[arg(long)]
    eval_split: Option<f64>,
    /// lora, dora, adalora or full.
    #[arg(long, default_value = "lora")]
    method: Method,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// LoRA dropout on the adapters' input.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// q_proj,v_proj | all-linear | a regex over module keys.
    #[arg(long, default_value = "all-linear")]
    targets: String,
    /// Scale α/√r instead of α/r.
    #[arg(long)]
    rslora: bool,
    /// kaiming, gaussian, pissa or olora.
    #[arg(long, default_value = "kaiming")]
    init: Init,
    /// Continue from an existing PEFT adapter (folder or Hub id org/name[@revision]).
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// adamw or sgd.
    #[arg(long, default_value = "adamw")]
    optimizer: OptimizerKind,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// AdamW betas, `B1,B2`.
    #[arg(long, default_value = "0.9,0.999", value_parser = parse_betas)]
    betas: (f64, f64),
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// constant, linear or cosine.
    #[arg(long, default_value = "cosine")]
    lr_schedule: Schedule,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Clip the global gradient norm; 0 disables.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Stop after N optimizer steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the lines in file order.
    #[arg(long)]
    no_shuffle: bool,
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Pack several sequences per row (no attention or loss across them).
    #[arg(long)]
    pack: bool,
    /// Recompute each layer's activations in backward to save memory.
    #[arg(long)]
    grad_checkpoint: bool,
    /// f32, or bf16: the frozen base's linear weights kept in bf16 and their matmuls fed
    /// bf16 activations with f32 accumulation (adapters and optimizer state stay f32).
    #[arg(long, default_value = "f32")]
    compute_dtype: ComputeDtype,
    /// Write a checkpoint every N steps.
    #[arg(long)]
    save_every: Option<usize>,
    /// Evaluate every N steps.
    #[arg(long)]
    eval_every: Option<usize>,
    /// Continue a killed run: its --out folder or a checkpoint-N folder. The options, the
    /// model folder and the data's contents must be those the checkpoint was trained with.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// No progress bar or summary.
    #[arg(long)]
    quiet: bool,
    /// Testing: end after N optimizer steps as if killed (no final adapter), to test --resume.
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    #[command(flatten)]
    quant: super::QuantArgs,
    #[command(flatten)]
    adalora: AdaloraArgs,
}

/// `--method adalora`: the rank budget schedule (PEFT's `AdaLoraConfig`; total steps are the
/// run's). `--alpha`, `--targets` and `--dropout` apply as for LoRA; `--rank` is not used.
#[derive(clap::Args)]
struct AdaloraArgs {
    /// AdaLoRA: initial rank of every adapted module (`init_r`).
    #[arg(long, default_value_t = 12)]
    init_rank: usize,
    /// AdaLoRA: target average rank (`target_r`); the final budget is this × modules.
    #[arg(long, default_value_t = 8)]
    target_rank: usize,
    /// AdaLoRA: warmup steps at the full budget.
    #[arg(long, default_value_t = 0)]
    tinit: usize,
    /// AdaLoRA: final steps with the rank pattern frozen.
    #[arg(long, default_value_t = 0)]
    tfinal: usize,
    /// AdaLoRA: steps between two maskings (`deltaT`).
    #[arg(long, default_value_t = 1)]
    delta_t: usize,
    /// AdaLoRA: EMA coefficient of the importance (sensitivity).
    #[arg(long, default_value_t = 0.85)]
    beta1: f64,
    /// AdaLoRA: EMA coefficient of the importance's uncertainty.
    #[arg(long, default_value_t = 0.85)]
    beta2: f64,
    /// AdaLoRA: weight of the orthogonality regularizer added to the loss.
    #[arg(long, default_value_t = 0.5)]
    orth_reg_weight: f64,
}

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

pub fn run(args: Args) -> Result<()> {
    let opts = TrainOptions {
        model: args.model,
        quantize: args.quant.options(),
        compute_dtype: args.compute_dtype,
        adalora: lowrank_train::AdaloraOptions {
            init_rank: args.adalora.init_rank,
            target_rank: args.adalora.target_rank,
            tinit: args.adalora.tinit,
            tfinal: args.adalora.tfinal,
            delta_t: args.adalora.delta_t,
            beta1: args.adalora.beta1,
            beta2: args.adalora.beta2,
            orth_reg_weight: args.adalora.orth_reg_weight,
        },
        data: args.data,
        out: args.out,
        eval_data: args.eval_data,
        eval_split: args.eval_split,
        method: args.method,
        rank: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        targets: args.targets,
        rslora: args.rslora,
        init: args.init,
        init_adapter: args
            .init_adapter
            .as_deref()
            .map(resolve_adapter_dir)
            .transpose()?,
        optimizer: args.optimizer,
        lr: args.lr,
        weight_decay: args.weight_decay,
        betas: args.betas,
        eps: args.eps,
        lr_schedule: args.lr_schedule,
        warmup_steps: args.warmup_steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        max_grad_norm: args.max_grad_norm,
        epochs: args.epochs,
        max_steps: args.max_steps,
        seed: args.seed,
        shuffle: !args.no_shuffle,
        max_len: args.max_len,
        pack: args.pack,
        grad_checkpoint: args.grad_checkpoint,
        save_every: args.save_every,
        eval_every: args.eval_every,
        resume: args.resume,
        quiet: args.quiet,
        stop_after: args.stop_after,
    };
    let comm = communicator()?;
    let report = match lowrank_train::train_with(&opts, &comm) {
        Ok(report) => report,
        // A failing rank ends the whole job: the others may be waiting for it in an all-reduce.
        Err(err) if comm.size() > 1 => {
            eprintln!("error: rank {}: training failed: {err}", comm.rank());
            comm.abort(1)
        }
        Err(err) => return Err(err).context("training failed"),
    };
    if comm.rank() != 0 {
        return Ok(());
    }
    println!(
        "{}",
        serde_json::to_string(&serde_json::json!({
            "steps": report.steps,
            "final_loss": report.final_loss,
            "eval_loss": report.eval_loss,
            "base_eval_loss": report.base_eval_loss,
            "trainable_parameters": report.trainable_parameters,
            "model_parameters": report.model_parameters,
            "peak_rss_mb": report.peak_rss_mb,
            "seconds": report.seconds,
            "out": report.out,
        }))?
    );
    Ok(())
}

/// Built with the `mpi` feature, every `lowrank train` is one rank of an MPI job (one rank of
/// one when started without `mpirun`/`srun`).
#[cfg(feature = "mpi")]
fn communicator() -> Result<lowrank_train::comm::Mpi> {
    let comm = lowrank_train::comm::Mpi::init()?;
    if let (1, Some((var, ranks))) = (comm.size(), launched_ranks()) {
        anyhow::bail!(
            "started as one of {ranks} processes ({var}={ranks}), but MPI sees only this one: \
             the launcher did not connect them (with Slurm, `srun --mpi=pmix` or `--mpi=pmi2`; see `srun --mpi=list`)"
        );
    }
    Ok(comm)
}

/// Without the `mpi` feature: one process, refusing to be one of several ranks of a launcher
/// (they would each train alone and overwrite each other's --out).
#[cfg(not(feature = "mpi"))]
fn communicator() -> Result<lowrank_train::comm::SingleProcess> {
    if let Some((var, ranks)) = launched_ranks() {
        anyhow::bail!(
            "started as one of {ranks} processes ({var}={ranks}), but this lowrank was built without MPI: \
             rebuild with `cargo build --release --features lowrank-cli/mpi` to train data-parallel, or start one process"
        );
    }
    Ok(lowrank_train::comm::SingleProcess)
}

/// The number of processes a launcher started, when more than one: the world sizes set by
/// Open MPI's mpirun, MPICH/Intel MPI (PMI) and Slurm's srun.
fn launched_ranks() -> Option<(&'static str, usize)> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .into_iter()
        .find_map(|var| {
            let ranks = std::env::var(var).ok()?.parse::<usize>().ok()?;
            (ranks > 1).then_some((var, ranks))
        })
}
