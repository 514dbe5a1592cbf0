//! What the demo does: its model, data sizes, training phases, adapters, memory probe and
//! rank sweep ([`DemoConfig::standard`], or [`DemoConfig::quick`] for a micro run).

use lowrank_train::Method;
use serde::{Deserialize, Serialize};

use crate::sweep::RankSweep;
use crate::tasks::Task;
use crate::tiny::TinyConfig;

/// The optimizer settings of one kind of training run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Phase {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub max_len: usize,
}

/// One adapter the demo trains.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AdapterPlan {
    pub task: Task,
    pub method: Method,
    pub rank: usize,
    pub alpha: f64,
}

impl AdapterPlan {
    pub fn label(&self) -> String {
        format!(
            "{} adapter ({} r{})",
            self.task.name(),
            self.method.label(),
            self.rank
        )
    }

    pub fn dir_name(&self) -> String {
        format!(
            "{}-{}",
            self.task.name(),
            self.method.label().to_lowercase()
        )
    }
}

/// The memory-only comparison on a wider model.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MemoryProbe {
    pub model: TinyConfig,
    pub steps: usize,
    pub batch_size: usize,
}

/// Every knob of the demo.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoConfig {
    pub seed: u64,
    pub model: TinyConfig,
    /// Lines of generated text to pretrain on, and held out to measure the pretraining loss.
    pub corpus_lines: usize,
    pub corpus_eval_lines: usize,
    pub pretrain: Phase,
    /// Examples per task to train adapters on, and held out to score every model.
    pub task_train: usize,
    pub task_eval: usize,
    pub adapters: Vec<AdapterPlan>,
    /// Adapter training (the LoRA learning rate).
    pub finetune: Phase,
    /// The task fully fine-tuned, for the cost comparison with its adapter.
    pub full_task: Task,
    /// Full fine-tuning's learning rate (same steps and batches as the adapters).
    pub full_lr: f64,
    /// Adapted modules.
    pub targets: String,
    /// A wider model of the same architecture on which LoRA and full fine-tuning of `full_task`
    /// run a few steps each, only to measure peak memory where the weights, not the
    /// activations, dominate. Runs only when training runs in child processes.
    pub memory_probe: Option<MemoryProbe>,
    /// LoRA adapters of several ranks on one task, scored and analysed (spectrum, φ).
    pub rank_sweep: Option<RankSweep>,
    /// Let the training engine print its own progress.
    pub verbose: bool,
}

impl DemoConfig {
    /// The real demo: a few minutes on two cores.
    pub fn standard() -> Self {
        DemoConfig {
            seed: 0,
            model: TinyConfig {
                hidden_size: 64,
                num_layers: 3,
                num_heads: 4,
                num_kv_heads: 2,
                intermediate_size: 192,
                max_position_embeddings: 64,
            },
            corpus_lines: 20_000,
            corpus_eval_lines: 200,
            pretrain: Phase {
                steps: 1000,
                batch_size: 16,
                lr: 5e-3,
                warmup_steps: 30,
                max_len: 64,
            },
            task_train: 4000,
            task_eval: 200,
            adapters: vec![
                AdapterPlan {
                    task: Task::Reverse,
                    method: Method::Lora,
                    rank: 8,
                    alpha: 16.0,
                },
                AdapterPlan {
                    task: Task::Increment,
                    method: Method::Lora,
                    rank: 8,
                    alpha: 16.0,
                },
                AdapterPlan {
                    task: Task::Caesar,
                    method: Method::Dora,
                    rank: 8,
                    alpha: 16.0,
                },
            ],
            finetune: Phase {
                steps: 800,
                batch_size: 16,
                lr: 5e-3,
                warmup_steps: 20,
                max_len: 32,
            },
            full_task: Task::Reverse,
            full_lr: 3e-3,
            targets: "all-linear".into(),
            memory_probe: Some(MemoryProbe {
                model: TinyConfig {
                    hidden_size: 768,
                    num_layers: 4,
                    num_heads: 12,
                    num_kv_heads: 4,
                    intermediate_size: 2048,
                    max_position_embeddings: 64,
                },
                steps: 2,
                batch_size: 4,
            }),
            rank_sweep: Some(RankSweep {
                task: Task::Caesar,
                ranks: vec![1, 2, 4, 8, 16],
                steps: 300,
                scale: 2.0,
            }),
            verbose: false,
        }
    }

    /// A micro run of the whole pipeline, in seconds (tests, `--quick`): the numbers show the
    /// plumbing works, not that the skills are learnt.
    pub fn quick() -> Self {
        DemoConfig {
            model: TinyConfig {
                hidden_size: 32,
                num_layers: 1,
                num_heads: 2,
                num_kv_heads: 1,
                intermediate_size: 64,
                max_position_embeddings: 64,
            },
            corpus_lines: 400,
            corpus_eval_lines: 20,
            pretrain: Phase {
                steps: 40,
                batch_size: 8,
                lr: 3e-3,
                warmup_steps: 0,
                max_len: 48,
            },
            task_train: 200,
            task_eval: 12,
            finetune: Phase {
                steps: 80,
                batch_size: 8,
                lr: 1e-2,
                warmup_steps: 0,
                max_len: 32,
            },
            memory_probe: Some(MemoryProbe {
                model: TinyConfig {
                    hidden_size: 64,
                    num_layers: 1,
                    num_heads: 2,
                    num_kv_heads: 1,
                    intermediate_size: 128,
                    max_position_embeddings: 64,
                },
                steps: 1,
                batch_size: 2,
            }),
            rank_sweep: Some(RankSweep {
                task: Task::Caesar,
                ranks: vec![1, 2, 4, 8, 16],
                steps: 10,
                scale: 2.0,
            }),
            ..Self::standard()
        }
    }
}
