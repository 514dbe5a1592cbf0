//! The training loop: trainable tensors (adapter `Var`s or every weight), gradient
//! accumulation over micro-batches, clipping, the optimizer step, logging, eval, checkpoints,
//! resume and the NaN stop.
//!
//! Output folder: training_log.jsonl is created by its first line (a run that fails while
//! setting up leaves nothing that blocks its `--out`). A checkpoint records the options and the
//! identity of the model and data (see `input_identity`); `--resume` refuses other ones, keeps
//! the log's lines up to the checkpoint exactly as written and removes what a killed run left
//! half-written (staging folders, temporary files).
//!
//! Loss: per optimizer step, the summed token NLL of all its micro-batches divided by the
//! step's number of loss tokens (the mean token loss of the step's batch, as transformers'
//! Trainer computes it with `num_items_in_batch`), so accumulation equals one larger batch.
//!
//! Data parallel ([`train_with`] over a [`Communicator`] of N ranks): the plan is the
//! single-process one, so an optimizer step's batch is the same `--batch-size` × `--grad-accum`
//! rows in the same order. The step's rows are cut into N contiguous slices whose lengths differ
//! by at most one; rank r computes slice r, in micro-batches of at most `--batch-size` rows
//! (with one rank: exactly the single-process micro-batches). The loss is scaled by the
//! step's global loss-token count (every rank knows the whole plan); after the backward passes
//! the ranks sum the gradients in one flat f32 all-reduce and the NLL in f64, then each clips
//! on the global norm and takes the same update (AdaLoRA's importance statistics come from the
//! summed gradients, so they agree too). Only rank 0 evaluates and writes the log, checkpoints
//! and the adapter. The result is the single-process run's up to float rounding: a slice's
//! matmuls sum over fewer rows before the ranks' sums are added.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use lowrank_core::lora::{
    LoraAdapter, LoraConfig, LoraModule, LoraVariant, ALL_LINEAR, PEFT_PREFIX,
};
use lowrank_core::targets::ModuleSelector;
use lowrank_core::{Error, Result};
use lowrank_models::{ActiveAdapter, Llama, Tokenizer};
use lowrank_quant::QuantSpec;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::comm::{self, Communicator, SingleProcess};
use crate::data::{self, Batch, Example};
use crate::optim::{clip, Optimizer};
use crate::{memory, plot, schedule, ComputeDtype, Init, Method, TrainOptions, TrainReport};

pub const LOG_FILE: &str = "training_log.jsonl";
pub const PLOT_FILE: &str = "loss.svg";
pub const STATE_FILE: &str = "trainer_state.json";
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// What is being trained: named `Var`s, and for LoRA/DoRA the adapter built from them.
pub struct Trainable {
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    /// Weight decay applies (not to norms and biases of a full fine-tune).
    pub decay: Vec<bool>,
    /// The adapter whose tensors are the `Var`s (None for `full`).
    pub adapter: Option<LoraAdapter>,
    /// PiSSA/OLoRA: each module's initial (A₀, B₀), subtracted when saving a plain LoRA adapter.
    pub initial: Option<BTreeMap<String, (Tensor, Tensor)>>,
    /// `--method adalora`: the A/E/B bookkeeping, regularizer and rank allocator.
    pub adalora: Option<crate::adalora::AdaloraTraining>,
}

impl Trainable {
    /// Rebuilds `adapter` from the `Var`s where it is a product of them (AdaLoRA's a = A ⊙ E):
    /// call after every update.
    pub fn refresh(&mut self) -> Result<()> {
        if let Some(ada) = &self.adalora {
            self.adapter = Some(ada.forward_adapter(&self.vars)?);
        }
        Ok(())
    }

    pub fn num_parameters(&self) -> usize {
        self.vars.iter().map(|v| v.as_tensor().elem_count()).sum()
    }

