//! The demo from start to end: data, tokenizer, tiny model, pretraining, adapters, evaluation,
//! report.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{bail, Context, Result};
use candle_core::Device;
use lowrank_core::lora::LoraAdapter;
use lowrank_models::{ActiveAdapter, Llama, Tokenizer};
use lowrank_train::{Method, TrainOptions, TrainReport};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::{self, Runner};
use crate::evaluate::{self, Score};
use crate::report::{
    CostRow, DemoReport, MemoryRow, MergeCheck, ModelRow, ModelSummary, PretrainSummary, Sample,
    TaskSummary,
};
use crate::sweep::{self, RankSweep};
use crate::tasks::{self, Example, Task};
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

    fn dir_name(&self) -> String {
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

/// Phase messages on stderr, with the time since the start.
pub struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress {
            start: Instant::now(),
            quiet,
        }
    }

    pub fn say(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!(
                "[{:>6.1}s] {}",
                self.start.elapsed().as_secs_f64(),
                msg.as_ref()
            );
        }
    }

    pub fn seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// The file that marks a folder as the demo's own, so a rerun may replace what it wrote.
pub const MARKER: &str = ".lowrank-demo";
/// Everything the demo writes in `--out`, besides the marker.
const OWNED: &[&str] = &[
    "data",
    "base",
    "adapters",
    "full",
    "sweep",
    "runs",
    "report.json",
    "report.md",
];

/// Makes `out` ready: creates it, or reuses an earlier demo's folder (replacing only what the
/// demo writes). Refuses a folder holding anything else.
pub fn prepare_out(out: &Path) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            bail!("--out {} exists and is not a folder", out.display());
        }
        let is_empty = std::fs::read_dir(out)?.next().is_none();
        if !is_empty {
            if !out.join(MARKER).exists() {
                bail!(
                    "--out {} already exists and was not written by `lowrank demo`; choose another folder (nothing was changed)",
                    out.display()
                );
            }
            for name in OWNED {
                let p = out.join(name);
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                        .with_context(|| format!("removing {}", p.display()))?;
                } else if p.exists() {
                    std::fs::remove_file(&p)
                        .with_context(|| format!("removing {}", p.display()))?;
                }
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join(MARKER),
        "written by `lowrank demo`; a rerun with this --out replaces the demo's files\n",
    )?;
    Ok(())
}

fn write_jsonl(path: &Path, lines: impl IntoIterator<Item = serde_json::Value>) -> Result<()> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&serde_json::to_string(&line)?);
        text.push('\n');
    }
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn examples_jsonl(examples: &[Example]) -> impl Iterator<Item = serde_json::Value> + '_ {
    examples
        .iter()
        .map(|e| json!({"prompt": e.prompt, "completion": e.completion}))
}

/// Bytes of what an adapter folder ships: its config and weights (not the training logs).
pub fn adapter_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for f in [
        lowrank_core::lora::CONFIG_FILE,
        lowrank_core::lora::WEIGHTS_FILE,
    ] {
        let p = dir.join(f);
        total += std::fs::metadata(&p)
            .with_context(|| format!("reading {}", p.display()))?
            .len();
    }
    Ok(total)
}

