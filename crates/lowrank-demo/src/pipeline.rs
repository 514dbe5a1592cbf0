//! The demo from start to end: data, tokenizer, tiny model, pretraining, adapters, evaluation,
//! report.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use lowrank_core::lora::LoraAdapter;
use lowrank_models::{ActiveAdapter, Llama, Tokenizer};
use lowrank_train::{Method, TrainOptions, TrainReport};
use serde_json::json;

use crate::config::{AdapterPlan, DemoConfig};
use crate::engine::{self, Runner};
use crate::evaluate::{self, Score};
use crate::progress::Progress;
use crate::report::{
    fmt_loss, pct, thousands, CostRow, DemoReport, MemoryRow, MergeCheck, ModelRow, ModelSummary,
    PretrainSummary, Sample, TaskSummary,
};
use crate::sweep::{self, SweepReport};
use crate::tasks::{self, Example, Task};

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
    let demo = Demo {
        config,
        out,
        runs: out.join("runs"),
        data: out.join("data"),
        base: out.join("base"),
        runner,
        progress,
    };
    std::fs::create_dir_all(&demo.runs)?;
    std::fs::create_dir_all(&demo.data)?;
    let data = demo.write_data()?;
    let pretrain = demo.pretrain()?;
    let adapters = demo.train_adapters()?;
    let full = demo.train_full()?;
    let evaluation = demo.evaluate(&data, &pretrain, &adapters, &full)?;
    let memory = demo.measure_memory(&pretrain, &adapters, &full)?;
    let rank_sweep = demo.rank_sweep(&evaluation)?;
    let samples = evaluation.samples()?;
    let report = DemoReport {
        out: out.to_path_buf(),
        seed: config.seed,
        seconds: progress.seconds(),
        model: ModelSummary {
            config: config.model,
            vocab_size: crate::charset::vocab_size(),
            parameters: pretrain.parameters,
            file_bytes: evaluation.base_bytes,
            pretrain: PretrainSummary {
                steps: pretrain.report.steps,
                batch_size: config.pretrain.batch_size,
                lines: data.corpus_train_lines,
                final_loss: pretrain.report.final_loss,
                eval_loss: pretrain.report.eval_loss,
                initial_eval_loss: pretrain.report.base_eval_loss,
                seconds: pretrain.report.seconds,
                peak_rss_mb: runner.peak_rss_mb(&pretrain.report),
            },
        },
        tasks: Task::SKILLS
            .iter()
            .map(|t| TaskSummary {
                name: t.name().into(),
                description: t.describe().into(),
                train_examples: data.splits[t].0.len(),
                eval_examples: data.splits[t].1.len(),
                example: data.splits[t].1[0].clone(),
            })
            .collect(),
        finetune_steps: config.finetune.steps,
        finetune_batch_size: config.finetune.batch_size,
        rows: evaluation.rows,
        costs: evaluation.costs,
        memory_task: config.full_task.name().into(),
        memory,
        merges: evaluation.merges,
        rank_sweep,
        samples,
        config: config.clone(),
    };
    lowrank_core::files::write_json(&out.join("report.json"), &report)?;
    lowrank_core::files::write_atomic(&out.join("report.md"), report.markdown().as_bytes())?;
    Ok(report)
}

/// The demo's settings and folders, shared by its steps.
struct Demo<'a> {
    config: &'a DemoConfig,
    out: &'a Path,
    /// Spec files, the random models and the memory probe's runs.
    runs: PathBuf,
    data: PathBuf,
    /// The pretrained model.
    base: PathBuf,
    runner: &'a Runner,
    progress: &'a Progress,
}

/// The generated data: how many corpus lines were trained on, and each task's examples.
struct Data {
    corpus_train_lines: usize,
    /// Task → (train, eval) examples.
    splits: BTreeMap<Task, (Vec<Example>, Vec<Example>)>,
}

/// The pretrained base.
struct Pretrained {
    parameters: usize,
    report: TrainReport,
}

/// One trained adapter.
struct TrainedAdapter {
    plan: AdapterPlan,
    dir: PathBuf,
    report: TrainReport,
}

/// The fully fine-tuned model of `full_task`.
struct FullyTuned {
    dir: PathBuf,
    report: TrainReport,
}