    /// The adapter to save, usable with the original base: for PiSSA/OLoRA converted as PEFT's
    /// `path_initial_model_for_weight_conversion` does (ΔW = BA − B₀A₀ as a rank-2r LoRA with
    /// A' = [A; A₀], B' = [B, −B₀], α doubled, or ×√2 with rsLoRA).
    pub fn export_adapter(&self) -> Result<Option<LoraAdapter>> {
        let Some(adapter) = &self.adapter else {
            return Ok(None);
        };
        let mut out = LoraAdapter {
            config: adapter.config.clone(),
            modules: BTreeMap::new(),
        };
        for (name, m) in &adapter.modules {
            let (a, b) = (m.a.detach().copy()?, m.b.detach().copy()?);
            let (a, b) = match self.initial.as_ref().and_then(|i| i.get(name)) {
                Some((a0, b0)) => (
                    Tensor::cat(&[&a, a0], 0)?,
                    Tensor::cat(&[&b, &b0.neg()?], 1)?,
                ),
                None => (a, b),
            };
            let magnitude = m
                .magnitude
                .as_ref()
                .map(|t| t.detach().copy())
                .transpose()?;
            out.modules.insert(
                name.clone(),
                LoraModule {
                    a,
                    b,
                    magnitude,
                    scale: m.scale,
                },
            );
        }
        if self.initial.is_some() {
            let c = &mut out.config;
            c.rank *= 2;
            c.alpha *= if c.use_rslora { 2f64.sqrt() } else { 2.0 };
        }
        Ok(Some(out))
    }
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

fn bad(field: &str, msg: impl Into<String>) -> Error {
    Error::option(field, msg.into())
}

fn validate(o: &TrainOptions) -> Result<()> {
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

/// Wraps a tensor as a trainable `Var` (a copy).
fn var(t: &Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
}

/// Sets up the trainable tensors: every weight for `full`, else a new adapter (or
/// `--init-adapter`) whose tensors are `Var`s; PiSSA/OLoRA rewrite the base weights.
pub fn setup_trainable(model: &mut Llama, o: &TrainOptions) -> Result<Trainable> {
    if o.method == Method::Full {
        let named = model.make_trainable()?;
        let decay = named
            .iter()
            .map(|(n, _)| !(n.contains("norm") || n.ends_with(".bias")))
            .collect();
        let (names, vars) = named.into_iter().unzip();
        return Ok(Trainable {
            names,
            vars,
            decay,
            adapter: None,
            initial: None,
            adalora: None,
        });
    }
    if o.method == Method::Adalora {
        return crate::adalora::setup_trainable(model, o);
    }
    let want = if o.method == Method::Dora {
        LoraVariant::Dora
    } else {
        LoraVariant::Lora
    };
    let (config, modules, initial) = match &o.init_adapter {
        Some(dir) => {
            let adapter = model.load_adapter(dir)?;
            if adapter.config.variant != want {
                return Err(Error::Msg(format!(
                    "{}: the adapter is {} but --method is {}",
                    dir.display(),
                    if adapter.config.variant == LoraVariant::Dora {
                        "DoRA"
                    } else {
                        "LoRA"
                    },
                    o.method
                )));
            }
            (adapter.config, adapter.modules, None)
        }
        None => {
            let mut config = LoraConfig::new(o.rank, o.alpha, parse_targets(&o.targets)?);
            config.variant = want;
            config.use_rslora = o.rslora;
            config.dropout = o.dropout;
            config.base_model = Some(o.model.clone());
            let mut rng = StdRng::seed_from_u64(o.seed);
            let mut modules = BTreeMap::new();
            let mut initial = BTreeMap::new();
            for linear in model.linears() {
                if !config.targets_module(&linear.name) {
                    continue;
                }
                let lin = model.linear(&linear.name).expect("listed");
                if lin.is_quantized() && matches!(o.init, Init::Pissa | Init::Olora) {
                    return Err(bad(
                        "init",
                        format!(
                            "{} rewrites the base weights; it needs a dense base, not a 4-bit one",
                            o.init
                        ),
                    ));
                }
                // A 4-bit base: this one layer dequantized for the initialisation only (DoRA's
                // magnitude ‖W‖ is taken over the dequantized weight, as PEFT does).
                let weight = lin.base().to_dense(model.device())?;
                let scale = config.scale_for(&linear.name);
                let init = crate::init::init_module(
                    o.init,
                    &weight,
                    config.rank_for(&linear.name),
                    scale,
                    o.method == Method::Dora,
                    &mut rng,
                )
                .map_err(|e| Error::Msg(format!("{}: {e}", linear.name)))?;
                if let Some(residual) = init.residual {
                    model
                        .linear_mut(&linear.name)
                        .expect("listed")
                        .set_weight(residual)?;
                    initial.insert(
                        linear.name.clone(),
                        (init.module.a.clone(), init.module.b.clone()),
                    );
                }
                modules.insert(linear.name.clone(), init.module);
            }
            if modules.is_empty() {
                return Err(bad("targets", format!("{:?} matches no linear layer of the model (e.g. model.layers.0.self_attn.q_proj)", o.targets)));
            }
            let initial = (!initial.is_empty()).then_some(initial);
            (config, modules, initial)
        }
    };
    let (mut names, mut vars) = (Vec::new(), Vec::new());
    let mut trainable_modules = BTreeMap::new();
    for (name, m) in modules {
        let a = var(&m.a)?;
        let b = var(&m.b)?;
        names.push(format!("{PEFT_PREFIX}{name}.lora_A.weight"));
        vars.push(a.clone());
        names.push(format!("{PEFT_PREFIX}{name}.lora_B.weight"));
        vars.push(b.clone());
        let magnitude = match &m.magnitude {
            Some(mag) => {
                let v = var(mag)?;
                names.push(format!("{PEFT_PREFIX}{name}.lora_magnitude_vector"));
                vars.push(v.clone());
                Some(v.as_tensor().clone())
            }
            None => None,
        };
        trainable_modules.insert(
            name,
            LoraModule {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                magnitude,
                scale: m.scale,
            },
        );
    }
    let decay = vec![true; vars.len()];
    Ok(Trainable {
        names,
        vars,
        decay,
        adapter: Some(LoraAdapter {
            config,
            modules: trainable_modules,
        }),
        initial,
        adalora: None,
    })
}

/// Summed NLL over the batch's loss tokens from final hidden states (batch, seq, hidden): only
/// the predicting positions go through the head, in vocabulary chunks (the fused kernel keeps
/// no logits for backward).
pub fn head_nll(model: &Llama, hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let picked = hidden
        .reshape((b * t, h))?
        .index_select(&batch.predict_at, 0)?;
    if model.config().final_softcap.is_some() {
        // Soft-capped logits (Gemma 2), which the fused kernel does not compute: the composed
        // ops, logits kept for backward.
        let logprobs = candle_nn::ops::log_softmax(&model.logits(&picked)?, D::Minus1)?;
        let labels = batch.labels.unsqueeze(1)?;
        return Ok(logprobs.gather(&labels, 1)?.sum_all()?.neg()?);
    }
    // Every picked row predicts a label: nothing to ignore.
    let (nll, _) = lowrank_kernels::chunked_cross_entropy(
        &picked,
        model.head_weight(),
        &batch.labels,
        u32::MAX,
    )?;
    Ok(nll)
}

fn context(
    model: &Llama,
    batch: &Batch,
    dropout_seed: Option<u64>,
) -> Result<lowrank_models::llama::TrainContext> {
    let (b, t) = batch.ids.dims2()?;
    model.train_context(
        b,
        t,
        batch.positions.as_ref(),
        batch.mask.clone(),
        dropout_seed,
    )
}

/// Summed NLL of a batch (a graph to the trainable tensors).
pub fn batch_nll(
    model: &Llama,
    adapters: &[ActiveAdapter],
    batch: &Batch,
    dropout_seed: Option<u64>,
) -> Result<Tensor> {
    let ctx = context(model, batch, dropout_seed)?;
    let hidden = model.hidden_states_train(&batch.ids, &ctx, adapters)?;
    head_nll(model, &hidden, batch)
}

fn to_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn add_grads(
    acc: &mut [Option<Tensor>],
    vars: &[Var],
    store: &candle_core::backprop::GradStore,
) -> Result<()> {
    for (slot, v) in acc.iter_mut().zip(vars) {
        if let Some(g) = store.get(v.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
}

/// Forward and backward of one micro-batch, the loss scaled by `scale`; adds the gradients to
/// `acc` and returns the (unscaled) summed NLL. With `checkpoint`, only each layer's input is
/// kept; backward recomputes one layer at a time (same dropout masks, seeded) and chains the
/// gradient through it with the surrogate Σ y ⊙ ∂L/∂y.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    model: &Llama,
    adapters: &[ActiveAdapter],
    batch: &Batch,
    dropout_seed: Option<u64>,
    scale: f64,
    vars: &[Var],
    acc: &mut [Option<Tensor>],
    checkpoint: bool,
) -> Result<f64> {
    if !checkpoint {
        let nll = batch_nll(model, adapters, batch, dropout_seed)?;
        let store = (&nll * scale)?.backward()?;
        add_grads(acc, vars, &store)?;
        return to_f64(&nll);
    }
    let ctx = context(model, batch, dropout_seed)?;
    let n = model.num_layers();
    let mut inputs = vec![model.embed(&batch.ids)?.detach()];
    for i in 0..n {
        let y = model.train_layer(i, &inputs[i], &ctx, adapters)?.detach();
        inputs.push(y);
    }
    let top = Var::from_tensor(&inputs[n])?;
    let nll = head_nll(model, &model.final_norm(top.as_tensor())?, batch)?;
    let store = (&nll * scale)?.backward()?;
    add_grads(acc, vars, &store)?;
    let mut grad = store.get(top.as_tensor()).cloned().ok_or_else(|| {
        Error::Msg("gradient checkpointing: no gradient reached the last layer".into())
    })?;
    drop(store);
    for i in (0..n).rev() {
        let x = Var::from_tensor(&inputs[i])?;
        let y = model.train_layer(i, x.as_tensor(), &ctx, adapters)?;
        let store = (y * &grad)?.sum_all()?.backward()?;
        add_grads(acc, vars, &store)?;
        grad = store.get(x.as_tensor()).cloned().ok_or_else(|| {
            Error::Msg(format!(
                "gradient checkpointing: no gradient reached layer {i}'s input"
            ))
        })?;
    }
    // The embedding (trainable in a full fine-tune).
    let store = (model.embed(&batch.ids)? * &grad)?.sum_all()?.backward()?;
    add_grads(acc, vars, &store)?;
    to_f64(&nll)
}

/// Mean token loss over `examples` (no dropout), in batches of `batch_size`.
pub fn evaluate(
    model: &Llama,
    adapters: &[ActiveAdapter],
    examples: &[Example],
    batch_size: usize,
) -> Result<f64> {
    // Detached, so the fused ops skip their backward work (the loss computes no gradient).
    let detached: Vec<LoraAdapter> = adapters
        .iter()
        .map(|a| LoraAdapter {
            config: a.adapter.config.clone(),
            modules: a
                .adapter
                .modules
                .iter()
                .map(|(k, m)| (k.clone(), m.detached()))
                .collect(),
        })
        .collect();
    let adapters: Vec<ActiveAdapter> = detached
        .iter()
        .zip(adapters)
        .map(|(d, a)| ActiveAdapter::weighted(d, a.weight))
        .collect();
    let (mut total, mut count) = (0.0, 0usize);
    let order: Vec<usize> = (0..examples.len()).collect();
    for rows in data::plan_micro_batches(examples, &order, batch_size, false, usize::MAX) {
        let batch = data::make_batch(examples, &rows, model.device())?;
        total += to_f64(&batch_nll(model, &adapters, &batch, None)?.detach())?;
        count += batch.loss_tokens;
    }
    Ok(total / count.max(1) as f64)
}

fn mix(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

/// Options whose change makes a resumed run a different run.
fn run_identity(o: &TrainOptions) -> Value {
    let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        for k in [
            "out",
            "resume",
            "quiet",
            "save_every",
            "eval_every",
            "stop_after",
            "model",
            "data",
            "eval_data",
            "init_adapter",
        ] {
            obj.remove(k);
        }
    }
    v
}

/// The model and data a run trains on, recorded in each checkpoint for `--resume` to compare:
/// the model folder (path, bytes of config.json and weights, CRC-32 of config.json) and each
/// data file (path, bytes, CRC-32 of its contents).
fn input_identity(o: &TrainOptions, model_dir: &Path) -> Result<Value> {
    let absolute = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let data = |path: &Path| -> Result<Value> {
        let (bytes, crc) = file_checksum(path)?;
        Ok(json!({"path": absolute(path), "bytes": bytes, "crc32": format!("{crc:08x}")}))
    };
    if model_dir.is_file() {
        // A GGUF file holds config and weights: its checksum covers both.
        let (bytes, crc) = file_checksum(model_dir)?;
        return Ok(json!({
            "model": {"path": absolute(model_dir), "bytes": bytes, "config_crc32": format!("{crc:08x}")},
            "data": data(&o.data)?,
            "eval_data": o.eval_data.as_deref().map(data).transpose()?,
        }));
    }
    let (mut bytes, config_crc) = file_checksum(&model_dir.join("config.json"))?;
    let entries = std::fs::read_dir(model_dir).map_err(|e| Error::io(model_dir, e))?;
    for entry in entries.filter_map(|e| e.ok()) {
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(".safetensors")
        {
            // Through symlinks, as the HF cache stores its blobs.
            let meta = std::fs::metadata(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            bytes += meta.len();
        }
    }
    Ok(json!({
        "model": {"path": absolute(model_dir), "bytes": bytes, "config_crc32": format!("{config_crc:08x}")},
        "data": data(&o.data)?,
        "eval_data": o.eval_data.as_deref().map(data).transpose()?,
    }))
}

/// Size and CRC-32 of a file, read in chunks.
fn file_checksum(path: &Path) -> Result<(u64, u32)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok((bytes, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
}

/// Refuses to resume on another model or other data. The model must be the same folder with
/// the same config and weight sizes (two fine-tunes of one architecture differ only there);
/// data files must hold the same bytes, wherever they now are. Checkpoints written before the
/// inputs were recorded are not checked.
fn check_inputs(ckpt: &Path, saved: Option<&Value>, now: &Value) -> Result<()> {
    let Some(saved) = saved else {
        return Ok(());
    };
    for (key, flag) in [
        ("model", "--model"),
        ("data", "--data"),
        ("eval_data", "--eval-data"),
    ] {
        let (was, is) = (&saved[key], &now[key]);
        let same = if key == "model" {
            was == is
        } else {
            was.get("bytes") == is.get("bytes") && was.get("crc32") == is.get("crc32")
        };
        if !same {
            return Err(Error::Msg(format!(
                "--resume {}: {flag} is not what the checkpoint was trained on: the checkpoint has {}, this run gives {}",
                ckpt.display(),
                describe_input(was),
                describe_input(is)
            )));
        }
    }
    Ok(())
}

fn describe_input(v: &Value) -> String {
    if v.is_null() {
        return "none".into();
    }
    let crc = v.get("crc32").or_else(|| v.get("config_crc32"));
    format!(
        "{} ({} bytes, {}crc32 {})",
        v["path"].as_str().unwrap_or("?"),
        v["bytes"],
        if v.get("config_crc32").is_some() {
            "config.json "
        } else {
            ""
        },
        crc.and_then(Value::as_str).unwrap_or("?")
    )
}

/// Removes what a killed run left half-written in its `--out`: checkpoint staging folders
/// (`.checkpoint-XXXXXX`) and temporary files of atomic writes (`.tmpXXXXXX`).
fn remove_stale_staging(out: &Path) -> Result<()> {
    let random_tail =
        |rest: &str| rest.len() == 6 && rest.chars().all(|c| c.is_ascii_alphanumeric());
    let entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let removed = match (name.strip_prefix(".checkpoint-"), name.strip_prefix(".tmp")) {
            (Some(rest), _) if random_tail(rest) && path.is_dir() => std::fs::remove_dir_all(&path),
            (_, Some(rest)) if random_tail(rest) && path.is_file() => std::fs::remove_file(&path),
            _ => continue,
        };
        removed.map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// The checkpoint folder `--resume` names: a checkpoint itself, or the run folder's latest.
pub fn find_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| Error::Msg(format!("--resume {}: {e}", path.display())))?;
    let latest = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join(STATE_FILE)
                .exists()
                .then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s);
    latest.map(|(_, p)| p).ok_or_else(|| {
        Error::Msg(format!("{}: no checkpoint to resume from (no checkpoint-N/{STATE_FILE}; was --save-every given?)", path.display()))
    })
}

fn checkpoint_dir(out: &Path, step: usize) -> PathBuf {
    out.join(format!("checkpoint-{step}"))
}

fn save_checkpoint(
    out: &Path,
    step: usize,
    t: &Trainable,
    opt: &Optimizer,
    o: &TrainOptions,
    inputs: &Value,
) -> Result<PathBuf> {
    let dest = checkpoint_dir(out, step);
    let staging = lowrank_core::files::staging_dir(out, ".checkpoint-")?;
    let tensors: Vec<(String, Tensor)> = t
        .names
        .iter()
        .cloned()
        .zip(t.vars.iter().map(|v| v.as_tensor().detach()))
        .collect();
    lowrank_core::files::write_safetensors(&staging.path().join(TRAINABLE_FILE), &tensors)?;
    let state = opt.state_tensors(&t.names);
    if !state.is_empty() {
        lowrank_core::files::write_safetensors(&staging.path().join(OPTIMIZER_FILE), &state)?;
    }
    if let Some(ada) = &t.adalora {
        ada.export(&t.vars)?.save(staging.path())?;
        ada.save_state(staging.path())?;
    } else if let Some(adapter) = t.export_adapter()? {
        adapter.save(staging.path())?;
    }
    let info = json!({"step": step, "optimizer_steps": opt.t, "options": o, "inputs": inputs});
    lowrank_core::files::write_json(&staging.path().join(STATE_FILE), &info)?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    }
    std::fs::rename(staging.keep(), &dest).map_err(|e| Error::io(&dest, e))?;
    Ok(dest)
}

/// The adapters a forward applies now (rebuilt after each update by `Trainable::refresh`).
fn active_of(t: &Trainable) -> Vec<ActiveAdapter<'_>> {
    t.adapter
        .as_ref()
        .map(ActiveAdapter::new)
        .into_iter()
        .collect()
}

/// Appends JSON lines to training_log.jsonl, one write per line. The file is created by the
/// first line, so a run that fails while setting up leaves no log to block its `--out`.
struct Log {
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl Log {
    fn write(&mut self, v: &Value) -> Result<()> {
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .map_err(|e| Error::io(&self.path, e))?,
            ),
        };
        let line = format!("{v}\n");
        file.write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

fn say(o: &TrainOptions, msg: &str) {
    if !o.quiet {
        eprintln!("{msg}");
    }
}

/// Sums the step's gradients (a missing one counts as zeros) over the ranks in one flat f32
/// buffer, and its summed NLL in f64; returns the global NLL.
fn all_reduce_step(
    comm: &dyn Communicator,
    acc: &mut [Option<Tensor>],
    vars: &[Var],
    nll: f64,
) -> Result<f64> {
    let total: usize = vars.iter().map(|v| v.as_tensor().elem_count()).sum();
    let mut flat = Vec::with_capacity(total);
    for (g, v) in acc.iter().zip(vars) {
        match g {
            Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => flat.resize(flat.len() + v.as_tensor().elem_count(), 0.0),
        }
    }
    comm.all_reduce_sum_f32(&mut flat)?;
    let mut offset = 0;
    for (slot, v) in acc.iter_mut().zip(vars) {
        let v = v.as_tensor();
        let n = v.elem_count();
        let g = Tensor::from_slice(&flat[offset..offset + n], v.shape(), v.device())?;
        *slot = Some(g.to_dtype(v.dtype())?);
        offset += n;
    }
    let mut nll = [nll];
    comm.all_reduce_sum_f64(&mut nll)?;
    Ok(nll[0])
}

/// Runs training as `opts` says in this one process; see the crate docs. Errors name the file,
/// line or option at fault.
pub fn train(opts: &TrainOptions) -> Result<TrainReport> {
    train_with(opts, &SingleProcess)
}

/// Runs training as `opts` says as one rank of `comm` (data parallel; see the module docs).
/// Every rank must be given the same options and files; rank 0 alone writes to `--out`.
/// With one rank this is [`train`].
// `step % n == 0` rather than `is_multiple_of`, which needs Rust 1.87 (the workspace says 1.85).
#[allow(clippy::manual_is_multiple_of)]
pub fn train_with(opts: &TrainOptions, comm: &dyn Communicator) -> Result<TrainReport> {
    let started = Instant::now();
    let (rank, world) = (comm.rank(), comm.size());
    let root = rank == 0;
    // Only rank 0 speaks.
    let quiet;
    let o = if root {
        opts
    } else {
        quiet = TrainOptions {
            quiet: true,
            ..opts.clone()
        };
        &quiet
    };
    validate(o)?;
    let dir = lowrank_models::checkpoint::resolve_model_dir(&o.model)?;
    let device = Device::Cpu;
    let load = lowrank_models::LoadOptions {
        quantize: o.quantize.map(QuantSpec::validated).transpose()?,
    };
    let mut model = Llama::load_with(&dir, &device, &load)?;
    if model.is_quantized() {
        say(o, &model.linear_memory().summary());
    }
    let tokenizer = Tokenizer::load(&dir)?;

    // Data.
    let (format, train_ex, dropped) = data::load(&o.data, &tokenizer, o.max_len)?;
    let (train_ex, eval_ex) = match (&o.eval_data, o.eval_split) {
        (Some(path), _) => (train_ex, data::load(path, &tokenizer, o.max_len)?.1),
        (None, Some(f)) => data::split(train_ex, f, o.seed)?,
        (None, None) => (train_ex, vec![]),
    };
    // Only rank 0 evaluates (the others go on to the next step's all-reduce).
    let eval_ex = if root { eval_ex } else { Vec::new() };
    for (set, file) in [
        (&train_ex, &o.data),
        (&eval_ex, o.eval_data.as_ref().unwrap_or(&o.data)),
    ] {
        for ex in set {
            model.check_ids(&ex.ids).map_err(|e| {
                Error::Msg(format!(
                    "{}: {e} (tokenizer and model disagree)",
                    file.display()
                ))
            })?;
        }
    }
    if dropped > 0 {
        say(
            o,
            &format!(
                "note: {dropped} line(s) of {} have no token to learn from and are skipped",
                o.data.display()
            ),
        );
    }

    // Output folder and resume point (every rank reads the checkpoint: `--out` on a file
    // system they share).
    if root {
        std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    }
    let log_path = o.out.join(LOG_FILE);
    let resume_from = o.resume.as_deref().map(find_checkpoint).transpose()?;
    comm::check_same(
        comm,
        "the checkpoint to resume from",
        &format!("{resume_from:?}"),
    )?;
    if root && resume_from.is_none() && log_path.exists() {
        return Err(Error::Msg(format!(
            "{}: already holds a training run ({LOG_FILE}); pass --resume {} to continue it, or choose another --out",
            o.out.display(),
            o.out.display()
        )));
    }

    let inputs = input_identity(o, &dir)?;
    comm::check_same(comm, "the options", &run_identity(o).to_string())?;
    for (key, flag) in [
        ("model", "--model"),
        ("data", "--data"),
        ("eval_data", "--eval-data"),
    ] {
        // By contents: each machine may keep its copy elsewhere.
        let mut identity = inputs[key].clone();
        if let Some(fields) = identity.as_object_mut() {
            fields.remove("path");
        }
        comm::check_same(comm, flag, &identity.to_string())?;
    }

    let base_eval_loss = if eval_ex.is_empty() {
        None
    } else {
        Some(evaluate(&model, &[], &eval_ex, o.batch_size)?)
    };

    let mut trainable = setup_trainable(&mut model, o)?;
    if o.compute_dtype == ComputeDtype::Bf16 {
        // After the adapters' set-up, which may read W in f32 (PiSSA's SVD, DoRA's ‖W‖).
        model.compute_in_bf16()?;
    }
    let mut optimizer =
        Optimizer::new(o.optimizer, &trainable.vars, o.weight_decay, o.betas, o.eps)?;
    let mut start_step = 0;
    let mut kept_log: Vec<Value> = Vec::new();
    if let Some(ckpt) = &resume_from {
        let state: Value = lowrank_core::files::read_json(&ckpt.join(STATE_FILE))?;
        let saved = state.get("options").cloned().unwrap_or(Value::Null);
        let saved: TrainOptions = serde_json::from_value(saved)
            .map_err(|e| Error::Msg(format!("{}: {e}", ckpt.join(STATE_FILE).display())))?;
        let (a, b) = (run_identity(&saved), run_identity(o));
        if a != b {
            let diff: Vec<String> = a
                .as_object()
                .into_iter()
                .flat_map(|m| m.iter())
                .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, v)| {
                    format!(
                        "{k} (checkpoint: {v}, now: {})",
                        b.get(k.as_str()).unwrap_or(&Value::Null)
                    )
                })
                .collect();
            return Err(Error::Msg(format!(
                "--resume {}: options differ from the checkpoint's: {}",
                ckpt.display(),
                diff.join(", ")
            )));
        }
        check_inputs(ckpt, state.get("inputs"), &inputs)?;
        start_step = state.get("step").and_then(Value::as_u64).unwrap_or(0) as usize;
        let tensors = candle_core::safetensors::load(ckpt.join(TRAINABLE_FILE), &device)?;
        for (name, v) in trainable.names.iter().zip(&trainable.vars) {
            let t = tensors.get(name).ok_or_else(|| {
                Error::tensors(ckpt.join(TRAINABLE_FILE), format!("missing {name:?}"))
            })?;
            v.set(t)?;
        }
        if optimizer.slots() > 0 {
            let state_t = candle_core::safetensors::load(ckpt.join(OPTIMIZER_FILE), &device)?;
            let steps = state
                .get("optimizer_steps")
                .and_then(Value::as_u64)
                .unwrap_or(start_step as u64) as usize;
            optimizer.load_state(&trainable.names, &state_t, steps)?;
        } else {
            optimizer.t = start_step;
        }
        // Keep the log up to the checkpoint: its lines as written (parsing and printing a
        // number again may change its last digit), less any line a kill cut short.
        let mut kept_text = String::new();
        let text = if root {
            std::fs::read_to_string(&log_path).ok()
        } else {
            None
        };
        if let Some(text) = text {
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if v.get("step")
                    .and_then(Value::as_u64)
                    .is_some_and(|s| s as usize <= start_step)
                {
                    kept_text.push_str(line);
                    kept_text.push('\n');
                    kept_log.push(v);
                }
            }
        }
        if root {
            lowrank_core::files::write_atomic(&log_path, kept_text.as_bytes())?;
            remove_stale_staging(&o.out)?;
        }
        say(
            o,
            &format!("resuming from {} (step {start_step})", ckpt.display()),
        );
    }
    let mut log = Log {
        file: None,
        path: log_path.clone(),
    };

    // The plan: micro-batches per epoch, grouped into optimizer steps.
    let plan_epoch = |epoch: usize| {
        let order = data::epoch_order(train_ex.len(), o.seed, epoch, o.shuffle);
        data::plan_micro_batches(&train_ex, &order, o.batch_size, o.pack, o.max_len)
    };
    let total_steps = match o.max_steps {
        Some(n) => n,
        None => (0..o.epochs)
            .map(|e| plan_epoch(e).len().div_ceil(o.grad_accum))
            .sum(),
    };
    if let Some(ada) = trainable.adalora.as_mut() {
        ada.start(&trainable.vars, total_steps)?;
        if let Some(ckpt) = &resume_from {
            ada.load_state(ckpt)?;
        }
        trainable.refresh()?;
    }

    let model_parameters = model.config().num_parameters();
    let n_train = trainable.num_parameters();
    // The flat gradient buffers of the ranks must be the same length.
    comm::check_same(comm, "the trainable parameter count", &n_train.to_string())?;
    let longest = train_ex.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let seq = if o.pack { o.max_len } else { longest };
    let est = memory::estimate(
        model.config(),
        n_train,
        optimizer.slots(),
        o.batch_size
            .min((o.batch_size * o.grad_accum).div_ceil(world)),
        seq,
        o.grad_checkpoint,
    );
    let mb = |b: u64| b as f64 / 1_048_576.0;
    say(
        o,
        &format!(
            "trainable parameters: {n_train} ({:.4}% of the model's {model_parameters}) [{}]",
            100.0 * n_train as f64 / model_parameters as f64,
            o.method
        ),
    );
    say(o, &format!(
        "estimated training memory: {:.1} MB (weights {:.1}, gradients + optimizer {:.1}, activations {:.1} for {}×{} tokens{})",
        mb(est.total),
        mb(est.weights),
        mb(est.trainable_state),
        mb(est.activations),
        o.batch_size,
        seq,
        if o.grad_checkpoint { ", checkpointed" } else { "" }
    ));
    say(
        o,
        &format!(
            "data: {} {} sequences for training, {} for eval; {total_steps} optimizer steps",
            train_ex.len(),
            format.as_str(),
            eval_ex.len()
        ),
    );
    if world > 1 {
        say(
            o,
            &format!(
                "data parallel: {world} ranks, each computing 1/{world} of every step's {} rows and summing {n_train} gradients per step",
                o.batch_size * o.grad_accum
            ),
        );
    }

    let mut eval_points: Vec<(usize, f64)> = kept_log
        .iter()
        .filter_map(|v| {
            Some((
                v.get("step")?.as_u64()? as usize,
                v.get("eval_loss")?.as_f64()?,
            ))
        })
        .collect();
    let mut train_points: Vec<(usize, f64)> = kept_log
        .iter()
        .filter_map(|v| Some((v.get("step")?.as_u64()? as usize, v.get("loss")?.as_f64()?)))
        .collect();
    if start_step == 0 && !eval_ex.is_empty() {
        let l = evaluate(&model, &active_of(&trainable), &eval_ex, o.batch_size)?;
        log.write(&json!({"step": 0, "eval_loss": l, "base_eval_loss": base_eval_loss}))?;
        eval_points.push((0, l));
    }

    let bar = if o.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(total_steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("valid template"),
        );
        bar
    };
    bar.set_position(start_step as u64);

    let mut losses = Vec::new();
    let mut last_checkpoint: Option<PathBuf> = resume_from.clone();
    let mut step = 0usize;
    let mut final_loss = train_points.last().map_or(f64::NAN, |p| p.1);
    let stop_at = o.stop_after.map_or(total_steps, |s| s.min(total_steps));
    'epochs: for epoch in 0.. {
        let plan = plan_epoch(epoch);
        if plan.is_empty() {
            break;
        }
        let steps_here = plan.len().div_ceil(o.grad_accum);
        for (k, group) in plan.chunks(o.grad_accum).enumerate() {
            if step >= stop_at {
                break 'epochs;
            }
            step += 1;
            if step <= start_step {
                continue;
            }
            let t0 = Instant::now();
            // The whole step's tokens (every rank knows the plan).
            let examples = || group.iter().flatten().flatten().map(|&i| &train_ex[i]);
            let step_tokens: usize = examples().map(Example::loss_tokens).sum();
            let input_tokens: usize = examples().map(|e| e.ids.len()).sum();
            // This rank's slice of the step's rows, in micro-batches numbered m·N + rank (the
            // dropout seed's index: with one rank, the micro-batch's index in the step).
            let step_rows = group.concat();
            let batches = comm::shard(&step_rows, rank, world)
                .chunks(o.batch_size)
                .enumerate()
                .map(|(m, rows)| {
                    Ok((
                        m * world + rank,
                        data::make_batch(&train_ex, rows, &device)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut acc: Vec<Option<Tensor>> = vec![None; trainable.vars.len()];
            let active = active_of(&trainable);
            let mut nll = 0.0;
            for (index, batch) in &batches {
                let seed = mix(mix(o.seed, step as u64), *index as u64);
                nll += forward_backward(
                    &model,
                    &active,
                    batch,
                    Some(seed),
                    1.0 / step_tokens as f64,
                    &trainable.vars,
                    &mut acc,
                    o.grad_checkpoint,
                )?;
            }
            let mut allreduce_s = None;
            if world > 1 {
                let t = Instant::now();
                nll = all_reduce_step(comm, &mut acc, &trainable.vars, nll)?;
                allreduce_s = Some(t.elapsed().as_secs_f64());
            }
            let mut loss = nll / step_tokens as f64;
            // AdaLoRA: + w·R(A, B), R the mean ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F (PEFT adds it to the loss).
            let mut orth_reg = None;
            if let Some(ada) = &trainable.adalora {
                let w = ada.config.schedule.orth_reg_weight;
                let reg = ada.orth_reg(&trainable.vars)?;
                if w > 0.0 {
                    let store = (&reg * w)?.backward()?;
                    add_grads(&mut acc, &trainable.vars, &store)?;
                }
                let r = to_f64(&reg.detach())?;
                loss += w * r;
                orth_reg = Some((nll / step_tokens as f64, r));
            }
            let nan_stop = |what: &str, value: f64| {
                let keep = match &last_checkpoint {
                    Some(p) => format!("the last good checkpoint is {}", p.display()),
                    None => "no checkpoint was saved (use --save-every N to keep one)".into(),
                };
                Error::Msg(format!(
                    "step {step}: {what} is {value} (lr {:.3e}); stopping before the update; {keep}",
                    schedule::lr_at(o.lr_schedule, o.lr, o.warmup_steps, total_steps, step)
                ))
            };
            if !loss.is_finite() {
                bar.abandon();
                return Err(nan_stop("the loss", loss));
            }
            let mut grads = acc
                .into_iter()
                .zip(&trainable.vars)
                .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let grad_norm = clip(&mut grads, o.max_grad_norm)?;
            if !grad_norm.is_finite() {
                bar.abandon();
                return Err(nan_stop("the gradient norm", grad_norm));
            }
            let lr = schedule::lr_at(o.lr_schedule, o.lr, o.warmup_steps, total_steps, step);
            optimizer.step(&trainable.vars, &grads, &trainable.decay, lr)?;
            // AdaLoRA: PEFT's update_and_allocate after optimizer.step(), before zero_grad.
            let allocation = match trainable.adalora.as_mut() {
                Some(ada) => Some(ada.after_step(step, &trainable.vars, &grads)?),
                None => None,
            };
            trainable.refresh()?;
            let secs = t0.elapsed().as_secs_f64();
            let tokens_per_s = input_tokens as f64 / secs.max(1e-9);
            let line = json!({
                "step": step,
                "epoch": epoch as f64 + (k + 1) as f64 / steps_here as f64,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": step_tokens,
                "tokens_per_s": tokens_per_s,
                "peak_rss_mb": memory::peak_rss_mb(),
                "elapsed_s": started.elapsed().as_secs_f64(),
            });
            let mut line = line;
            if let Some(seconds) = allreduce_s {
                line["world_size"] = json!(world);
                line["allreduce_s"] = json!(seconds);
            }
            if let (Some((nll_loss, reg)), Some(a)) = (orth_reg, &allocation) {
                line["nll"] = json!(nll_loss);
                line["orth_reg"] = json!(reg);
                line["budget"] = json!(a.budget);
                if let Some(mask) = &a.mask {
                    line["kept_rank"] = json!(mask.values().flatten().filter(|k| **k).count());
                }
            }
            if root {
                log.write(&line)?;
            }
            losses.push(loss);
            train_points.push((step, loss));
            final_loss = loss;
            bar.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"
            ));
            bar.inc(1);
            if o.save_every.is_some_and(|n| step % n == 0) {
                last_checkpoint = Some(if root {
                    save_checkpoint(&o.out, step, &trainable, &optimizer, o, &inputs)?
                } else {
                    checkpoint_dir(&o.out, step)
                });
            }
            if !eval_ex.is_empty()
                && o.eval_every.is_some_and(|n| step % n == 0)
                && step != total_steps
            {
                let l = evaluate(&model, &active_of(&trainable), &eval_ex, o.batch_size)?;
                log.write(&json!({"step": step, "eval_loss": l}))?;
                eval_points.push((step, l));
            }
        }
    }
    bar.finish_and_clear();
    let interrupted = step < total_steps;
    let eval_loss = if eval_ex.is_empty() || interrupted {
        None
    } else {
        let l = evaluate(&model, &active_of(&trainable), &eval_ex, o.batch_size)?;
        log.write(&json!({"step": step, "eval_loss": l}))?;
        eval_points.push((step, l));
        Some(l)
    };
    if root {
        plot::loss_svg(&o.out.join(PLOT_FILE), &train_points, &eval_points)?;
        if let (false, Some(ada)) = (interrupted, &trainable.adalora) {
            let table = ada.finish(&trainable.vars, &o.out)?;
            say(o, &table);
        } else if !interrupted {
            match trainable.export_adapter()? {
                Some(adapter) => adapter.save(&o.out)?,
                None => model.save_pretrained(&dir, &o.out)?,
            }
        }
    }
    let report = TrainReport {
        steps: step,
        final_loss,
        eval_loss,
        base_eval_loss,
        trainable_parameters: n_train,
        model_parameters,
        peak_rss_mb: memory::peak_rss_mb(),
        seconds: started.elapsed().as_secs_f64(),
        out: o.out.clone(),
        losses,
    };
    if root && !interrupted {
        lowrank_core::files::write_json(&o.out.join("train_report.json"), &report)?;
        say(
            o,
            &format!(
                "done: {} steps, final loss {:.4}{}; wrote {}",
                report.steps,
                report.final_loss,
                match (report.base_eval_loss, report.eval_loss) {
                    (Some(b), Some(e)) => format!(", eval loss {e:.4} (base {b:.4})"),
                    _ => String::new(),
                },
                o.out.display()
            ),
        );
    }
    // No rank reports success before rank 0 has written the adapter.
    comm.barrier()?;
    Ok(report)
}

/// Gradients of the mean token loss over `examples` (one padded batch, no dropout) for every
/// trainable tensor, by name; for tests and diagnostics.
pub fn gradients(
    model: &Llama,
    t: &Trainable,
    examples: &[Example],
    checkpoint: bool,
) -> Result<HashMap<String, Tensor>> {
    let rows: Vec<Vec<usize>> = (0..examples.len()).map(|i| vec![i]).collect();
    let batch = data::make_batch(examples, &rows, model.device())?;
    let active: Vec<ActiveAdapter> = t
        .adapter
        .as_ref()
        .map(ActiveAdapter::new)
        .into_iter()
        .collect();
    let mut acc = vec![None; t.vars.len()];
    forward_backward(
        model,
        &active,
        &batch,
        None,
        1.0 / batch.loss_tokens as f64,
        &t.vars,
        &mut acc,
        checkpoint,
    )?;
    Ok(t.names
        .iter()
        .cloned()
        .zip(acc)
        .filter_map(|(n, g)| g.map(|g| (n, g)))
        .collect())
}
