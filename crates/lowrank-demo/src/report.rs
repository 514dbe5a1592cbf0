//! What the demo found, as data (`report.json`), a terminal table and Markdown (`report.md`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::config::DemoConfig;
use crate::evaluate::Score;
use crate::sweep::SweepReport;
use crate::tasks::{Example, Task};
use crate::tiny::TinyConfig;

#[derive(Debug, Clone, Serialize)]
pub struct PretrainSummary {
    pub steps: usize,
    pub batch_size: usize,
    pub lines: usize,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    /// Held-out loss of the random model before pretraining, when the engine reports it.
    pub initial_eval_loss: Option<f64>,
    pub seconds: f64,
    pub peak_rss_mb: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub config: TinyConfig,
    pub vocab_size: usize,
    pub parameters: usize,
    /// Size of model.safetensors.
    pub file_bytes: u64,
    pub pretrain: PretrainSummary,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskSummary {
    pub name: String,
    pub description: String,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub example: Example,
}

/// One model's scores on every task.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRow {
    pub label: String,
    /// The task it was trained on (none for the base).
    pub trained_on: Option<Task>,
    pub scores: BTreeMap<Task, Score>,
}

impl ModelRow {
    pub fn new(label: &str, trained_on: Option<Task>, scores: &BTreeMap<Task, Score>) -> Self {
        ModelRow {
            label: label.into(),
            trained_on,
            scores: scores.clone(),
        }
    }
}

/// What one way of teaching a skill cost.
#[derive(Debug, Clone, Serialize)]
pub struct CostRow {
    pub label: String,
    pub method: String,
    pub trainable_parameters: usize,
    /// trainable / the model's parameters.
    pub share_of_full: f64,
    /// Bytes written: the adapter folder, or the full checkpoint's weights.
    pub file_bytes: u64,
    pub share_of_base_file: f64,
    pub train_seconds: f64,
    pub final_loss: f64,
    pub peak_rss_mb: Option<f64>,
}

/// Peak memory of LoRA and of full fine-tuning on the same task and model, each measured in its
/// own process.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    pub model: String,
    pub parameters: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub adapter: String,
    pub adapter_peak_rss_mb: Option<f64>,
    pub full_peak_rss_mb: Option<f64>,
}

/// The adapter folded into the weights against applied on the fly.
#[derive(Debug, Clone, Serialize)]
pub struct MergeCheck {
    pub adapter: String,
    pub prompts: usize,
    pub greedy_identical: usize,
    pub max_abs_logit_diff: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub task: String,
    pub prompt: String,
    pub expected: String,
    pub base: String,
    pub adapter: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub out: PathBuf,
    pub seed: u64,
    pub seconds: f64,
    pub model: ModelSummary,
    pub tasks: Vec<TaskSummary>,
    pub finetune_steps: usize,
    pub finetune_batch_size: usize,
    pub rows: Vec<ModelRow>,
    pub costs: Vec<CostRow>,
    /// Peak memory, LoRA vs full, on `memory_task`.
    pub memory_task: String,
    pub memory: Vec<MemoryRow>,
    pub merges: Vec<MergeCheck>,
    /// LoRA at several ranks on one task, with the analysis of each update.
    pub rank_sweep: Option<SweepReport>,
    pub samples: Vec<Sample>,
    pub config: DemoConfig,
}

/// A table rendered as aligned text or as Markdown.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: vec![],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn text(&self) -> String {
        let widths: Vec<usize> = (0..self.header.len())
            .map(|c| {
                std::iter::once(&self.header)
                    .chain(&self.rows)
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &Vec<String>| {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(c, s)| {
                    if c == 0 {
                        format!("{s:<w$}", w = widths[c])
                    } else {
                        format!("{s:>w$}", w = widths[c])
                    }
                })
                .collect();
            format!("  {}\n", parts.join("   ").trim_end())
        };
        let mut out = line(&self.header);
        out.push_str(&format!(
            "  {}\n",
            "-".repeat(widths.iter().sum::<usize>() + 3 * (widths.len() - 1))
        ));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }

    fn markdown(&self) -> String {
        let esc = |s: &String| s.replace('|', "\\|");
        let mut out = format!(
            "| {} |\n",
            self.header.iter().map(esc).collect::<Vec<_>>().join(" | ")
        );
        let align: Vec<&str> = (0..self.header.len())
            .map(|c| if c == 0 { "---" } else { "---:" })
            .collect();
        out.push_str(&format!("| {} |\n", align.join(" | ")));
        for r in &self.rows {
            out.push_str(&format!(
                "| {} |\n",
                r.iter().map(esc).collect::<Vec<_>>().join(" | ")
            ));
        }
        out
    }
}

