//! `--model x.gguf` through the binary: eval (with a PEFT adapter), merge to an HF folder,
//! generate, and damaged files.

mod common;

use common::*;

fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join(format!("reference/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn loss(out: &std::process::Output) -> f64 {
    json_out(out)["loss"].as_f64().unwrap()
}

/// A PEFT adapter of the HF model applies unchanged over its GGUF conversion.
#[test]
fn eval_over_a_gguf_base_gives_the_hf_models_loss() {
    let model = fx("gguf/llama-tied-f32.gguf");
    let data = fx("data/eval.jsonl");
    let base = loss(&lowrank(&["eval", "--model", &model, "--data", &data]));
    let want = reference("llama-tied")["loss"].as_f64().unwrap();
    assert!((base - want).abs() < 1e-5, "{base} vs {want}");
    let adapter = fx("adapters/llama-tied__lora-qv");
    let adapted = loss(&lowrank(&[
        "eval",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--data",
        &data,
    ]));
    let want = reference("llama-tied__lora-qv")["loss"].as_f64().unwrap();
    assert!((adapted - want).abs() < 1e-5, "{adapted} vs {want}");
}

/// Merging over a GGUF base writes a complete HF folder: config and tokenizer from the GGUF
/// metadata, and the merged model's loss is PEFT's.
#[test]
fn merge_over_a_gguf_base_writes_a_complete_hf_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("merged");
    let out_s = out_dir.to_string_lossy().into_owned();
    ok(&lowrank(&[
        "merge",
        "--model",
        &fx("gguf/qwen2-tied-f32.gguf"),
        "--adapter",
        &fx("adapters/qwen2-tied__regex"),
        "--out",
        &out_s,
    ]));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out_dir.join(f).exists(), "{f} missing");
    }
    let got = loss(&lowrank(&[
        "eval",
        "--model",
        &out_s,
        "--data",
        &fx("data/eval.jsonl"),
    ]));
    let want = reference("qwen2-tied__regex")["loss"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
}

#[test]
fn generate_reads_the_gguf_tokenizer_and_chat_template() {
    let out = ok(&lowrank(&[
        "generate",
        "--model",
        &fx("gguf/qwen2-tied-q8_0.gguf"),
        "--prompt",
        "The quick cat",
        "--chat",
        "--max-tokens",
        "4",
    ]));
    assert!(!out.is_empty());
}

#[test]
fn damaged_or_unsupported_gguf_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("gguf/llama-tied-f32.gguf")).unwrap();
    let truncated = tmp.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let data = fx("data/eval.jsonl");
    let out = lowrank(&[
        "eval",
        "--model",
        truncated.to_str().unwrap(),
        "--data",
        &data,
    ]);
    assert_fails_with(
        &out,
        &[
            "truncated.gguf",
            "truncated GGUF file",
            "the data of tensor",
        ],
    );
    // general.architecture = "llama" becomes "lamma".
    let at = bytes.windows(5).position(|w| w == b"llama").unwrap();
    let mut renamed = bytes.clone();
    renamed[at..at + 5].copy_from_slice(b"lamma");
    let unknown = tmp.path().join("unknown.gguf");
    std::fs::write(&unknown, renamed).unwrap();
    let out = lowrank(&[
        "eval",
        "--model",
        unknown.to_str().unwrap(),
        "--data",
        &data,
    ]);
    assert_fails_with(
        &out,
        &[
            "unknown.gguf",
            "general.architecture",
            "\"lamma\" is not supported",
        ],
    );
}

/// export-gguf writes the file llama.cpp's convert_lora_to_gguf.py writes, byte for byte
/// (fixtures/gguf/lora): keys, tensor names, the q/k permutation of B, data and layout; a
/// mistral base converts as llama; each family (qwen3, phi3, gemma2, gemma3) its own way.
#[test]
fn export_gguf_equals_llama_cpps_converter() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cases: Vec<(String, String, String)> = [
        "llama-tied__lora-qv",
        "qwen2-tied__regex",
        "mistral__layers",
    ]
    .iter()
    .map(|a| {
        let base = a.split("__").next().unwrap();
        (
            a.to_string(),
            format!("adapters/{a}"),
            format!("models/{base}"),
        )
    })
    .collect();
    // Each family's all-linear adapter (Phi-3: on the fused qkv_proj and gate_up_proj).
    for family in ["qwen3", "phi3", "gemma2", "gemma3"] {
        cases.push((
            format!("{family}__all-linear"),
            format!("families/{family}/adapters/all-linear"),
            format!("families/{family}/model"),
        ));
    }
    for (adapter, adapter_dir, base) in cases {
        let out = tmp.path().join(format!("{adapter}.gguf"));
        ok(&lowrank(&[
            "export-gguf",
            &fx(&adapter_dir),
            "--model",
            &fx(&base),
            "--out",
            out.to_str().unwrap(),
        ]));
        let ours = std::fs::read(&out).unwrap();
        let theirs = std::fs::read(fixtures().join(format!("gguf/lora/{adapter}.gguf"))).unwrap();
        assert!(ours == theirs, "{adapter}: the GGUF files differ");
    }
}

