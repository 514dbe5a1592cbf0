//! The training loop: trainable tensors (adapter `Var`s or every weight), gradient
//! accumulation over micro-batches, clipping, the optimizer step, logging, eval, checkpoints,
//! resume and the NaN stop.
//!
//! A run ([`train_with`]) goes through named steps: open (load the model and data, check
//! `--out`, set up the trainable tensors, or resume from a checkpoint: see [`crate::checkpoint`]),
//! plan (count the steps, say what will be trained), step (one optimizer step), evaluate,
//! checkpoint, finish (final eval, adapter, report).
//!
//! Output folder: training_log.jsonl is created by its first line (a run that fails while
//! setting up leaves nothing that blocks its `--out`).
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

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use lowrank_core::lora::LoraAdapter;
use lowrank_core::{Error, Result};
use lowrank_models::{ActiveAdapter, Llama, Tokenizer};
use lowrank_quant::QuantSpec;
use serde_json::{json, Value};

use crate::checkpoint::{
    check_inputs, check_options, checkpoint_dir, find_checkpoint, input_identity, keep_log_until,
    remove_stale_staging, run_identity, save_checkpoint, LOG_FILE, OPTIMIZER_FILE, PLOT_FILE,
    STATE_FILE, TRAINABLE_FILE,
};
use crate::comm::{self, Communicator, SingleProcess};
use crate::data::{self, Batch, Example};
use crate::optim::{clip, Optimizer};
use crate::options::validate;
use crate::trainable::{setup_trainable, Trainable};
use crate::{memory, plot, schedule, ComputeDtype, TrainOptions, TrainReport};

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
        .map(|(d, a)| ActiveAdapter::with_coefficient(d, a.coefficient))
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
pub fn train_with(opts: &TrainOptions, comm: &dyn Communicator) -> Result<TrainReport> {
    let started = Instant::now();
    // Only rank 0 speaks.
    let quiet;
    let o = if comm.rank() == 0 {
        opts
    } else {
        quiet = TrainOptions {
            quiet: true,
            ..opts.clone()
        };
        &quiet
    };
    validate(o)?;
    if o.compute_dtype == ComputeDtype::Bf16 {
        // A bad LOWRANK_BF16_GEMM stops the run before anything is written.
        lowrank_kernels::bf16_gemm::bf16_kernel()?;
    }
    let mut run = Run::open(o, comm, started)?;
    run.plan()?;
    let steps = run.steps()?;
    run.finish(steps)
}

/// The training and eval examples of a run.
struct Examples {
    format: data::Format,
    train: Vec<Example>,
    /// Empty on ranks other than 0 (only rank 0 evaluates).
    eval: Vec<Example>,
}

/// A run between its steps: what [`Run::open`] set up and what the steps so far recorded.
struct Run<'a> {
    o: &'a TrainOptions,
    comm: &'a dyn Communicator,
    root: bool,
    started: Instant,
    model_dir: PathBuf,
    model: Llama,
    examples: Examples,
    /// The model and data, recorded in checkpoints (see `input_identity`).
    inputs: Value,
    base_eval_loss: Option<f64>,
    trainable: Trainable,
    optimizer: Optimizer,
    resume_from: Option<PathBuf>,
    /// Steps done before this invocation (0 unless resumed).
    start_step: usize,
    /// Set by [`Run::plan`].
    total_steps: usize,
    log: Log,
    /// The loss curves of loss.svg, (step, loss), the log's kept lines' included.
    train_points: Vec<(usize, f64)>,
    eval_points: Vec<(usize, f64)>,
    /// This invocation's step losses.
    losses: Vec<f64>,
    last_checkpoint: Option<PathBuf>,
}

/// What one optimizer step computed.
struct StepResult {
    loss: f64,
    lr: f64,
    tokens_per_s: f64,
    /// The line it adds to training_log.jsonl.
    line: Value,
}

impl<'a> Run<'a> {
    /// Loads the model and data, checks `--out` and the ranks agree, evaluates the base, sets up
    /// the trainable tensors and the optimizer, and restores a checkpoint on `--resume`.
    fn open(o: &'a TrainOptions, comm: &'a dyn Communicator, started: Instant) -> Result<Self> {
        let root = comm.rank() == 0;
        let model_dir = lowrank_models::checkpoint::resolve_model_dir(&o.model)?;
        let load = lowrank_models::LoadOptions {
            quantize: o.quantize.map(QuantSpec::validated).transpose()?,
        };
        let mut model = Llama::load_with(&model_dir, &Device::Cpu, &load)?;
        if model.is_quantized() {
            say(o, &model.linear_memory().summary());
        }
        let tokenizer = Tokenizer::load(&model_dir)?;
        let examples = load_examples(o, &model, &tokenizer, root)?;

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
            return Err(Error::RunExists {
                out: o.out.clone(),
                log: LOG_FILE.into(),
            });
        }
        let inputs = input_identity(o, &model_dir)?;
        check_ranks_agree(comm, o, &inputs)?;