fn mib(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

fn rss(mb: Option<f64>) -> String {
    mb.map_or("n/a".into(), |m| format!("{m:.0} MiB"))
}

/// A string shown in quotes, so leading spaces are visible.
fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

impl DemoReport {
    fn skills_table(&self) -> Table {
        let mut header = vec!["model".to_string()];
        header.extend(Task::ALL.iter().map(|t| format!("{} acc / loss", t.name())));
        let mut table = Table {
            header,
            rows: vec![],
        };
        for row in &self.rows {
            let mut cells = vec![row.label.clone()];
            for task in Task::ALL {
                let cell = match row.scores.get(&task) {
                    Some(s) => {
                        let mark = if row.trained_on == Some(task) {
                            "*"
                        } else {
                            " "
                        };
                        format!("{}{} / {}", mark, pct(s.accuracy), fmt_loss(s.loss))
                    }
                    None => "-".into(),
                };
                cells.push(cell);
            }
            table.row(cells);
        }
        table
    }

    fn cost_table(&self) -> Table {
        let mut t = Table::new(&[
            "how the skill was taught",
            "trainable params",
            "of the model",
            "file size",
            "of the base",
            "train time",
            "peak RSS",
        ]);
        for c in &self.costs {
            t.row(vec![
                c.label.clone(),
                thousands(c.trainable_parameters as u64),
                format!("{:.2}%", 100.0 * c.share_of_full),
                mib(c.file_bytes),
                format!("{:.1}%", 100.0 * c.share_of_base_file),
                format!("{:.0}s", c.train_seconds),
                rss(c.peak_rss_mb),
            ]);
        }
        t
    }

    fn merge_table(&self) -> Table {
        let mut t = Table::new(&["adapter", "max |logit diff|", "greedy outputs identical"]);
        for m in &self.merges {
            t.row(vec![
                m.adapter.clone(),
                format!("{:.2e}", m.max_abs_logit_diff),
                format!("{}/{}", m.greedy_identical, m.prompts),
            ]);
        }
        t
    }

    fn sample_table(&self) -> Table {
        let mut t = Table::new(&["prompt", "expected", "base says", "adapter says"]);
        for s in &self.samples {
            t.row(vec![
                quoted(&s.prompt),
                quoted(&s.expected),
                quoted(&s.base),
                quoted(&s.adapter),
            ]);
        }
        t
    }

    fn intro(&self) -> Vec<String> {
        let m = &self.model;
        let c = &m.config;
        let p = &m.pretrain;
        let pre_eval = match (p.initial_eval_loss, p.eval_loss) {
            (Some(a), Some(b)) => format!(", held-out loss {} -> {}", fmt_loss(a), fmt_loss(b)),
            (None, Some(b)) => format!(", held-out loss {}", fmt_loss(b)),
            _ => String::new(),
        };
        let mut lines = vec![
            format!(
                "Base model: Llama architecture, {} layers, hidden {}, {} heads ({} key/value), MLP {}, character vocabulary of {}: {} parameters, {}.",
                c.num_layers,
                c.hidden_size,
                c.num_heads,
                c.num_kv_heads,
                c.intermediate_size,
                m.vocab_size,
                thousands(m.parameters as u64),
                mib(m.file_bytes)
            ),
            format!(
                "Pretrained from random weights on {} generated lines (sentences and `copy: x = x`): {} steps x {}, final loss {}{}, {:.0}s.",
                thousands(p.lines as u64),
                p.steps,
                p.batch_size,
                fmt_loss(p.final_loss),
                pre_eval,
                p.seconds
            ),
            format!(
                "Skills (never in the pretraining data), each taught by one adapter in {} steps x {} on its own examples:",
                self.finetune_steps, self.finetune_batch_size
            ),
        ];
        for t in &self.tasks {
            lines.push(format!(
                "  {:<8} {:<24} e.g. {} -> {}   ({} train / {} held-out)",
                t.name,
                t.description,
                quoted(&t.example.prompt),
                quoted(&t.example.completion),
                t.train_examples,
                t.eval_examples
            ));
        }
        lines
    }

    fn memory_table(&self) -> Option<Table> {
        if self
            .memory
            .iter()
            .all(|m| m.adapter_peak_rss_mb.is_none() || m.full_peak_rss_mb.is_none())
        {
            return None;
        }
        let mut t = Table::new(&[
            "model",
            "parameters",
            "steps x batch",
            "adapter",
            "adapter peak",
            "full peak",
            "adapter vs full",
        ]);
        for m in &self.memory {
            let saved = match (m.adapter_peak_rss_mb, m.full_peak_rss_mb) {
                (Some(a), Some(f)) if a <= f => format!("{:.0}% less", 100.0 * (1.0 - a / f)),
                (Some(a), Some(f)) => format!("{:.0}% more", 100.0 * (a / f - 1.0)),
                _ => "n/a".into(),
            };
            t.row(vec![
                m.model.clone(),
                thousands(m.parameters as u64),
                format!("{} x {}", m.steps, m.batch_size),
                m.adapter.clone(),
                rss(m.adapter_peak_rss_mb),
                rss(m.full_peak_rss_mb),
                saved,
            ]);
        }
        Some(t)
    }

    fn sweep_table(sweep: &SweepReport) -> Table {
        let largest = sweep.rows.last().map_or(0, |r| r.rank);
        let mut t = Table::new(&[
            "rank",
            "params",
            "train time",
            "acc / loss",
            "eff. rank",
            "rank for 90%",
            "suggested",
            &format!("φ(r,{largest}) input side"),
            &format!("φ(r,{largest}) output side"),
        ]);
        for r in &sweep.rows {
            let is_reference = r.rank == largest;
            let phi = |side: &crate::sweep::PhiVsLargest| {
                if is_reference {
                    "-".to_string()
                } else {
                    format!(
                        "{:.2} (chance {:.2})",
                        side.whole_subspace, side.random_whole_subspace
                    )
                }
            };
            t.row(vec![
                format!("LoRA r{}", r.rank),
                thousands(r.trainable_parameters as u64),
                format!("{:.0}s", r.train_seconds),
                format!("{} / {}", pct(r.accuracy), fmt_loss(r.loss)),
                format!("{:.2}", r.mean_effective_rank),
                format!("{:.2}", r.mean_rank_for_90_percent),
                r.suggested_rank.map_or("-".into(), |s| format!("r{s}")),
                phi(&r.input_space),
                phi(&r.output_space),
            ]);
        }
        t
    }

    fn sweep_intro(sweep: &SweepReport) -> String {
        let largest = sweep.rows.last().map_or(0, |r| r.rank);
        format!(
            "Rank sweep on {}: one LoRA adapter per rank (α = 2r: the same scale at every rank), {} steps x {}, scored on {} held-out prompts. \
Each update ΔW = s·B·A analysed as `lowrank analyze` does, means over its {} modules: effective rank (exp of the entropy of σᵢ/Σσ), \
the rank keeping 90% of ‖ΔW‖²_F, the suggested --rank, and the subspace similarity φ(r, {largest}) = ‖UᵣᵀU'_{largest}‖²/r with the r{largest} adapter's \
singular vectors, input side (right, as Hu et al.) and output side (left): 1 = inside it, chance = random subspaces. {:.0}s in all:",
            sweep.task.name(),
            sweep.steps,
            sweep.batch_size,
            sweep.eval_examples,
            sweep.modules,
            sweep.seconds
        )
    }

    fn memory_intro(&self) -> String {
        format!(
            "Peak memory (resident set, VmHWM) of LoRA vs full fine-tuning on the {} task, each run in its own process:",
            self.memory_task
        )
    }

    const MEMORY_NOTE: &'static str = "Full fine-tuning keeps a gradient and two AdamW moments for every weight, LoRA only for the adapter. \
At the demo's size the weights are a sliver of the process, so the adapter's own activations can outweigh that; \
the wider model shows where the saving goes as weights grow.";

    const MEMORY_NOT_MEASURED: &'static str =
        "Peak memory: not measured (training ran in this process; `lowrank demo` runs each training in its own process to measure it).";

    /// The report as printed on the terminal.
    pub fn text(&self) -> String {
        let mut out = String::from(
            "\n== lowrank demo: one tiny base model, a new skill per LoRA/DoRA adapter ==\n\n",
        );
        for l in self.intro() {
            out.push_str(&l);
            out.push('\n');
        }
        let n = self.tasks.first().map_or(0, |t| t.eval_examples);
        out.push_str(&format!(
            "\nExact-match accuracy of greedy generation / loss per answer token, {n} held-out prompts per task (* = the adapter's own task):\n"
        ));
        out.push_str(&self.skills_table().text());
        out.push_str("\nWhat each costs (full fine-tuning trains and saves every weight):\n");
        out.push_str(&self.cost_table().text());
        match self.memory_table() {
            Some(t) => {
                out.push_str(&format!("\n{}\n", self.memory_intro()));
                out.push_str(&t.text());
                out.push_str(&format!("{}\n", Self::MEMORY_NOTE));
            }
            None => out.push_str(&format!("\n{}\n", Self::MEMORY_NOT_MEASURED)),
        }
        out.push_str("\nMerged (adapter folded into the weights) vs unmerged (applied on the fly), on each adapter's held-out prompts:\n");
        out.push_str(&self.merge_table().text());
        if let Some(sweep) = &self.rank_sweep {
            out.push_str(&format!("\n{}\n", Self::sweep_intro(sweep)));
            out.push_str(&Self::sweep_table(sweep).text());
            if !sweep.figures.is_empty() {
                out.push_str(&format!("Figures: {}\n", sweep.figures.join(", ")));
            }
        }
        out.push_str("\nSamples (greedy):\n");
        out.push_str(&self.sample_table().text());
        out.push_str(&format!(
            "\nWritten to {}: base/ (HF checkpoint), adapters/ (PEFT), full/, sweep/ (the rank sweep's adapters and figures), data/, report.json, report.md. Total {:.0}s.\n",
            self.out.display(),
            self.seconds
        ));
        out
    }

    /// The report as `report.md`.
    pub fn markdown(&self) -> String {
        let mut out = String::from("# lowrank demo\n\n");
        for l in self.intro() {
            if let Some(rest) = l.strip_prefix("  ") {
                out.push_str(&format!("- {rest}\n"));
            } else {
                out.push_str(&format!("{l}\n\n"));
            }
        }
        let n = self.tasks.first().map_or(0, |t| t.eval_examples);
        out.push_str(&format!(
            "\n## Skills\n\nExact-match accuracy of greedy generation / loss per answer token, {n} held-out prompts per task (* = the adapter's own task).\n\n"
        ));
        out.push_str(&self.skills_table().markdown());
        out.push_str("\n## Cost\n\n");
        out.push_str(&self.cost_table().markdown());
        match self.memory_table() {
            Some(t) => {
                out.push_str(&format!("\n## Memory\n\n{}\n\n", self.memory_intro()));
                out.push_str(&t.markdown());
                out.push_str(&format!("\n{}\n", Self::MEMORY_NOTE));
            }
            None => out.push_str(&format!("\n{}\n", Self::MEMORY_NOT_MEASURED)),
        }
        out.push_str("\n## Merged vs unmerged\n\n");
        out.push_str(&self.merge_table().markdown());
        if let Some(sweep) = &self.rank_sweep {
            out.push_str(&format!(
                "\n## Rank sweep\n\n{}\n\n",
                Self::sweep_intro(sweep)
            ));
            out.push_str(&Self::sweep_table(sweep).markdown());
            for figure in &sweep.figures {
                out.push_str(&format!("\n![{figure}]({figure})\n"));
            }
        }
        out.push_str("\n## Samples\n\n");
        out.push_str(&self.sample_table().markdown());
        out.push_str(&format!(
            "\nTotal time {:.0}s, seed {}.\n",
            self.seconds, self.seed
        ));
        out
    }
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
