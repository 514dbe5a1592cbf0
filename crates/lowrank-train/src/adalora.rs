//! `--method adalora`: PEFT's AdaLoRA training (tuners/adalora).
//!
//! Trainable `Var`s are each module's A (Q, r×in), E (Λ, r×1) and B (P, out×r) under PEFT's
//! key names. Every step the forward uses a `LoraModule` with a = A ⊙ E computed from the
//! `Var`s, so autograd reaches all three. The orthogonality regularizer is added to the loss
//! (once per optimizer step) and the logged `loss` includes it, as PEFT's `AdaLoraModel.forward`
//! adds it to `outputs.loss`; `nll` and `orth_reg` are logged beside it. After each optimizer
//! step, with that step's (clipped) gradients, the [`RankAllocator`] updates the importance
//! and masks E entries to the budget (PEFT's `update_and_allocate`).
//!
//! At the end the adapter is saved as PEFT does (`rank_pattern`, tensors cut to the kept
//! rank), and the final ranks go to `adalora_ranks.json`, `adalora_ranks.svg` and stderr.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use lowrank_core::adalora::{
    orth_regularizer, AdaloraAdapter, AdaloraConfig, AdaloraModule, Allocation, BudgetSchedule,
    ModuleGrads, RankAllocator,
};
use lowrank_core::lora::{LoraAdapter, ALL_LINEAR, PEFT_PREFIX};
use lowrank_core::targets::layer_index;
use lowrank_core::{Error, Result};
use lowrank_models::Llama;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::options::{bad, parse_targets};
use crate::{Init, TrainOptions};

pub const RANKS_FILE: &str = "adalora_ranks.json";
pub const RANKS_PLOT_FILE: &str = "adalora_ranks.svg";
const STATE_TENSORS: &str = "adalora_state.safetensors";
const STATE_JSON: &str = "adalora_state.json";

/// The AdaLoRA part of a training run.
pub struct AdaloraTraining {
    /// The adapter's config (its `rank_pattern` stays `None`: the allocator holds the pattern).
    pub config: AdaloraConfig,
    /// Module name → indices of its A, E, B in the run's trainable `Var`s.
    pub modules: Vec<(String, [usize; 3])>,
    /// Set by [`AdaloraTraining::start`] once the total step count is known.
    pub allocator: Option<RankAllocator>,
    /// What the last step's allocation decided (for the log).
    pub last: Option<Allocation>,
}

fn normal_tensor(rng: &mut StdRng, shape: (usize, usize), std: f64) -> Result<Tensor> {
    let data = crate::init::normal(rng, shape.0 * shape.1, std);
    Ok(Tensor::from_vec(data, shape, &candle_core::Device::Cpu)?)
}

/// The trainable adapter: fresh (E = 0, A and B ~ N(0, 0.02), PEFT's `reset_lora_parameters`)
/// or continued from a PEFT AdaLoRA folder (`--init-adapter`, full rank): the `Var`s' names,
/// the `Var`s, and the bookkeeping over them.
pub fn setup_trainable(
    model: &Llama,
    o: &TrainOptions,
) -> Result<(Vec<String>, Vec<Var>, AdaloraTraining)> {
    let ao = &o.adalora;
    if matches!(o.init, Init::Pissa | Init::Olora | Init::Gaussian) {
        return Err(bad(
            "init",
            "AdaLoRA has its own initialisation (E = 0, A and B ~ N(0, 0.02)); drop --init",
        ));
    }
    let (config, modules) = match &o.init_adapter {
        Some(dir) => {
            if !lowrank_core::adalora::is_adalora_dir(dir) {
                return Err(Error::file(
                    dir,
                    "--method adalora continues only an AdaLoRA adapter (peft_type \"ADALORA\")",
                ));
            }
            let adapter = AdaloraAdapter::load(dir, &model.linears(), model.device())?;
            let mut config = adapter.config;
            let init_r = config.schedule.init_r;
            if let Some((name, m)) = adapter.modules.iter().find(|(_, m)| m.rank() != init_r) {
                return Err(Error::file(
                    dir,
                    format!(
                        "module {name:?} is cut to rank {} of {init_r} (a finished AdaLoRA adapter); training continues only from a full-rank one",
                        m.rank()
                    ),
                ));
            }
            // The schedule is this run's; the rank and α (the scale) are the adapter's.
            config.schedule = ao.schedule(init_r);
            config.rank_pattern = None;
            (config, adapter.modules)
        }
        None => {
            let schedule = ao.schedule(ao.init_rank);
            let mut config = AdaloraConfig::new(schedule, o.alpha, parse_targets(&o.targets)?);
            config.dropout = o.dropout;
            config.base_model = Some(o.model.clone());
            let mut rng = StdRng::seed_from_u64(o.seed);
            let mut modules = BTreeMap::new();
            let r = ao.init_rank;
            for linear in model.linears() {
                if !config.targets_module(&linear.name) {
                    continue;
                }
                let a = normal_tensor(&mut rng, (r, linear.in_features), 0.02)?;
                let b = normal_tensor(&mut rng, (linear.out_features, r), 0.02)?;
                let e = Tensor::zeros((r, 1), DType::F32, &candle_core::Device::Cpu)?;
                modules.insert(linear.name.clone(), AdaloraModule { a, e, b });
            }
            if modules.is_empty() {
                return Err(bad(
                    "targets",
                    format!("{:?} matches no linear layer of the model", o.targets),
                ));
            }
            (config, modules)
        }
    };
    let device = model.device().clone();
    let (mut names, mut vars, mut index) = (Vec::new(), Vec::new(), Vec::new());
    for (name, m) in modules {
        let mut idx = [0usize; 3];
        for (k, (part, t)) in [("lora_A", &m.a), ("lora_E", &m.e), ("lora_B", &m.b)]
            .into_iter()
            .enumerate()
        {
            idx[k] = vars.len();
            names.push(format!("{PEFT_PREFIX}{name}.{part}"));
            vars.push(Var::from_tensor(
                &t.to_dtype(DType::F32)?.to_device(&device)?,
            )?);
        }
        index.push((name, idx));
    }
    let ada = AdaloraTraining {
        config,
        modules: index,
        allocator: None,
        last: None,
    };
    Ok((names, vars, ada))
}