/// An adapter directory copied from a fixture with its adapter_config.json edited.
fn edited_adapter(
    tmp: &std::path::Path,
    from: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> String {
    let dir = tmp.join(format!("{from}-edited"));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("adapters").join(from);
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    dir.to_string_lossy().into_owned()
}

/// rsLoRA with one rank is written with the alpha that gives PEFT's scale under llama.cpp's
/// alpha / rank (alpha·√r); where no single alpha does (rsLoRA with several ranks, alpha
/// patterns) and for DoRA, export-gguf refuses.
#[test]
fn export_gguf_keeps_peft_scales_or_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let rslora = edited_adapter(tmp.path(), "llama-tied__lora-qv", |c| {
        c["use_rslora"] = true.into()
    });
    let out = tmp.path().join("rslora.gguf");
    let model = fx("models/llama-tied");
    ok(&lowrank(&[
        "export-gguf",
        &rslora,
        "--model",
        &model,
        "--out",
        out.to_str().unwrap(),
    ]));
    let file = lowrank_gguf::GgufFile::open(&out).unwrap();
    // lora_alpha 8, r 4: PEFT's scale 8/√4 = 4 = alpha'/4 with alpha' = 16.
    assert_eq!(file.f64("adapter.lora.alpha").unwrap(), 16.0);
    let out = tmp.path().join("refused.gguf");
    let refused = lowrank(&[
        "export-gguf",
        &fx("adapters/llama-untied__all-linear"),
        "--model",
        &fx("models/llama-untied"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_fails_with(&refused, &["one alpha", "llama-untied__all-linear"]);
    assert!(!out.exists());
    let dora = lowrank(&[
        "export-gguf",
        &fx("adapters/llama-tied__dora"),
        "--model",
        &model,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_fails_with(&dora, &["DoRA", "llama.cpp has no DoRA"]);
    assert!(!out.exists());
}

/// `merge --out x.gguf` writes what convert_hf_to_gguf.py writes for PEFT's merged checkpoint
/// (fixtures/gguf/merged): every metadata key and value, every tensor's name, type, shape and
/// bytes; and the file loads back with the merged model's loss.
#[test]
fn merge_to_gguf_equals_the_converter_on_the_merged_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    for (adapter, gguf_type) in [
        ("llama-tied__lora-qv", "f32"),
        ("llama-tied__lora-qv", "q8_0"),
        ("qwen2-tied__regex", "f16"),
    ] {
        let base = adapter.split("__").next().unwrap();
        let dir = tmp.path().join(gguf_type);
        std::fs::create_dir_all(&dir).unwrap();
        // general.name comes from the file name, as the converter's from the folder's.
        let out = dir.join(format!("{adapter}.gguf"));
        ok(&lowrank(&[
            "merge",
            "--model",
            &fx(&format!("models/{base}")),
            "--adapter",
            &fx(&format!("adapters/{adapter}")),
            "--out",
            out.to_str().unwrap(),
            "--gguf-type",
            gguf_type,
        ]));
        let ours = lowrank_gguf::GgufFile::open(&out).unwrap();
        let theirs = lowrank_gguf::GgufFile::open(
            &fixtures().join(format!("gguf/merged/{adapter}-{gguf_type}.gguf")),
        )
        .unwrap();
        assert_eq!(
            ours.metadata(),
            theirs.metadata(),
            "{adapter} {gguf_type}: metadata"
        );
        assert_eq!(ours.tensors().len(), theirs.tensors().len());
        for t in theirs.tensors() {
            let o = ours
                .tensor(&t.name)
                .unwrap_or_else(|| panic!("{adapter}: no {}", t.name));
            assert_eq!(
                (o.tensor_type, &o.dims),
                (t.tensor_type, &t.dims),
                "{}",
                t.name
            );
            assert!(
                ours.data(o) == theirs.data(t),
                "{adapter} {gguf_type}: {} differs",
                t.name
            );
        }
        let got = loss(&lowrank(&[
            "eval",
            "--model",
            out.to_str().unwrap(),
            "--data",
            &fx("data/eval.jsonl"),
        ]));
        let want = reference(adapter)["loss"].as_f64().unwrap();
        let tolerance = if gguf_type == "f32" { 1e-5 } else { 5e-2 };
        assert!(
            (got - want).abs() < tolerance,
            "{adapter} {gguf_type}: {got} vs {want}"
        );
    }
}

/// `analyze --full/--base` take GGUF files like folders: ΔW of the merged LoRA (q, v only)
/// against the f32 GGUF base equals ΔW against the HF base, module for module, with the
/// converter's q/k permutation undone (k_proj, o_proj, ... have no update), and the
/// converter's merged GGUF as the fine-tune gives the same spectra again.
#[test]
fn analyze_reads_gguf_models_like_folders() {
    let spectra = |full: &str, base: &str| -> Vec<serde_json::Value> {
        let out = lowrank(&[
            "analyze",
            "--full",
            &fx(full),
            "--base",
            &fx(base),
            "--top",
            "4",
            "--json",
        ]);
        ok(&out);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["modules"].as_array().unwrap().clone()
    };
    let hf = spectra("merged/llama-tied__lora-qv", "models/llama-tied");
    for (full, base) in [
        ("merged/llama-tied__lora-qv", "gguf/llama-tied-f32.gguf"),
        (
            "gguf/merged/llama-tied__lora-qv-f32.gguf",
            "gguf/llama-tied-f32.gguf",
        ),
    ] {
        let got = spectra(full, base);
        assert_eq!(got.len(), hf.len(), "{full} against {base}");
        for (g, h) in got.iter().zip(&hf) {
            assert_eq!(g["module"], h["module"]);
            let (g_norm, h_norm) = (
                g["frobenius_norm"].as_f64().unwrap(),
                h["frobenius_norm"].as_f64().unwrap(),
            );
            assert!(
                (g_norm - h_norm).abs() <= 1e-6 * h_norm.max(1.0),
                "{full} against {base}: {} {g_norm} vs {h_norm}",
                g["module"]
            );
            let adapted = ["q_proj", "v_proj"]
                .iter()
                .any(|p| h["module"].as_str().unwrap().ends_with(p));
            assert_eq!(h_norm > 0.0, adapted, "{}", h["module"]);
        }
    }
}

/// A model GGUF cannot express is refused, naming what, and no file is left behind: the Gemma 2
/// fixture's query_pre_attn_scalar (24) is not the head size llama.cpp assumes (16).
#[test]
fn merge_to_gguf_refuses_what_llama_cpp_cannot_express() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged.gguf");
    let run = lowrank(&[
        "merge",
        "--model",
        &fx("families/gemma2/model"),
        "--adapter",
        &fx("families/gemma2/adapters/all-linear"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_fails_with(
        &run,
        &["query_pre_attn_scalar 24", "llama.cpp takes 16", "gemma2"],
    );
    assert!(!out.exists());
}

/// The per-step losses of `training_log.jsonl`.
fn step_losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("training_log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
        .collect()
}

/// Training, quantizing and describing an adapter over a GGUF base go as over the HF folder
/// it was converted from: the same losses step for step, the same 4-bit model, the same share.
#[test]
fn train_quantize_and_inspect_over_a_gguf_base_match_the_hf_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (gguf, folder) = (fx("gguf/llama-tied-f32.gguf"), fx("models/llama-tied"));
    let train = |model: &str, out: &str| {
        let out = tmp.path().join(out);
        ok(&lowrank(&[
            "train",
            "--model",
            model,
            "--data",
            &fx("data/train.jsonl"),
            "--out",
            &out.to_string_lossy(),
            "--optimizer",
            "sgd",
            "--lr",
            "0.05",
            "--max-steps",
            "3",
            "--seed",
            "7",
        ]));
        out
    };
    let (from_gguf, from_folder) = (train(&gguf, "gguf-lora"), train(&folder, "hf-lora"));
    let (a, b) = (step_losses(&from_gguf), step_losses(&from_folder));
    assert!(a.len() >= 3 && a.len() == b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }

    let quantize = |model: &str, out: &str| {
        let out = tmp.path().join(out).to_string_lossy().into_owned();
        ok(&lowrank(&[
            "quantize",
            "--model",
            model,
            "--out",
            &out,
            "--quant",
            "nf4",
            "--double-quant",
        ]));
        loss(&lowrank(&[
            "eval",
            "--model",
            &out,
            "--data",
            &fx("data/eval.jsonl"),
        ]))
    };
    let (q_gguf, q_folder) = (quantize(&gguf, "gguf-nf4"), quantize(&folder, "hf-nf4"));
    assert!((q_gguf - q_folder).abs() < 1e-5, "{q_gguf} vs {q_folder}");

    let described = |model: &str| -> serde_json::Value {
        let out = ok(&lowrank(&[
            "inspect",
            &from_folder.to_string_lossy(),
            "--model",
            model,
            "--json",
        ]));
        let mut described: serde_json::Value = serde_json::from_str(&out).unwrap();
        // The one field that differs: the path given.
        described.as_object_mut().unwrap().remove("base_model");
        described
    };
    let (over_gguf, over_folder) = (described(&gguf), described(&folder));
    assert!(
        over_gguf["share_percent"].as_f64().is_some_and(|s| s > 0.0),
        "{over_gguf}"
    );
    assert_eq!(over_gguf, over_folder);
}
