//! The whole demo pipeline at micro size, training in-process: seconds, not minutes.

use lowrank_demo::engine::Runner;
use lowrank_demo::pipeline::MARKER;
use lowrank_demo::tasks::Task;
use lowrank_demo::{DemoConfig, Progress};

#[test]
fn the_quick_pipeline_teaches_each_adapter_its_task() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let config = DemoConfig::quick();
    let report =
        lowrank_demo::run(&config, &out, &Runner::InProcess, &Progress::new(true)).unwrap();

    // Files: HF checkpoint + tokenizer, one PEFT folder per adapter, the full fine-tune, reports.
    for f in [
        "base/config.json",
        "base/model.safetensors",
        "base/tokenizer.json",
        "report.json",
        "report.md",
        MARKER,
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    for plan in &config.adapters {
        let dir = out.join("adapters").join(format!(
            "{}-{}",
            plan.task.name(),
            plan.method.label().to_lowercase()
        ));
        assert!(
            dir.join("adapter_config.json").exists()
                && dir.join("adapter_model.safetensors").exists(),
            "{}",
            dir.display()
        );
    }
    assert!(out
        .join("full")
        .join(config.full_task.name())
        .join("model.safetensors")
        .exists());

    // Rows: base, one per adapter, the full fine-tune; every row scored on every task.
    assert_eq!(report.rows.len(), config.adapters.len() + 2);
    let base = &report.rows[0];
    assert!(base.trained_on.is_none());
    for row in &report.rows {
        assert_eq!(row.scores.len(), Task::ALL.len(), "{}", row.label);
    }
    // Each adapter lowers the loss of its own task below the base's (the micro base model barely
    // knows its alphabet, so the margin is small but far above numerical noise).
    for row in &report.rows[1..] {
        let task = row.trained_on.unwrap();
        let (own, before) = (row.scores[&task].loss, base.scores[&task].loss);
        eprintln!("{}: {own:.3} vs base {before:.3}", row.label);
        assert!(
            own < before - 0.05,
            "{}: loss on {} {own} vs base {before}",
            row.label,
            task.name()
        );
    }
    // Merging changes nothing.
    assert_eq!(report.merges.len(), config.adapters.len());
    for m in &report.merges {
        assert_eq!(m.greedy_identical, m.prompts, "{}", m.adapter);
        assert!(
            m.max_abs_logit_diff < 1e-3,
            "{}: {}",
            m.adapter,
            m.max_abs_logit_diff
        );
    }
    // Costs: adapters train and store a small share of the model.
    let full = report.costs.last().unwrap();
    assert_eq!(full.trainable_parameters, report.model.parameters);
    for c in &report.costs[..report.costs.len() - 1] {
        assert!(
            c.trainable_parameters < full.trainable_parameters,
            "{}",
            c.label
        );
        assert!(c.file_bytes < full.file_bytes, "{}", c.label);
        assert!(
            c.peak_rss_mb.is_none(),
            "in-process runs do not claim a peak"
        );
    }

    // The rank sweep: one adapter per rank, scored and analysed.
    let sweep = report
        .rank_sweep
        .as_ref()
        .expect("the quick demo runs the sweep");
    let ranks: Vec<usize> = sweep.rows.iter().map(|r| r.rank).collect();
    assert_eq!(ranks, vec![1, 2, 4, 8, 16]);
    for pair in sweep.rows.windows(2) {
        assert!(pair[0].trainable_parameters < pair[1].trainable_parameters);
    }
    for row in &sweep.rows {
        assert_eq!(row.alpha, 2.0 * row.rank as f64);
        assert!(
            row.mean_effective_rank >= 1.0 && row.mean_effective_rank <= row.rank as f64 + 1e-9
        );
        assert!(
            row.mean_rank_for_90_percent >= 1.0 && row.mean_rank_for_90_percent <= row.rank as f64
        );
        for phi in [
            row.input_space.top_direction,
            row.input_space.whole_subspace,
            row.output_space.top_direction,
            row.output_space.whole_subspace,
        ] {
            assert!((0.0..=1.0 + 1e-9).contains(&phi), "r{}: {phi}", row.rank);
        }
        assert!(out
            .join("sweep")
            .join(format!("caesar-r{}", row.rank))
            .join("adapter_model.safetensors")
            .exists());
    }
    // The largest rank against itself is the same subspace.
    let last = sweep.rows.last().unwrap();
    assert!((last.input_space.whole_subspace - 1.0).abs() < 1e-9);
    assert!((last.output_space.whole_subspace - 1.0).abs() < 1e-9);
    for figure in &sweep.figures {
        let svg = std::fs::read_to_string(out.join(figure)).unwrap();
        assert!(svg.starts_with("<svg"), "{figure}");
    }
    assert_eq!(sweep.figures.len(), 2);

    // The report renders every section.
    let text = report.text();
    for needle in [
        "reverse acc / loss",
        "trainable params",
        "max |logit diff|",
        "Samples",
        "not measured",
        "Rank sweep on caesar",
        "LoRA r16",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| model |"), "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        json["rows"][0]["scores"]["reverse"]["examples"],
        config.task_eval
    );

    // A rerun into the same folder replaces the demo's files; a foreign folder is refused.
    std::fs::write(out.join("base").join("stale"), "x").unwrap();
    lowrank_demo::pipeline::prepare_out(&out).unwrap();
    assert!(!out.join("base").exists() && out.join(MARKER).exists());
    let foreign = tmp.path().join("mine");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "keep me").unwrap();
    let err = lowrank_demo::pipeline::prepare_out(&foreign)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not written by `lowrank demo`"), "{err}");
    assert_eq!(
        std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "keep me"
    );
}