/// Every model scored, with what is needed after: the base and tokenizer, the eval sets.
struct Evaluation {
    tokenizer: Tokenizer,
    base_model: Llama,
    eval_sets: BTreeMap<Task, Vec<Example>>,
    base_scores: BTreeMap<Task, Score>,
    /// Each adapter's greedy outputs on its own task.
    own_outputs: BTreeMap<Task, Vec<Vec<u32>>>,
    base_bytes: u64,
    rows: Vec<ModelRow>,
    costs: Vec<CostRow>,
    merges: Vec<MergeCheck>,
}

impl Demo<'_> {
    /// The training options every fine-tuning of the base shares (the adapters', full
    /// fine-tuning's, the probe's and the sweep's).
    fn finetune_options(
        &self,
        task: Task,
        method: Method,
        rank: usize,
        alpha: f64,
        lr: f64,
        out: &Path,
    ) -> TrainOptions {
        let f = self.config.finetune;
        TrainOptions {
            method,
            rank,
            alpha,
            targets: self.config.targets.clone(),
            lr,
            warmup_steps: f.warmup_steps,
            batch_size: f.batch_size,
            max_len: f.max_len,
            seed: self.config.seed,
            quiet: !self.config.verbose,
            ..engine::options(
                &self.base,
                &self.data.join(format!("{}_train.jsonl", task.name())),
                out,
                f.steps,
            )
        }
    }

    /// Trains with `options`, its spec file `runs/NAME.spec.json`.
    fn train(&self, options: &TrainOptions, name: &str) -> Result<TrainReport> {
        self.runner
            .train(options, &self.runs.join(format!("{name}.spec.json")))
    }

    /// Writes the pretraining corpus and every task's examples under `data/`.
    fn write_data(&self) -> Result<Data> {
        let config = self.config;
        let data = &self.data;
        self.progress.say(format!(
            "generating data: {} corpus lines, {} train + {} eval examples for each of {} tasks",
            config.corpus_lines,
            config.task_train,
            config.task_eval,
            Task::SKILLS.len()
        ));
        let corpus = tasks::corpus(config.corpus_lines + config.corpus_eval_lines, config.seed);
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
        let mut splits = BTreeMap::new();
        for task in Task::ALL {
            let (train, eval) = task.splits(config.task_train, config.task_eval, config.seed);
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
        Ok(Data {
            corpus_train_lines: corpus_train.len(),
            splits,
        })
    }

    /// The tiny model, random, then pretrained into `base/`.
    fn pretrain(&self) -> Result<Pretrained> {
        let config = self.config;
        let init = self.runs.join("init-model");
        config.model.write_random(&init, config.seed)?;
        let parameters = config.model.num_parameters()?;
        self.progress.say(format!(
            "pretraining the base model ({} layers, hidden {}, {} parameters) from random weights: {} steps of full training",
            config.model.num_layers,
            config.model.hidden_size,
            thousands(parameters as u64),
            config.pretrain.steps
        ));
        let p = config.pretrain;
        let options = TrainOptions {
            eval_data: Some(self.data.join("pretrain_eval.jsonl")),
            method: Method::Full,
            targets: config.targets.clone(),
            lr: p.lr,
            warmup_steps: p.warmup_steps,
            batch_size: p.batch_size,
            max_len: p.max_len,
            seed: config.seed,
            quiet: !config.verbose,
            ..engine::options(
                &init,
                &self.data.join("pretrain.jsonl"),
                &self.base,
                p.steps,
            )
        };
        let report = self.train(&options, "pretrain")?;
        // The tokenizer travels with the base, whatever the engine copies.
        if !self.base.join("tokenizer.json").exists() {
            crate::charset::write_tokenizer(&self.base)?;
        }
        self.progress.say(format!(
            "  pretraining loss {} (held-out {}) in {:.0}s",
            fmt_loss(report.final_loss),
            report.eval_loss.map_or("n/a".into(), fmt_loss),
            report.seconds
        ));
        Ok(Pretrained { parameters, report })
    }

    /// One adapter per plan, under `adapters/`.
    fn train_adapters(&self) -> Result<Vec<TrainedAdapter>> {
        let f = self.config.finetune;
        let mut trained = Vec::new();
        for plan in &self.config.adapters {
            let dir = self.out.join("adapters").join(plan.dir_name());
            self.progress.say(format!(
                "training the {}: {} steps on {} examples",
                plan.label(),
                f.steps,
                self.config.task_train
            ));
            let options =
                self.finetune_options(plan.task, plan.method, plan.rank, plan.alpha, f.lr, &dir);
            let report = self.train(&options, &plan.dir_name())?;
            self.progress.say(format!(
                "  loss {} in {:.0}s",
                fmt_loss(report.final_loss),
                report.seconds
            ));
            trained.push(TrainedAdapter {
                plan: *plan,
                dir,
                report,
            });
        }
        Ok(trained)
    }

    /// Full fine-tuning of `full_task`, for the comparison, under `full/`.
    fn train_full(&self) -> Result<FullyTuned> {
        let config = self.config;
        let task = config.full_task.name();
        let dir = self.out.join("full").join(task);
        self.progress.say(format!(
            "full fine-tuning on {task} for comparison: same {} steps, every weight trained",
            config.finetune.steps
        ));
        let options =
            self.finetune_options(config.full_task, Method::Full, 0, 0.0, config.full_lr, &dir);
        let report = self.train(&options, &format!("full-{task}"))?;
        if !dir.join("tokenizer.json").exists() {
            crate::charset::write_tokenizer(&dir)?;
        }
        self.progress.say(format!(
            "  loss {} in {:.0}s",
            fmt_loss(report.final_loss),
            report.seconds
        ));
        Ok(FullyTuned { dir, report })
    }

    /// Scores the base, each adapter (unmerged, and merged against unmerged) and the fully
    /// fine-tuned model on every task's held-out prompts; the cost of each.
    fn evaluate(
        &self,
        data: &Data,
        pretrained: &Pretrained,
        adapters: &[TrainedAdapter],
        full: &FullyTuned,
    ) -> Result<Evaluation> {
        let config = self.config;
        self.progress.say(format!(
            "evaluating base, {} adapters and the fully fine-tuned model on {} held-out prompts per task",
            adapters.len(),
            config.task_eval
        ));
        let device = Device::Cpu;
        let tokenizer = Tokenizer::load(&self.base)?;
        let base_model = Llama::load(&self.base, &device).context("loading the pretrained base")?;
        let eval_sets: BTreeMap<Task, Vec<Example>> = data
            .splits
            .iter()
            .map(|(t, (_, e))| (*t, e.clone()))
            .collect();
        let base_scores = score_all(&base_model, &tokenizer, &eval_sets, &[])?;
        let base_bytes = std::fs::metadata(self.base.join("model.safetensors"))?.len();
        let mut evaluation = Evaluation {
            rows: vec![ModelRow::new(
                "base (pretrained, no adapter)",
                None,
                &base_scores,
            )],
            tokenizer,
            base_model,
            eval_sets,
            base_scores,
            own_outputs: BTreeMap::new(),
            base_bytes,
            costs: Vec::new(),
            merges: Vec::new(),
        };
        for trained in adapters {
            evaluation.add_adapter(trained, pretrained.parameters, self.runner, self.progress)?;
        }
        let full_model =
            Llama::load(&full.dir, &device).context("loading the fully fine-tuned model")?;
        let full_scores = score_all(
            &full_model,
            &evaluation.tokenizer,
            &evaluation.eval_sets,
            &[],
        )?;
        let full_label = format!("full fine-tune on {}", config.full_task.name());
        evaluation.rows.push(ModelRow::new(
            &full_label,
            Some(config.full_task),
            &full_scores,
        ));
        let full_bytes = std::fs::metadata(full.dir.join("model.safetensors"))?.len();
        evaluation.costs.push(CostRow {
            label: full_label,
            method: "full".into(),
            trainable_parameters: pretrained.parameters,
            share_of_full: 1.0,
            file_bytes: full_bytes,
            share_of_base_file: full_bytes as f64 / base_bytes as f64,
            train_seconds: full.report.seconds,
            final_loss: full.report.final_loss,
            peak_rss_mb: self.runner.peak_rss_mb(&full.report),
        });
        Ok(evaluation)
    }

    /// Peak memory of the adapter of `full_task` against full fine-tuning: on the demo's
    /// model, and (in child processes only) on the wider probe model.
    fn measure_memory(
        &self,
        pretrained: &Pretrained,
        adapters: &[TrainedAdapter],
        full: &FullyTuned,
    ) -> Result<Vec<MemoryRow>> {
        let config = self.config;
        let f = config.finetune;
        let Some(adapter) = adapters.iter().find(|a| a.plan.task == config.full_task) else {
            return Ok(Vec::new());
        };
        let plan = adapter.plan;
        let mut memory = vec![MemoryRow {
            model: "the demo's model (trained above)".into(),
            parameters: pretrained.parameters,
            steps: f.steps,
            batch_size: f.batch_size,
            adapter: format!("{} r{}", plan.method.label(), plan.rank),
            adapter_peak_rss_mb: self.runner.peak_rss_mb(&adapter.report),
            full_peak_rss_mb: self.runner.peak_rss_mb(&full.report),
        }];
        let Some(probe) = config
            .memory_probe
            .filter(|_| self.runner.measures_memory())
        else {
            return Ok(memory);
        };
        let m = probe.model;
        self.progress.say(format!(
            "memory probe: {} x {} steps of {} and of full fine-tuning on a random model of the same architecture, hidden {}",
            probe.steps,
            probe.batch_size,
            plan.method.label(),
            m.hidden_size
        ));
        let probe_dir = self.runs.join("probe-model");
        m.write_random(&probe_dir, config.seed)?;
        let probe_run = |method: Method, name: &str| {
            let options = TrainOptions {
                model: probe_dir.to_string_lossy().into_owned(),
                max_steps: Some(probe.steps),
                batch_size: probe.batch_size,
                warmup_steps: 0,
                ..self.finetune_options(
                    config.full_task,
                    method,
                    plan.rank,
                    plan.alpha,
                    f.lr,
                    &self.runs.join(name),
                )
            };
            self.train(&options, name)
        };
        let lora = probe_run(plan.method, "probe-adapter")?;
        let full = probe_run(Method::Full, "probe-full")?;
        // Only the measurements are kept: the probe's weights are large and meaningless.
        for name in ["probe-model", "probe-adapter", "probe-full"] {
            let dir = self.runs.join(name);
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
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
            adapter_peak_rss_mb: self.runner.peak_rss_mb(&lora),
            full_peak_rss_mb: self.runner.peak_rss_mb(&full),
        });
        Ok(memory)
    }

    /// LoRA adapters of several ranks on one task, scored and analysed (`sweep/`).
    fn rank_sweep(&self, evaluation: &Evaluation) -> Result<Option<SweepReport>> {
        let Some(plan) = &self.config.rank_sweep else {
            return Ok(None);
        };
        let f = self.config.finetune;
        self.progress.say(format!(
            "rank sweep on {}: LoRA r = {:?}, {} steps each, then the spectrum of every update and φ against r{}",
            plan.task.name(),
            plan.ranks,
            plan.steps,
            plan.ranks.last().copied().unwrap_or(0)
        ));
        let train = |rank: usize, dir: &Path| {
            let options = TrainOptions {
                max_steps: Some(plan.steps),
                ..self.finetune_options(plan.task, Method::Lora, rank, plan.alpha(rank), f.lr, dir)
            };
            self.train(&options, &format!("sweep-{}-r{rank}", plan.task.name()))
        };
        let score = |dir: &Path| -> Result<Score> {
            let model = &evaluation.base_model;
            let adapter: LoraAdapter = model.load_adapter(dir)?;
            evaluate::score(
                model,
                &evaluation.tokenizer,
                &[ActiveAdapter::new(&adapter)],
                &evaluation.eval_sets[&plan.task],
            )
        };
        let report = sweep::run(
            plan,
            &self.out.join("sweep"),
            self.out,
            f.batch_size,
            train,
            score,
            self.progress,
        )?;
        self.progress
            .say(format!("  rank sweep done in {:.0}s", report.seconds));
        Ok(Some(report))
    }
}

