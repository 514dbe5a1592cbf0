//! `lowrank train`: fine-tune with LoRA, DoRA or all weights; the flags are
//! `lowrank_train::TrainOptions`'s own, plus the `--quantize` flags other commands share. Built with the `mpi` feature, each process is one rank of
//! the MPI job it was started in (`mpirun`, `srun`), training data-parallel.

use anyhow::{Context, Result};
use lowrank_models::hub::resolve_adapter_dir;
use lowrank_train::comm::Communicator;
use lowrank_train::TrainOptions;

#[derive(clap::Args)]
#[cfg_attr(
    feature = "mpi",
    command(
        after_help = "Data parallel: `mpirun -np N lowrank train ...` (or Slurm's `srun`) trains on N processes; --batch-size × --grad-accum stays the whole step's batch. Rank 0 writes --out."
    )
)]
pub struct Args {
    #[command(flatten)]
    options: TrainOptions,
    #[command(flatten)]
    quant: super::QuantArgs,
}

pub fn run(args: Args) -> Result<()> {
    let mut opts = args.options;
    opts.quantize = args.quant.spec()?;
    opts.init_adapter = opts
        .init_adapter
        .as_deref()
        .map(resolve_adapter_dir)
        .transpose()?;
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
