//! DoRA's training step against LoRA's in one process, step by step.
//!
//! `cargo bench -p lowrank-train --bench train_pair -- MODEL_DIR [ROUNDS]`
//! (`scripts/bench.py` runs it on its SmolLM-135M-shaped model).
//!
//! Both train r = 16 adapters on all linear layers with AdamW over the same batch of 4 × 256
//! random tokens. A shared host's speed moves by tens of percent within a minute, so two
//! separate runs cannot show whether DoRA costs 10% or 25% more; here each round times one
//! step of each (the order alternating) and the figure is the median of the rounds' ratios.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use lowrank_models::{ActiveAdapter, Llama};
use lowrank_train::data::{make_batch, Batch, Example};
use lowrank_train::optim::{clip, Optimizer};
use lowrank_train::trainable::{setup_trainable, Trainable};
use lowrank_train::trainer::forward_backward;
use lowrank_train::{Method, TrainOptions};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const ROWS: usize = 4;
const SEQ: usize = 256;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One method's adapter and optimizer state.
struct Run {
    name: &'static str,
    trainable: Trainable,
    optimizer: Optimizer,
}

impl Run {
    fn new(model: &mut Llama, method: Method, name: &'static str) -> Res<Self> {
        let opts = TrainOptions {
            method,
            ..TrainOptions::default()
        };
        let trainable = setup_trainable(model, &opts)?;
        let optimizer = Optimizer::new(
            opts.optimizer,
            &trainable.vars,
            opts.weight_decay,
            opts.betas,
            opts.eps,
        )?;
        Ok(Run {
            name,
            trainable,
            optimizer,
        })
    }

    /// One optimizer step over `batch`, as `lowrank train` takes it; returns its seconds.
    fn step(&mut self, model: &Llama, batch: &Batch, seed: u64) -> Res<f64> {
        let start = Instant::now();
        let active: Vec<ActiveAdapter> = self
            .trainable
            .adapter
            .as_ref()
            .map(ActiveAdapter::new)
            .into_iter()
            .collect();
        let vars = &self.trainable.vars;
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let scale = 1.0 / batch.loss_tokens as f64;
        forward_backward(
            model,
            &active,
            batch,
            Some(seed),
            scale,
            vars,
            &mut acc,
            false,
        )?;
        let mut grads = acc
            .into_iter()
            .zip(vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        clip(&mut grads, 1.0)?;
        self.optimizer
            .step(vars, &grads, &self.trainable.decay, 1e-4)?;
        Ok(start.elapsed().as_secs_f64())
    }
}

fn main() -> Res<()> {
    // As the CLI does: no spinning in candle's pool, freed memory kept by malloc, the main
    // thread one of rayon's workers.
    lowrank_kernels::process::set_up();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [model_dir, rest @ ..] = args.as_slice() else {
        eprintln!("usage: train_pair MODEL_DIR [ROUNDS]");
        std::process::exit(2);
    };
    let rounds: usize = match rest.first() {
        Some(n) => n.parse()?,
        None => 8,
    };
    let device = Device::Cpu;
    let mut model = Llama::load(Path::new(model_dir), &device)?;
    let vocab = model.config().vocab_size as u64;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let examples: Vec<Example> = (0..ROWS)
        .map(|_| Example {
            ids: (0..SEQ)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 33) % vocab) as u32
                })
                .collect(),
            targets: vec![true; SEQ],
        })
        .collect();
    let rows: Vec<Vec<usize>> = (0..ROWS).map(|i| vec![i]).collect();
    let batch = make_batch(&examples, &rows, &device)?;
    let mut runs = [
        Run::new(&mut model, Method::Lora, "LoRA")?,
        Run::new(&mut model, Method::Dora, "DoRA")?,
    ];
    // Warm-up: the first steps pay for allocation.
    for run in runs.iter_mut() {
        for seed in 0..2 {
            run.step(&model, &batch, seed)?;
        }
    }
    let mut times = vec![Vec::with_capacity(rounds); runs.len()];
    for round in 0..rounds {
        for k in 0..runs.len() {
            let i = (round + k) % runs.len();
            times[i].push(runs[i].step(&model, &batch, 2 + round as u64)?);
        }
    }
    for (run, t) in runs.iter().zip(&times) {
        println!("{}: {:.3} s per step (median)", run.name, median(t.clone()));
    }
    let ratios = times[1].iter().zip(&times[0]).map(|(d, l)| d / l).collect();
    println!(
        "per-round ratios over {rounds} rounds: DoRA / LoRA {:.3}",
        median(ratios)
    );
    Ok(())
}
