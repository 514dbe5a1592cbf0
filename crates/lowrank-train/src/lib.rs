//! lowrank-train: fine-tuning Llama-family models with LoRA, DoRA or all weights ("full"),
//! writing adapters in HF PEFT's format.
//!
//! One module per job: [`data`] (JSONL formats, loss masks, batches), [`optim`] (SGD, AdamW),
//! [`schedule`] (learning-rate schedules), [`init`] (adapter initialisations as PEFT does them),
//! [`options`] (what a run is told and reports), [`trainable`] (the trained tensors and the
//! adapter they make), [`trainer`] (the loop), [`checkpoint`] (checkpoints, resume and the
//! run's identity), [`plot`] (loss.svg), [`memory`] (RSS, estimate),
//! [`adalora`] (AdaLoRA: trainable P·Λ·Q, orthogonality regularizer, rank allocation, rank report),
//! [`comm`] (the communicator of data-parallel training; MPI with the `mpi` feature).

pub mod adalora;
pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod init;
pub mod memory;
pub mod optim;
pub mod options;
pub mod plot;
pub mod schedule;
pub mod trainable;
pub mod trainer;

pub use lowrank_core::{Error, Result};
pub use options::{
    AdaloraOptions, ComputeDtype, Init, Method, OptimizerKind, Schedule, TrainOptions, TrainReport,
};
pub use trainer::{train, train_with};