/// Scores a model (with `adapters`) on every task's eval set.
fn score_all(
    model: &Llama,
    tokenizer: &Tokenizer,
    eval_sets: &BTreeMap<Task, Vec<Example>>,
    adapters: &[ActiveAdapter],
) -> Result<BTreeMap<Task, Score>> {
    eval_sets
        .iter()
        .map(|(t, ex)| Ok((*t, evaluate::score(model, tokenizer, adapters, ex)?)))
        .collect()
}

impl Evaluation {
    /// Scores one adapter on every task, checks it merged against unmerged on its own task,
    /// and notes its cost.
    fn add_adapter(
        &mut self,
        trained: &TrainedAdapter,
        parameters: usize,
        runner: &Runner,
        progress: &Progress,
    ) -> Result<()> {
        let TrainedAdapter { plan, dir, report } = trained;
        let adapter: LoraAdapter = self.base_model.load_adapter(dir)?;
        let active = [ActiveAdapter::new(&adapter)];
        let scores = score_all(&self.base_model, &self.tokenizer, &self.eval_sets, &active)?;
        progress.say(format!(
            "  {}: {} on its own task (base {})",
            plan.label(),
            pct(scores[&plan.task].accuracy),
            pct(self.base_scores[&plan.task].accuracy)
        ));
        self.merges
            .push(self.merge_check(plan, &adapter, &scores[&plan.task].outputs)?);
        let trainable = adapter.num_parameters();
        let bytes = adapter_bytes(dir)?;
        self.costs.push(CostRow {
            label: plan.label(),
            method: plan.method.label().into(),
            trainable_parameters: trainable,
            share_of_full: trainable as f64 / parameters as f64,
            file_bytes: bytes,
            share_of_base_file: bytes as f64 / self.base_bytes as f64,
            train_seconds: report.seconds,
            final_loss: report.final_loss,
            peak_rss_mb: runner.peak_rss_mb(report),
        });
        self.own_outputs
            .insert(plan.task, scores[&plan.task].outputs.clone());
        self.rows
            .push(ModelRow::new(&plan.label(), Some(plan.task), &scores));
        Ok(())
    }