impl AdaloraTraining {
    /// Validates the schedule against the run's length and creates the allocator.
    pub fn start(&mut self, vars: &[Var], total_steps: usize) -> Result<()> {
        let s = &mut self.config.schedule;
        s.total_step = Some(total_steps);
        if s.tinit >= total_steps.saturating_sub(s.tfinal) {
            return Err(bad(
                "tinit",
                format!(
                    "tinit {} and tfinal {} leave no budgeting phase in {total_steps} steps (need tinit < steps − tfinal)",
                    s.tinit, s.tfinal
                ),
            ));
        }
        let init_bgt: usize = self
            .modules
            .iter()
            .map(|(_, [a, _, _])| vars[*a].as_tensor().dim(0).unwrap_or(0))
            .sum();
        let schedule = BudgetSchedule::new(s, init_bgt, self.modules.len(), total_steps);
        self.allocator = Some(RankAllocator::new(schedule, s.beta1, s.beta2)?);
        Ok(())
    }

    fn module(&self, vars: &[Var], idx: &[usize; 3]) -> AdaloraModule {
        AdaloraModule {
            a: vars[idx[0]].as_tensor().clone(),
            e: vars[idx[1]].as_tensor().clone(),
            b: vars[idx[2]].as_tensor().clone(),
        }
    }

    /// The LoRA form for this step's forward (a = A ⊙ E from the `Var`s: gradients reach A, E).
    pub fn forward_adapter(&self, vars: &[Var]) -> Result<LoraAdapter> {
        let adapter = AdaloraAdapter {
            config: self.config.clone(),
            modules: self
                .modules
                .iter()
                .map(|(n, idx)| (n.clone(), self.module(vars, idx)))
                .collect(),
        };
        adapter.to_lora()
    }

    /// PEFT's regularizer (a graph to the A and B `Var`s).
    pub fn orth_reg(&self, vars: &[Var]) -> Result<Tensor> {
        let pairs: Vec<(&Tensor, &Tensor)> = self
            .modules
            .iter()
            .map(|(_, [a, _, b])| (vars[*a].as_tensor(), vars[*b].as_tensor()))
            .collect();
        orth_regularizer(&pairs)
    }

    /// PEFT's `update_and_allocate(step)` after the optimizer step, with the step's gradients;
    /// masks E in place (PEFT: `lora_E.masked_fill_(~mask, 0)`).
    pub fn after_step(
        &mut self,
        step: usize,
        vars: &[Var],
        grads: &[Tensor],
    ) -> Result<Allocation> {
        let allocator = self
            .allocator
            .as_mut()
            .ok_or_else(|| Error::Msg("AdaLoRA: the allocator was not started".into()))?;
        let inputs: Vec<ModuleGrads> = self
            .modules
            .iter()
            .map(|(n, [a, e, b])| ModuleGrads {
                name: n,
                params: [
                    vars[*a].as_tensor(),
                    vars[*e].as_tensor(),
                    vars[*b].as_tensor(),
                ],
                grads: [&grads[*a], &grads[*e], &grads[*b]],
            })
            .collect();
        let alloc = allocator.update_and_allocate(step, &inputs)?;
        if let Some(pattern) = &alloc.mask {
            for (name, [_, e, _]) in &self.modules {
                let Some(mask) = pattern.get(name) else {
                    continue;
                };
                let var = &vars[*e];
                let keep: Vec<u8> = mask.iter().map(|k| *k as u8).collect();
                let keep = Tensor::from_vec(keep, (mask.len(), 1), var.device())?;
                let masked = keep.where_cond(var.as_tensor(), &var.as_tensor().zeros_like()?)?;
                var.set(&masked)?;
            }
        }
        self.last = Some(alloc.clone());
        Ok(alloc)
    }

