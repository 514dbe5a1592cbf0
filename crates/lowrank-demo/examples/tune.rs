//! Tuning aid: train one adapter on an existing demo base and score it.
//! `cargo run --release -p lowrank-demo --example tune -- DEMO_OUT TASK METHOD STEPS LR [RANK] [BATCH]`

use lowrank_demo::engine::{options, train_here};
use lowrank_demo::tasks::Task;
use lowrank_models::{ActiveAdapter, Llama, Tokenizer};
use lowrank_train::{Method, TrainOptions};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let out = std::path::PathBuf::from(&a[0]);
    let task = Task::ALL.into_iter().find(|t| t.name() == a[1]).unwrap();
    let method: Method = a[2].parse().map_err(anyhow::Error::msg)?;
    let steps: usize = a[3].parse()?;
    let lr: f64 = a[4].parse()?;
    let rank: usize = a.get(5).map_or(Ok(8), |s| s.parse())?;
    let batch: usize = a.get(6).map_or(Ok(16), |s| s.parse())?;
    let dir = out.join(format!(
        "tune-{}-{}-{steps}-{lr}-{rank}-{batch}",
        a[1], a[2]
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let base = out.join("base");
    let t = std::time::Instant::now();
    let o = train_here(&TrainOptions {
        method,
        rank,
        alpha: 2.0 * rank as f64,
        lr,
        warmup_steps: 20,
        batch_size: batch,
        max_len: 32,
        quiet: true,
        ..options(
            &base,
            &out.join(format!("data/{}_train.jsonl", task.name())),
            &dir,
            steps,
        )
    })?;
    let model = Llama::load(&base, &candle_core::Device::Cpu)?;
    let tok = Tokenizer::load(&base)?;
    let (_, eval) = task.splits(0, 200, 0);
    let base_score = lowrank_demo::evaluate::score(&model, &tok, &[], &eval)?;
    let score = if method == Method::Full {
        lowrank_demo::evaluate::score(
            &Llama::load(&dir, &candle_core::Device::Cpu)?,
            &tok,
            &[],
            &eval,
        )?
    } else {
        let adapter = model.load_adapter(&dir)?;
        lowrank_demo::evaluate::score(&model, &tok, &[ActiveAdapter::new(&adapter)], &eval)?
    };
    println!(
        "{} {} steps {steps} lr {lr} r {rank} b {batch}: train loss {:.3}, eval loss {:.3} acc {:.1}% (base {:.3} {:.1}%) in {:.0}s",
        a[1], a[2], o.final_loss, score.loss, 100.0 * score.accuracy, base_score.loss, 100.0 * base_score.accuracy, t.elapsed().as_secs_f64()
    );
    Ok(())
}