    /// The same model with ΔW folded into the weights, no adapter at run time, against the
    /// adapter applied unmerged (`unmerged_outputs`, its greedy outputs on its task).
    fn merge_check(
        &self,
        plan: &AdapterPlan,
        adapter: &LoraAdapter,
        unmerged_outputs: &[Vec<u32>],
    ) -> Result<MergeCheck> {
        let examples = &self.eval_sets[&plan.task];
        let mut merged = self.base_model.clone();
        merged.merge_adapter("demo", adapter, 1.0)?;
        let eos = evaluate::eos_id(&self.tokenizer)?;
        let mut identical = 0;
        let mut ids = Vec::new();
        for (ex, unmerged_out) in examples.iter().zip(unmerged_outputs) {
            let (prompt, completion) = evaluate::encode_example(&self.tokenizer, ex)?;
            let merged_out = evaluate::greedy(&merged, &prompt, &[], completion.len(), eos)?;
            identical += usize::from(&merged_out == unmerged_out);
            ids.push([prompt, completion].concat());
        }
        let active = [ActiveAdapter::new(adapter)];
        let max_diff = evaluate::max_logit_diff((&merged, &[]), (&self.base_model, &active), &ids)?;
        Ok(MergeCheck {
            adapter: plan.label(),
            prompts: examples.len(),
            greedy_identical: identical,
            max_abs_logit_diff: max_diff,
        })
    }

    /// A few generations to look at: the first three prompts of each adapter's task, base
    /// against adapter.
    fn samples(&self) -> Result<Vec<Sample>> {
        let decode = |ids: &[u32]| {
            self.tokenizer
                .decode(ids, true)
                .map_err(anyhow::Error::from)
        };
        let mut samples = Vec::new();
        for task in Task::ALL {
            let Some(outputs) = self.own_outputs.get(&task) else {
                continue;
            };
            for (i, ex) in self.eval_sets[&task].iter().take(3).enumerate() {
                samples.push(Sample {
                    task: task.name().into(),
                    prompt: ex.prompt.clone(),
                    expected: ex.completion.clone(),
                    base: decode(&self.base_scores[&task].outputs[i])?,
                    adapter: decode(&outputs[i])?,
                });
            }
        }
        Ok(samples)
    }
}