    /// The current rank pattern (`None` before the first masking).
    pub fn rank_pattern(&self) -> Option<&BTreeMap<String, Vec<bool>>> {
        self.allocator
            .as_ref()
            .and_then(|a| a.rank_pattern.as_ref())
    }

    /// The adapter as PEFT's `save_pretrained` writes it (pattern in the config; `save` cuts).
    pub fn export(&self, vars: &[Var]) -> Result<AdaloraAdapter> {
        let mut config = self.config.clone();
        config.rank_pattern = self.rank_pattern().cloned();
        let modules = self
            .modules
            .iter()
            .map(|(n, idx)| {
                let m = self.module(vars, idx);
                Ok((
                    n.clone(),
                    AdaloraModule {
                        a: m.a.detach().copy()?,
                        e: m.e.detach().copy()?,
                        b: m.b.detach().copy()?,
                    },
                ))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(AdaloraAdapter { config, modules })
    }

    /// Writes the allocator's importance state and pattern into a checkpoint folder.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let Some(alloc) = &self.allocator else {
            return Ok(());
        };
        let tensors = alloc.state_tensors();
        if !tensors.is_empty() {
            lowrank_core::files::write_safetensors(&dir.join(STATE_TENSORS), &tensors)?;
        }
        lowrank_core::files::write_json(
            &dir.join(STATE_JSON),
            &serde_json::json!({ "rank_pattern": alloc.rank_pattern }),
        )
    }

    /// Restores `save_state` (for `--resume`).
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let names: Vec<String> = self.modules.iter().map(|(n, _)| n.clone()).collect();
        let Some(alloc) = self.allocator.as_mut() else {
            return Err(Error::Msg("AdaLoRA: the allocator was not started".into()));
        };
        let tensor_path = dir.join(STATE_TENSORS);
        let tensors = if tensor_path.exists() {
            candle_core::safetensors::load(&tensor_path, &candle_core::Device::Cpu)?
        } else {
            Default::default()
        };
        alloc.load_state(&names, &tensors)?;
        let json: serde_json::Value = lowrank_core::files::read_json(&dir.join(STATE_JSON))?;
        alloc.rank_pattern = lowrank_core::files::from_json_value(
            json["rank_pattern"].clone(),
            &dir.join(STATE_JSON),
        )?;
        Ok(())
    }

    /// Saves the adapter and the rank report into `out`; returns the printed table.
    pub fn finish(&self, vars: &[Var], out: &Path) -> Result<String> {
        let adapter = self.export(vars)?;
        adapter.save(out)?;
        let report = RankReport::new(&adapter);
        lowrank_core::files::write_json(&out.join(RANKS_FILE), &report)?;
        report.heat_map(&out.join(RANKS_PLOT_FILE))?;
        Ok(report.table())
    }
}

/// Where the rank went: the kept rank of every module, as a layers × module-types table.
#[derive(Debug, Clone, Serialize)]
pub struct RankReport {
    pub init_rank: usize,
    pub target_rank: usize,
    /// Σ kept ranks.
    pub total: usize,
    /// Σ initial ranks.
    pub initial_total: usize,
    /// Column names (module types, e.g. `q_proj`).
    pub modules: Vec<String>,
    /// Row labels (layer indices).
    pub layers: Vec<usize>,
    /// `ranks[layer row][module column]`, `None` where the module is not adapted.
    pub ranks: Vec<Vec<Option<usize>>>,
    /// Module key → kept rank.
    pub per_module: BTreeMap<String, usize>,
}