        let base_eval_loss = if examples.eval.is_empty() {
            None
        } else {
            Some(evaluate(&model, &[], &examples.eval, o.batch_size)?)
        };
        let trainable = setup_trainable(&mut model, o)?;
        if o.compute_dtype == ComputeDtype::Bf16 {
            // After the adapters' set-up, which may read W in f32 (PiSSA's SVD, DoRA's ‖W‖).
            model.compute_in_bf16()?;
        }
        let optimizer =
            Optimizer::new(o.optimizer, &trainable.vars, o.weight_decay, o.betas, o.eps)?;
        let mut run = Run {
            o,
            comm,
            root,
            started,
            model_dir,
            model,
            examples,
            inputs,
            base_eval_loss,
            trainable,
            optimizer,
            last_checkpoint: resume_from.clone(),
            resume_from,
            start_step: 0,
            total_steps: 0,
            log: Log {
                file: None,
                path: log_path,
            },
            train_points: Vec::new(),
            eval_points: Vec::new(),
            losses: Vec::new(),
        };
        if let Some(ckpt) = run.resume_from.clone() {
            run.resume(&ckpt)?;
        }
        Ok(run)
    }

    /// Restores the checkpoint `ckpt` (refusing other options or inputs) and keeps the log up
    /// to it.
    fn resume(&mut self, ckpt: &Path) -> Result<()> {
        let o = self.o;
        let state: Value = lowrank_core::files::read_json(&ckpt.join(STATE_FILE))?;
        check_options(ckpt, &state, o)?;
        check_inputs(ckpt, state.get("inputs"), &self.inputs)?;
        let start_step = state.get("step").and_then(Value::as_u64).unwrap_or(0) as usize;
        let device = self.model.device().clone();
        let tensors = candle_core::safetensors::load(ckpt.join(TRAINABLE_FILE), &device)?;
        for (name, v) in self.trainable.names.iter().zip(&self.trainable.vars) {
            let t = tensors.get(name).ok_or_else(|| {
                Error::tensors(ckpt.join(TRAINABLE_FILE), format!("missing {name:?}"))
            })?;
            v.set(t)?;
        }
        if self.optimizer.slots() > 0 {
            let state_t = candle_core::safetensors::load(ckpt.join(OPTIMIZER_FILE), &device)?;
            let steps = state
                .get("optimizer_steps")
                .and_then(Value::as_u64)
                .unwrap_or(start_step as u64) as usize;
            self.optimizer
                .load_state(&self.trainable.names, &state_t, steps)?;
        } else {
            self.optimizer.t = start_step;
        }
        if self.root {
            let kept = keep_log_until(&self.log.path, start_step)?;
            for v in &kept {
                let step = v.get("step").and_then(Value::as_u64).map(|s| s as usize);
                if let (Some(step), Some(loss)) = (step, v.get("loss").and_then(Value::as_f64)) {
                    self.train_points.push((step, loss));
                }
                if let (Some(step), Some(l)) = (step, v.get("eval_loss").and_then(Value::as_f64)) {
                    self.eval_points.push((step, l));
                }
            }
            remove_stale_staging(&o.out)?;
        }
        self.start_step = start_step;
        say(
            o,
            &format!("resuming from {} (step {start_step})", ckpt.display()),
        );
        Ok(())
    }

    /// The micro-batches of `epoch` (seeded order), grouped `--grad-accum` to a step.
    fn plan_epoch(&self, epoch: usize) -> Vec<data::Rows> {
        let o = self.o;
        let order = data::epoch_order(self.examples.train.len(), o.seed, epoch, o.shuffle);
        data::plan_micro_batches(
            &self.examples.train,
            &order,
            o.batch_size,
            o.pack,
            o.max_len,
        )
    }

    /// Counts the run's steps, starts AdaLoRA's schedule, says what will be trained and
    /// evaluates the starting point.
    fn plan(&mut self) -> Result<()> {
        let o = self.o;
        self.total_steps = match o.max_steps {
            Some(n) => n,
            None => (0..o.epochs)
                .map(|e| self.plan_epoch(e).len().div_ceil(o.grad_accum))
                .sum(),
        };
        if let Some(ada) = self.trainable.adalora.as_mut() {
            ada.start(&self.trainable.vars, self.total_steps)?;
            if let Some(ckpt) = &self.resume_from {
                ada.load_state(ckpt)?;
            }
            self.trainable.refresh()?;
        }
        // The flat gradient buffers of the ranks must be the same length.
        let n_train = self.trainable.num_parameters();
        comm::check_same(
            self.comm,
            "the trainable parameter count",
            &n_train.to_string(),
        )?;
        self.say_plan(n_train);
        if self.start_step == 0 && !self.examples.eval.is_empty() {
            let l = self.evaluate()?;
            self.log.write(
                &json!({"step": 0, "eval_loss": l, "base_eval_loss": self.base_eval_loss}),
            )?;
            self.eval_points.push((0, l));
        }
        Ok(())
    }

    /// The summary lines before the first step: trainable share, memory estimate, data.
    fn say_plan(&self, n_train: usize) {
        let o = self.o;
        let world = self.comm.size();
        let model_parameters = self.model.config().num_parameters();
        let longest = self
            .examples
            .train
            .iter()
            .map(|e| e.ids.len())
            .max()
            .unwrap_or(1);
        let seq = if o.pack { o.max_len } else { longest };
        let est = memory::estimate(
            self.model.config(),
            n_train,
            self.optimizer.slots(),
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
                "data: {} {} sequences for training, {} for eval; {} optimizer steps",
                self.examples.train.len(),
                self.examples.format.as_str(),
                self.examples.eval.len(),
                self.total_steps
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
    }

    /// Takes the steps from the resume point to the end (or `stop_after`), logging each,
    /// checkpointing and evaluating as asked; returns the number of the last step taken.
    // `step % n == 0` rather than `is_multiple_of`, which needs Rust 1.87 (the workspace says 1.85).
    #[allow(clippy::manual_is_multiple_of)]
    fn steps(&mut self) -> Result<usize> {
        let o = self.o;
        let bar = progress_bar(o.quiet, self.total_steps, self.start_step);
        let mut step = 0usize;
        let stop_at = o
            .stop_after
            .map_or(self.total_steps, |s| s.min(self.total_steps));
        'epochs: for epoch in 0.. {
            let plan = self.plan_epoch(epoch);
            if plan.is_empty() {
                break;
            }
            let steps_here = plan.len().div_ceil(o.grad_accum);
            for (k, group) in plan.chunks(o.grad_accum).enumerate() {
                if step >= stop_at {
                    break 'epochs;
                }
                step += 1;
                if step <= self.start_step {
                    continue;
                }
                let epoch_progress = epoch as f64 + (k + 1) as f64 / steps_here as f64;
                let result = match self.step(step, epoch_progress, group) {
                    Ok(result) => result,
                    Err(err) => {
                        bar.abandon();
                        return Err(err);
                    }
                };
                if self.root {
                    self.log.write(&result.line)?;
                }
                let StepResult {
                    loss,
                    lr,
                    tokens_per_s,
                    ..
                } = result;
                self.losses.push(loss);
                self.train_points.push((step, loss));
                bar.set_message(format!(
                    "loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"
                ));
                bar.inc(1);
                if o.save_every.is_some_and(|n| step % n == 0) {
                    self.checkpoint(step)?;
                }
                if !self.examples.eval.is_empty()
                    && o.eval_every.is_some_and(|n| step % n == 0)
                    && step != self.total_steps
                {
                    let l = self.evaluate()?;
                    self.log.write(&json!({"step": step, "eval_loss": l}))?;
                    self.eval_points.push((step, l));
                }
            }
        }
        bar.finish_and_clear();
        Ok(step)
    }

    /// One optimizer step over `group`, the step's micro-batches: this rank's forward and
    /// backward passes, the all-reduce, AdaLoRA's regularizer, the NaN stop, clipping, the
    /// update and AdaLoRA's allocation.
    fn step(
        &mut self,
        step: usize,
        epoch_progress: f64,
        group: &[data::Rows],
    ) -> Result<StepResult> {
        let o = self.o;
        let t0 = Instant::now();
        // The whole step's tokens (every rank knows the plan).
        let examples = || {
            group
                .iter()
                .flatten()
                .flatten()
                .map(|&i| &self.examples.train[i])
        };
        let step_tokens: usize = examples().map(Example::loss_tokens).sum();
        let input_tokens: usize = examples().map(|e| e.ids.len()).sum();
        let (mut acc, nll, allreduce_s) = self.step_gradients(step, group, step_tokens)?;
        let mut loss = nll / step_tokens as f64;
        let orth_reg = self.add_orth_reg(&mut acc)?;
        if let Some((weight, value)) = orth_reg {
            loss += weight * value;
        }
        let vars = &self.trainable.vars;
        let lr = schedule::lr_at(o.lr_schedule, o.lr, o.warmup_steps, self.total_steps, step);
        if !loss.is_finite() {
            return Err(self.nan_stop(step, lr, "the loss", loss));
        }
        let mut grads = acc
            .into_iter()
            .zip(vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let grad_norm = clip(&mut grads, o.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(self.nan_stop(step, lr, "the gradient norm", grad_norm));
        }
        self.optimizer
            .step(vars, &grads, &self.trainable.decay, lr)?;
        // AdaLoRA: PEFT's update_and_allocate after optimizer.step(), before zero_grad.
        let allocation = match self.trainable.adalora.as_mut() {
            Some(ada) => Some(ada.after_step(step, &self.trainable.vars, &grads)?),
            None => None,
        };
        self.trainable.refresh()?;
        let secs = t0.elapsed().as_secs_f64();
        let tokens_per_s = input_tokens as f64 / secs.max(1e-9);
        let mut line = json!({
            "step": step,
            "epoch": epoch_progress,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step_tokens,
            "tokens_per_s": tokens_per_s,
            "peak_rss_mb": memory::peak_rss_mb(),
            "elapsed_s": self.started.elapsed().as_secs_f64(),
        });
        if let Some(seconds) = allreduce_s {
            line["world_size"] = json!(self.comm.size());
            line["allreduce_s"] = json!(seconds);
        }
        if let (Some((_, reg)), Some(a)) = (orth_reg, &allocation) {
            line["nll"] = json!(nll / step_tokens as f64);
            line["orth_reg"] = json!(reg);
            line["budget"] = json!(a.budget);
            if let Some(mask) = &a.mask {
                line["kept_rank"] = json!(mask.values().flatten().filter(|k| **k).count());
            }
        }
        Ok(StepResult {
            loss,
            lr,
            tokens_per_s,
            line,
        })
    }

    /// This rank's forward and backward passes over its slice of the step's rows, the loss
    /// scaled by the step's loss tokens, then (data parallel) the sum over the ranks: the
    /// gradients, the summed NLL, and the all-reduce's seconds.
    fn step_gradients(
        &self,
        step: usize,
        group: &[data::Rows],
        step_tokens: usize,
    ) -> Result<(Vec<Option<Tensor>>, f64, Option<f64>)> {
        let o = self.o;
        let (rank, world) = (self.comm.rank(), self.comm.size());
        // This rank's slice of the step's rows, in micro-batches numbered m·N + rank (the
        // dropout seed's index: with one rank, the micro-batch's index in the step).
        let step_rows = group.concat();
        let batches = comm::shard(&step_rows, rank, world)
            .chunks(o.batch_size)
            .enumerate()
            .map(|(m, rows)| {
                Ok((
                    m * world + rank,
                    data::make_batch(&self.examples.train, rows, self.model.device())?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let vars = &self.trainable.vars;
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let active = active_of(&self.trainable);
        let mut nll = 0.0;
        for (index, batch) in &batches {
            let seed = mix(mix(o.seed, step as u64), *index as u64);
            nll += forward_backward(
                &self.model,
                &active,
                batch,
                Some(seed),
                1.0 / step_tokens as f64,
                vars,
                &mut acc,
                o.grad_checkpoint,
            )?;
        }
        let mut allreduce_s = None;
        if world > 1 {
            let t = Instant::now();
            nll = all_reduce_step(self.comm, &mut acc, vars, nll)?;
            allreduce_s = Some(t.elapsed().as_secs_f64());
        }
        Ok((acc, nll, allreduce_s))
    }

    /// AdaLoRA: adds the gradients of w·R(A, B), R the mean ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F (PEFT adds
    /// it to the loss), to `acc`; returns (w, R), none for other methods.
    fn add_orth_reg(&self, acc: &mut [Option<Tensor>]) -> Result<Option<(f64, f64)>> {
        let Some(ada) = &self.trainable.adalora else {
            return Ok(None);
        };
        let vars = &self.trainable.vars;
        let weight = ada.config.schedule.orth_reg_weight;
        let reg = ada.orth_reg(vars)?;
        if weight > 0.0 {
            let store = (&reg * weight)?.backward()?;
            add_grads(acc, vars, &store)?;
        }
        Ok(Some((weight, to_f64(&reg.detach())?)))
    }

    /// The error that stops a run whose loss or gradient norm is not finite, before the update.
    fn nan_stop(&self, step: usize, lr: f64, what: &str, value: f64) -> Error {
        Error::Diverged {
            step,
            what: what.into(),
            value,
            lr,
            last_checkpoint: self.last_checkpoint.clone(),
        }
    }

    /// Writes checkpoint-`step` (rank 0; the others only note its folder).
    fn checkpoint(&mut self, step: usize) -> Result<()> {
        self.last_checkpoint = Some(if self.root {
            save_checkpoint(
                &self.o.out,
                step,
                &self.trainable,
                &self.optimizer,
                self.o,
                &self.inputs,
            )?
        } else {
            checkpoint_dir(&self.o.out, step)
        });
        Ok(())
    }

    /// The eval loss of the model with the adapters as they are now.
    fn evaluate(&self) -> Result<f64> {
        evaluate(
            &self.model,
            &active_of(&self.trainable),
            &self.examples.eval,
            self.o.batch_size,
        )
    }

    /// After the last step: the final eval, loss.svg, the adapter (or full checkpoint) and
    /// train_report.json; nothing of the result when the run stopped early (`stop_after`).
    fn finish(mut self, step: usize) -> Result<TrainReport> {
        let o = self.o;
        let interrupted = step < self.total_steps;
        let eval_loss = if self.examples.eval.is_empty() || interrupted {
            None
        } else {
            let l = self.evaluate()?;
            self.log.write(&json!({"step": step, "eval_loss": l}))?;
            self.eval_points.push((step, l));
            Some(l)
        };
        if self.root {
            plot::loss_svg(
                &o.out.join(PLOT_FILE),
                &self.train_points,
                &self.eval_points,
            )?;
            if let (false, Some(ada)) = (interrupted, &self.trainable.adalora) {
                let table = ada.finish(&self.trainable.vars, &o.out)?;
                say(o, &table);
            } else if !interrupted {
                match self.trainable.export_adapter()? {
                    Some(adapter) => adapter.save(&o.out)?,
                    None => self.model.save_pretrained(&self.model_dir, &o.out)?,
                }
            }
        }
        let report = TrainReport {
            steps: step,
            final_loss: self.train_points.last().map_or(f64::NAN, |p| p.1),
            eval_loss,
            base_eval_loss: self.base_eval_loss,
            trainable_parameters: self.trainable.num_parameters(),
            model_parameters: self.model.config().num_parameters(),
            peak_rss_mb: memory::peak_rss_mb(),
            seconds: self.started.elapsed().as_secs_f64(),
            out: o.out.clone(),
            losses: self.losses,
        };
        if self.root && !interrupted {
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
        self.comm.barrier()?;
        Ok(report)
    }
}

/// Loads `--data` and the eval examples (`--eval-data` or `--eval-split`; rank 0 only),
/// checking every token id against the model.
fn load_examples(
    o: &TrainOptions,
    model: &Llama,
    tokenizer: &Tokenizer,
    root: bool,
) -> Result<Examples> {
    let (format, train, dropped) = data::load(&o.data, tokenizer, o.max_len)?;
    let (train, eval) = match (&o.eval_data, o.eval_split) {
        (Some(path), _) => (train, data::load(path, tokenizer, o.max_len)?.1),
        (None, Some(f)) => data::split(train, f, o.seed)?,
        (None, None) => (train, vec![]),
    };
    // Only rank 0 evaluates (the others go on to the next step's all-reduce).
    let eval = if root { eval } else { Vec::new() };
    for (set, file) in [
        (&train, &o.data),
        (&eval, o.eval_data.as_ref().unwrap_or(&o.data)),
    ] {
        for ex in set {
            model
                .check_ids(&ex.ids)
                .map_err(|e| Error::file(file, format!("{e} (tokenizer and model disagree)")))?;
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
    Ok(Examples {
        train,
        eval,
        format,
    })
}

/// Refuses to go on unless every rank has the same options, model and data.
fn check_ranks_agree(comm: &dyn Communicator, o: &TrainOptions, inputs: &Value) -> Result<()> {
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
    Ok(())
}

/// The progress bar (hidden with `--quiet`), at `start` of `total` steps.
fn progress_bar(quiet: bool, total: usize, start: usize) -> indicatif::ProgressBar {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("valid template"),
        );
        bar
    };
    bar.set_position(start as u64);
    bar
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