/// Runs the demo into `out`: training through `runner`, progress through `progress`.
pub fn run(
    config: &DemoConfig,
    out: &Path,
    runner: &Runner,
    progress: &Progress,
) -> Result<DemoReport> {
    prepare_out(out)?;
    let runs = out.join("runs");
    let data = out.join("data");
    std::fs::create_dir_all(&runs)?;
    std::fs::create_dir_all(&data)?;
    let seed = config.seed;

    // Data.
    progress.say(format!(
        "generating data: {} corpus lines, {} train + {} eval examples for each of {} tasks",
        config.corpus_lines,
        config.task_train,
        config.task_eval,
        Task::SKILLS.len()
    ));
    let corpus = tasks::corpus(config.corpus_lines + config.corpus_eval_lines, seed);
    let (corpus_eval, corpus_train) = corpus.split_at(config.corpus_eval_lines);
    // Text lines end with the EOS token written out (the tokenizer reads it as the special
    // token), so the base model learns where a line, and a `copy:` answer, ends.
    let eos = crate::charset::EOS;
    write_jsonl(
        &data.join("pretrain.jsonl"),
        corpus_train
            .iter()
            .map(|t| json!({"text": format!("{t}{eos}")})),
    )?;
    write_jsonl(
        &data.join("pretrain_eval.jsonl"),
        corpus_eval
            .iter()
            .map(|t| json!({"text": format!("{t}{eos}")})),
    )?;
    let mut splits: BTreeMap<Task, (Vec<Example>, Vec<Example>)> = BTreeMap::new();
    for task in Task::ALL {
        let (train, eval) = task.splits(config.task_train, config.task_eval, seed);
        if task != Task::Copy {
            write_jsonl(
                &data.join(format!("{}_train.jsonl", task.name())),
                examples_jsonl(&train),
            )?;
        }
        write_jsonl(
            &data.join(format!("{}_eval.jsonl", task.name())),
            examples_jsonl(&eval),
        )?;
        splits.insert(task, (train, eval));
    }

    // The tiny model, random, then pretrained.
    let init = runs.join("init-model");
    config.model.write_random(&init, seed)?;
    let parameters = config.model.num_parameters()?;
    let base = out.join("base");
    progress.say(format!(
        "pretraining the base model ({} layers, hidden {}, {} parameters) from random weights: {} steps of full training",
        config.model.num_layers,
        config.model.hidden_size,
        thousands(parameters as u64),
        config.pretrain.steps
    ));
    let p = config.pretrain;
    let pretrain = runner.train(
        &TrainOptions {
            eval_data: Some(data.join("pretrain_eval.jsonl")),
            method: Method::Full,
            targets: config.targets.clone(),
            lr: p.lr,
            warmup_steps: p.warmup_steps,
            batch_size: p.batch_size,
            max_len: p.max_len,
            seed,
            quiet: !config.verbose,
            ..engine::options(&init, &data.join("pretrain.jsonl"), &base, p.steps)
        },
        &runs.join("pretrain.spec.json"),
    )?;
    // The tokenizer travels with the base, whatever the engine copies.
    if !base.join("tokenizer.json").exists() {
        crate::charset::write_tokenizer(&base)?;
    }
    progress.say(format!(
        "  pretraining loss {} (held-out {}) in {:.0}s",
        fmt_loss(pretrain.final_loss),
        pretrain.eval_loss.map_or("n/a".into(), fmt_loss),
        pretrain.seconds
    ));

    // Adapters, and full fine-tuning of one task for the comparison.
    let f = config.finetune;
    let finetune_spec =
        |task: Task, method: Method, rank: usize, alpha: f64, lr: f64, out: PathBuf| TrainOptions {
            method,
            rank,
            alpha,
            targets: config.targets.clone(),
            lr,
            warmup_steps: f.warmup_steps,
            batch_size: f.batch_size,
            max_len: f.max_len,
            seed,
            quiet: !config.verbose,
            ..engine::options(
                &base,
                &data.join(format!("{}_train.jsonl", task.name())),
                &out,
                f.steps,
            )
        };
    let mut trained: Vec<(AdapterPlan, PathBuf, TrainReport)> = Vec::new();
    for plan in &config.adapters {
        let dir = out.join("adapters").join(plan.dir_name());
        progress.say(format!(
            "training the {}: {} steps on {} examples",
            plan.label(),
            f.steps,
            config.task_train
        ));
        let outcome = runner.train(
            &finetune_spec(
                plan.task,
                plan.method,
                plan.rank,
                plan.alpha,
                f.lr,
                dir.clone(),
            ),
            &runs.join(format!("{}.spec.json", plan.dir_name())),
        )?;
        progress.say(format!(
            "  loss {} in {:.0}s",
            fmt_loss(outcome.final_loss),
            outcome.seconds
        ));
        trained.push((*plan, dir, outcome));
    }
    let full_dir = out.join("full").join(config.full_task.name());
    progress.say(format!(
        "full fine-tuning on {} for comparison: same {} steps, every weight trained",
        config.full_task.name(),
        f.steps
    ));
    let full = runner.train(
        &finetune_spec(
            config.full_task,
            Method::Full,
            0,
            0.0,
            config.full_lr,
            full_dir.clone(),
        ),
        &runs.join(format!("full-{}.spec.json", config.full_task.name())),
    )?;
    if !full_dir.join("tokenizer.json").exists() {
        crate::charset::write_tokenizer(&full_dir)?;
    }
    progress.say(format!(
        "  loss {} in {:.0}s",
        fmt_loss(full.final_loss),
        full.seconds
    ));

    // Evaluation.
    progress.say(format!(
        "evaluating base, {} adapters and the fully fine-tuned model on {} held-out prompts per task",
        trained.len(),
        config.task_eval
    ));
    let device = Device::Cpu;
    let tokenizer = Tokenizer::load(&base)?;
    let base_model = Llama::load(&base, &device).context("loading the pretrained base")?;
    let eval_sets: BTreeMap<Task, &[Example]> = splits
        .iter()
        .map(|(t, (_, e))| (*t, e.as_slice()))
        .collect();
    let score_all = |model: &Llama, adapters: &[ActiveAdapter]| -> Result<BTreeMap<Task, Score>> {
        eval_sets
            .iter()
            .map(|(t, ex)| Ok((*t, evaluate::score(model, &tokenizer, adapters, ex)?)))
            .collect()
    };
    let base_scores = score_all(&base_model, &[])?;
    let mut rows = vec![ModelRow::new(
        "base (pretrained, no adapter)",
        None,
        &base_scores,
    )];
    let base_bytes = std::fs::metadata(base.join("model.safetensors"))?.len();
    let mut costs = Vec::new();
    let mut merges = Vec::new();
    let mut own_outputs: BTreeMap<Task, Vec<Vec<u32>>> = BTreeMap::new();
    for (plan, dir, outcome) in &trained {
        let adapter: LoraAdapter = base_model.load_adapter(dir)?;
        let active = [ActiveAdapter::new(&adapter)];
        let scores = score_all(&base_model, &active)?;
        progress.say(format!(
            "  {}: {} on its own task (base {})",
            plan.label(),
            pct(scores[&plan.task].accuracy),
            pct(base_scores[&plan.task].accuracy)
        ));

        // Merged: the same model with ΔW folded into the weights, no adapter at run time.
        let examples = eval_sets[&plan.task];
        let mut merged = base_model.clone();
        merged.merge_adapter("demo", &adapter, 1.0)?;
        let eos = evaluate::eos_id(&tokenizer)?;
        let mut identical = 0;
        let mut ids = Vec::new();
        for (ex, unmerged_out) in examples.iter().zip(&scores[&plan.task].outputs) {
            let (prompt, completion) = evaluate::encode_example(&tokenizer, ex)?;
            let merged_out = evaluate::greedy(&merged, &prompt, &[], completion.len(), eos)?;
            identical += usize::from(&merged_out == unmerged_out);
            ids.push([prompt, completion].concat());
        }
        let max_diff = evaluate::max_logit_diff((&merged, &[]), (&base_model, &active), &ids)?;
        merges.push(MergeCheck {
            adapter: plan.label(),
            prompts: examples.len(),
            greedy_identical: identical,
            max_abs_logit_diff: max_diff,
        });

        let trainable = adapter.num_parameters();
        let bytes = adapter_bytes(dir)?;
        costs.push(CostRow {
            label: plan.label(),
            method: plan.method.label().into(),
            trainable_parameters: trainable,
            share_of_full: trainable as f64 / parameters as f64,
            file_bytes: bytes,
            share_of_base_file: bytes as f64 / base_bytes as f64,
            train_seconds: outcome.seconds,
            final_loss: outcome.final_loss,
            peak_rss_mb: runner.peak_rss_mb(outcome),
        });
        own_outputs.insert(plan.task, scores[&plan.task].outputs.clone());
        rows.push(ModelRow::new(&plan.label(), Some(plan.task), &scores));
    }
    let full_model =
        Llama::load(&full_dir, &device).context("loading the fully fine-tuned model")?;
    let full_scores = score_all(&full_model, &[])?;
    let full_label = format!("full fine-tune on {}", config.full_task.name());
    rows.push(ModelRow::new(
        &full_label,
        Some(config.full_task),
        &full_scores,
    ));
    let full_bytes = std::fs::metadata(full_dir.join("model.safetensors"))?.len();
    costs.push(CostRow {
        label: full_label.clone(),
        method: "full".into(),
        trainable_parameters: parameters,
        share_of_full: 1.0,
        file_bytes: full_bytes,
        share_of_base_file: full_bytes as f64 / base_bytes as f64,
        train_seconds: full.seconds,
        final_loss: full.final_loss,
        peak_rss_mb: runner.peak_rss_mb(&full),
    });
    let full_plan = trained.iter().find(|(p, _, _)| p.task == config.full_task);
    let mut memory = Vec::new();
    if let Some((plan, _, outcome)) = full_plan {
        memory.push(MemoryRow {
            model: "the demo's model (trained above)".into(),
            parameters,
            steps: f.steps,
            batch_size: f.batch_size,
            adapter: format!("{} r{}", plan.method.label(), plan.rank),
            adapter_peak_rss_mb: runner.peak_rss_mb(outcome),
            full_peak_rss_mb: runner.peak_rss_mb(&full),
        });
        if let (Some(probe), Runner::Child { .. }) = (&config.memory_probe, runner) {
            let m = probe.model;
            progress.say(format!(
                "memory probe: {} x {} steps of {} and of full fine-tuning on a random model of the same architecture, hidden {}",
                probe.steps,
                probe.batch_size,
                plan.method.label(),
                m.hidden_size
            ));
            let probe_dir = runs.join("probe-model");
            m.write_random(&probe_dir, seed)?;
            let probe_run = |method: Method, name: &str| {
                let spec = TrainOptions {
                    model: probe_dir.to_string_lossy().into_owned(),
                    max_steps: Some(probe.steps),
                    batch_size: probe.batch_size,
                    warmup_steps: 0,
                    ..finetune_spec(
                        config.full_task,
                        method,
                        plan.rank,
                        plan.alpha,
                        f.lr,
                        runs.join(name),
                    )
                };
                runner.train(&spec, &runs.join(format!("{name}.spec.json")))
            };
            let lora = probe_run(plan.method, "probe-adapter")?;
            let full = probe_run(Method::Full, "probe-full")?;
            // Only the measurements are kept: the probe's weights are large and meaningless.
            for name in ["probe-model", "probe-adapter", "probe-full"] {
                let dir = runs.join(name);
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
            memory.push(MemoryRow {
                model: format!(
                    "same architecture, hidden {}, {} layers (memory only)",
                    m.hidden_size, m.num_layers
                ),
                parameters: m.num_parameters()?,
                steps: probe.steps,
                batch_size: probe.batch_size,
                adapter: format!("{} r{}", plan.method.label(), plan.rank),
                adapter_peak_rss_mb: runner.peak_rss_mb(&lora),
                full_peak_rss_mb: runner.peak_rss_mb(&full),
            });
        }
    }

    let rank_sweep = match &config.rank_sweep {
        Some(plan) => {
            progress.say(format!(
                "rank sweep on {}: LoRA r = {:?}, {} steps each, then the spectrum of every update and φ against r{}",
                plan.task.name(),
                plan.ranks,
                plan.steps,
                plan.ranks.last().copied().unwrap_or(0)
            ));
            let train = |rank: usize, dir: &Path| {
                let name = format!("sweep-{}-r{rank}", plan.task.name());
                let spec = TrainOptions {
                    max_steps: Some(plan.steps),
                    ..finetune_spec(
                        plan.task,
                        Method::Lora,
                        rank,
                        plan.alpha(rank),
                        f.lr,
                        dir.to_path_buf(),
                    )
                };
                runner.train(&spec, &runs.join(format!("{name}.spec.json")))
            };
            let score = |dir: &Path| -> Result<Score> {
                let adapter: LoraAdapter = base_model.load_adapter(dir)?;
                evaluate::score(
                    &base_model,
                    &tokenizer,
                    &[ActiveAdapter::new(&adapter)],
                    eval_sets[&plan.task],
                )
            };
            let report = sweep::run(
                plan,
                &out.join("sweep"),
                out,
                f.batch_size,
                train,
                score,
                progress,
            )?;
            progress.say(format!("  rank sweep done in {:.0}s", report.seconds));
            Some(report)
        }
        None => None,
    };

    // A few generations to look at.
    let decode = |ids: &[u32]| {
        tokenizer
            .decode(ids, true)
            .map_err(crate::error::Error::from)
    };
    let mut samples = Vec::new();
    for task in Task::ALL {
        let Some(outputs) = own_outputs.get(&task) else {
            continue;
        };
        for (i, ex) in eval_sets[&task].iter().take(3).enumerate() {
            samples.push(Sample {
                task: task.name().into(),
                prompt: ex.prompt.clone(),
                expected: ex.completion.clone(),
                base: decode(&base_scores[&task].outputs[i])?,
                adapter: decode(&outputs[i])?,
            });
        }
    }

    let report = DemoReport {
        out: out.to_path_buf(),
        seed,
        seconds: progress.seconds(),
        model: ModelSummary {
            config: config.model,
            vocab_size: crate::charset::vocab_size(),
            parameters,
            file_bytes: base_bytes,
            pretrain: PretrainSummary {
                steps: pretrain.steps,
                batch_size: p.batch_size,
                lines: corpus_train.len(),
                final_loss: pretrain.final_loss,
                eval_loss: pretrain.eval_loss,
                initial_eval_loss: pretrain.base_eval_loss,
                seconds: pretrain.seconds,
                peak_rss_mb: runner.peak_rss_mb(&pretrain),
            },
        },
        tasks: Task::SKILLS
            .iter()
            .map(|t| TaskSummary {
                name: t.name().into(),
                description: t.describe().into(),
                train_examples: splits[t].0.len(),
                eval_examples: splits[t].1.len(),
                example: splits[t].1[0].clone(),
            })
            .collect(),
        finetune_steps: f.steps,
        finetune_batch_size: f.batch_size,
        rows,
        costs,
        memory_task: config.full_task.name().into(),
        memory,
        merges,
        rank_sweep,
        samples,
        config: config.clone(),
    };
    lowrank_core::files::write_json(&out.join("report.json"), &report)?;
    lowrank_core::files::write_atomic(&out.join("report.md"), report.markdown().as_bytes())?;
    Ok(report)
}

pub fn fmt_loss(x: f64) -> String {
    format!("{x:.3}")
}

pub fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