impl RankReport {
    pub fn new(adapter: &AdaloraAdapter) -> Self {
        let per_module = adapter.ranks();
        let kind = |n: &str| n.rsplit('.').next().unwrap_or(n).to_string();
        let mut modules: Vec<String> = per_module.keys().map(|n| kind(n)).collect();
        modules.sort_by_key(|m| {
            (
                // PEFT's order of a layer's linears.
                ALL_LINEAR
                    .iter()
                    .position(|o| o == m)
                    .unwrap_or(ALL_LINEAR.len()),
                m.clone(),
            )
        });
        modules.dedup();
        let mut layers: Vec<usize> = per_module
            .keys()
            .map(|n| layer_index(n, &[]).unwrap_or(0))
            .collect();
        layers.sort();
        layers.dedup();
        let mut ranks = vec![vec![None; modules.len()]; layers.len()];
        for (n, r) in &per_module {
            let row = layers
                .iter()
                .position(|l| *l == layer_index(n, &[]).unwrap_or(0))
                .expect("listed");
            let col = modules.iter().position(|m| *m == kind(n)).expect("listed");
            ranks[row][col] = Some(*r);
        }
        let init_rank = adapter.config.schedule.init_r;
        RankReport {
            init_rank,
            target_rank: adapter.config.schedule.target_r,
            total: per_module.values().sum(),
            initial_total: init_rank * per_module.len(),
            modules,
            layers,
            ranks,
            per_module,
        }
    }

    /// The table as text: one row per layer, one column per module type.
    pub fn table(&self) -> String {
        let mut s = format!(
            "AdaLoRA final ranks (of {} each; budget {} of {}, target average {}):\n{:>6}",
            self.init_rank, self.total, self.initial_total, self.target_rank, "layer"
        );
        for m in &self.modules {
            s += &format!(" {m:>9}");
        }
        s += &format!(" {:>6}\n", "sum");
        for (row, layer) in self.ranks.iter().zip(&self.layers) {
            s += &format!("{layer:>6}");
            for r in row {
                match r {
                    Some(r) => s += &format!(" {r:>9}"),
                    None => s += &format!(" {:>9}", "-"),
                }
            }
            s += &format!(" {:>6}\n", row.iter().flatten().sum::<usize>());
        }
        s += &format!("{:>6}", "sum");
        for c in 0..self.modules.len() {
            let col: usize = self.ranks.iter().filter_map(|r| r[c]).sum();
            s += &format!(" {col:>9}");
        }
        s += &format!(" {:>6}\n", self.total);
        s
    }

    /// A heat map (layers × module types, darker = more rank kept), as SVG.
    pub fn heat_map(&self, path: &Path) -> Result<()> {
        use plotters::prelude::*;
        let (cell_w, cell_h) = (80i32, 28i32);
        let (left, top) = (70i32, 50i32);
        let width = (left + cell_w * self.modules.len() as i32 + 20).max(300) as u32;
        let height = (top + cell_h * self.layers.len() as i32 + 30) as u32;
        let mut svg = String::new();
        {
            let err = |e: &dyn std::fmt::Display| Error::Msg(format!("{RANKS_PLOT_FILE}: {e}"));
            let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| err(&e))?;
            let font = ("sans-serif", 14).into_font();
            root.draw(&Text::new(
                format!(
                    "AdaLoRA kept rank per module (of {}; total {} of {})",
                    self.init_rank, self.total, self.initial_total
                ),
                (10, 10),
                font.clone(),
            ))
            .map_err(|e| err(&e))?;
            for (c, m) in self.modules.iter().enumerate() {
                root.draw(&Text::new(
                    m.clone(),
                    (left + cell_w * c as i32 + 6, top - 18),
                    font.clone(),
                ))
                .map_err(|e| err(&e))?;
            }
            for (r, (row, layer)) in self.ranks.iter().zip(&self.layers).enumerate() {
                let y = top + cell_h * r as i32;
                root.draw(&Text::new(
                    format!("layer {layer}"),
                    (8, y + 7),
                    font.clone(),
                ))
                .map_err(|e| err(&e))?;
                for (c, rank) in row.iter().enumerate() {
                    let x = left + cell_w * c as i32;
                    let (fill, label) = match rank {
                        Some(k) => {
                            let f = *k as f64 / self.init_rank.max(1) as f64;
                            let shade = |full: u8| (255.0 - f * (255.0 - full as f64)) as u8;
                            (RGBColor(shade(33), shade(102), shade(172)), k.to_string())
                        }
                        None => (RGBColor(235, 235, 235), "-".into()),
                    };
                    root.draw(&Rectangle::new(
                        [(x, y), (x + cell_w - 2, y + cell_h - 2)],
                        fill.filled(),
                    ))
                    .map_err(|e| err(&e))?;
                    let text_color = if rank.is_some_and(|k| 2 * k > self.init_rank) {
                        WHITE
                    } else {
                        BLACK
                    };
                    root.draw(&Text::new(
                        label,
                        (x + cell_w / 2 - 6, y + 6),
                        font.clone().color(&text_color),
                    ))
                    .map_err(|e| err(&e))?;
                }
            }
            root.present().map_err(|e| err(&e))?;
        }
        lowrank_core::files::write_atomic(path, svg.as_bytes())
    }
}
