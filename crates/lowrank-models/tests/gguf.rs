//! GGUF base models (fixtures/gguf, written by llama.cpp's convert_hf_to_gguf.py through
//! scripts/make_gguf_fixtures.py) against transformers: the eval loss and greedy tokens of the
//! HF model whose weights are the GGUF's tensors as gguf-py dequantizes them (for f32, the HF
//! original itself).

mod common;
use common::{eval_texts, fixtures, max_abs_diff};

use candle_core::Device;
use lowrank_models::generate::{generate, sequence_nll, Sampler, SamplingParams};
use lowrank_models::{Llama, Message, Tokenizer};
use serde_json::Value;

fn reference() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(fixtures().join("gguf/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn gguf_models_give_the_loss_and_greedy_tokens_of_transformers() {
    for (file, case) in reference() {
        let path = fixtures().join("gguf").join(&file);
        let model = Llama::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{file}: {e}"));
        // The GGUF's own tokenizer: the prompt ids are checked against transformers' below.
        let tokenizer = Tokenizer::load(&path).unwrap();
        let (mut nll, mut count) = (0f64, 0usize);
        for text in eval_texts() {
            let ids = tokenizer.encode(&text, true).unwrap();
            let (n, c) = sequence_nll(&model, &ids, &[]).unwrap();
            nll += n;
            count += c;
        }
        let loss = nll / count as f64;
        let want = case["loss"].as_f64().unwrap();
        eprintln!("{file}: loss {loss:.7} (transformers {want:.7})");
        assert_eq!(count as u64, case["tokens"].as_u64().unwrap(), "{file}");
        assert!((loss - want).abs() <= 1e-5, "{file}: loss {loss} != {want}");
        for g in case["greedy"].as_array().unwrap() {
            let prompt = tokenizer
                .encode(g["prompt"].as_str().unwrap(), true)
                .unwrap();
            let want_prompt: Vec<u32> = serde_json::from_value(g["prompt_ids"].clone()).unwrap();
            assert_eq!(prompt, want_prompt, "{file}");
            let want: Vec<u32> = serde_json::from_value(g["token_ids"].clone()).unwrap();
            let mut sampler = Sampler::new(SamplingParams::default());
            let out = generate(&model, &prompt, &[], &mut sampler, want.len(), &[], |_| {
                Ok(())
            })
            .unwrap();
            assert_eq!(out, want, "{file}: greedy tokens of {:?}", g["prompt"]);
        }
    }
}

/// The f32 GGUF is the HF checkpoint: every weight equal, q/k rows back in HF order.
#[test]
fn an_f32_gguf_holds_the_hf_weights_exactly() {
    for name in ["llama-tied", "qwen2-tied"] {
        let ours = Llama::load(
            &fixtures().join(format!("gguf/{name}-f32.gguf")),
            &Device::Cpu,
        )
        .unwrap();
        let hf = Llama::load(&fixtures().join("models").join(name), &Device::Cpu).unwrap();
        assert_eq!(ours.config().num_parameters(), hf.config().num_parameters());
        for (a, b) in ours
            .named_weights()
            .unwrap()
            .iter()
            .zip(hf.named_weights().unwrap())
        {
            assert_eq!(a.0, b.0);
            let diff: f32 = (&a.1 - &b.1)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(diff, 0.0, "{name}: {}", a.0);
        }
    }
}

/// The family fixtures' f32 GGUFs hold the HF weights exactly (Gemma's norms' 1 + w as the
/// converter stored it, Phi-3's fused projections as they are); the converted copies differ from
/// fixtures/families only in what GGUF cannot say (see make_gguf_fixtures.py), and Gemma 3's
/// layers 3..6 repeat layers 0..3.
#[test]
fn family_f32_ggufs_hold_the_hf_weights_exactly() {
    for family in ["qwen3", "phi3", "gemma2", "gemma3"] {
        let ours = Llama::load(
            &fixtures().join(format!("gguf/families/{family}-f32.gguf")),
            &Device::Cpu,
        )
        .unwrap();
        let hf = Llama::load(
            &fixtures().join(format!("families/{family}/model")),
            &Device::Cpu,
        )
        .unwrap();
        let hf_layers = hf.config().num_layers;
        let hf_weights: std::collections::HashMap<String, candle_core::Tensor> =
            hf.named_weights().unwrap().into_iter().collect();
        let mut compared = 0;
        for (name, w) in ours.named_weights().unwrap() {
            // Gemma 3's copy has six layers: layer i holds the fixture's layer i % 3.
            let hf_name = match name.strip_prefix("model.layers.") {
                Some(rest) => {
                    let (layer, tail) = rest.split_once('.').unwrap();
                    let layer: usize = layer.parse().unwrap();
                    format!("model.layers.{}.{tail}", layer % hf_layers)
                }
                None => name.clone(),
            };
            let want = &hf_weights[&hf_name];
            assert_eq!(w.dims(), want.dims(), "{family}: {name}");
            // Gemma computes with 1 + w, which the converter stored: that is what is exact.
            let diff = if family.starts_with("gemma") && name.ends_with("norm.weight") {
                max_abs_diff(&(&w + 1.0).unwrap(), &(want + 1.0).unwrap())
            } else {
                max_abs_diff(&w, want)
            };
            assert_eq!(diff, 0.0, "{family}: {name}");
            compared += 1;
        }
        assert!(compared >= hf_weights.len(), "{family}: {compared} weights");
    }
}

/// The tokenizer built from GGUF metadata gives the HF tokenizer's ids on a corpus with
/// non-ASCII text, whitespace runs and special tokens, with and without special tokens added.
#[test]
fn gguf_tokenizers_give_the_hf_ids() {
    let text = std::fs::read_to_string(fixtures().join("gguf/tokenizer_reference.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let corpus: Vec<String> = serde_json::from_value(reference["corpus"].clone()).unwrap();
    for (name, gguf, hf_dir) in [
        (
            "llama-tied",
            "gguf/llama-tied-f32.gguf",
            "models/llama-tied",
        ),
        (
            "qwen2-tied",
            "gguf/qwen2-tied-f32.gguf",
            "models/qwen2-tied",
        ),
        // SentencePiece BPE with byte fallback (tokenizer.ggml.model = llama).
        ("spm", "gguf/spm-vocab.gguf", "gguf/spm-tokenizer"),
        // The same pieces as Gemma's tokenizer: no space prefix (add_space_prefix = false).
        (
            "spm-gemma",
            "gguf/spm-gemma-vocab.gguf",
            "gguf/spm-gemma-tokenizer",
        ),
    ] {
        let tokenizer = Tokenizer::load(&fixtures().join(gguf)).unwrap();
        let hf = Tokenizer::load(&fixtures().join(hf_dir)).unwrap();
        let mut agree = 0;
        for (special, key) in [(true, "with_special"), (false, "without_special")] {
            let want: Vec<Vec<u32>> = serde_json::from_value(reference[name][key].clone()).unwrap();
            for (text, want) in corpus.iter().zip(want) {
                assert_eq!(
                    tokenizer.encode(text, special).unwrap(),
                    want,
                    "{name} {key}: {text:?}"
                );
                assert_eq!(
                    tokenizer.decode(&want, false).unwrap(),
                    hf.decode(&want, false).unwrap(),
                    "{name}: decoding {text:?}"
                );
                agree += 1;
            }
        }
        eprintln!("{name}: {agree}/{agree} encodings equal the HF tokenizer's");
    }
}

/// The chat template of `tokenizer.chat_template`, rendered with the GGUF's BOS/EOS tokens,
/// gives transformers' text and ids (fixtures/reference/chat.json).
#[test]
fn gguf_chat_templates_render_like_transformers() {
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/chat.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for case in cases {
        let path = fixtures().join(format!("gguf/{}-f32.gguf", case["model"].as_str().unwrap()));
        if !path.exists() || !case["error"].is_null() {
            continue;
        }
        let tokenizer = Tokenizer::load(&path).unwrap();
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            tokenizer.apply_chat_template(&messages, add).unwrap(),
            case["text"].as_str().unwrap()
        );
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(tokenizer.encode_chat(&messages, add).unwrap(), ids);
        checked += 1;
    }
    assert!(checked >= 2, "{checked} chat cases");
}

/// A family model read from the converter's f32 GGUF and written back by `model_gguf` is the
/// converter's file again: every metadata key and value, every tensor's type, shape and bytes
/// (Gemma's norms as 1 + w, Phi-3's LongRoPE factors, soft-capping, windows, RoPE bases).
#[test]
fn family_ggufs_written_back_equal_the_converters() {
    use lowrank_models::gguf_export::{model_gguf, GgufFileType};
    let tmp = tempfile::tempdir().unwrap();
    for family in ["qwen3", "phi3", "gemma2", "gemma3"] {
        let path = fixtures().join(format!("gguf/families/{family}-f32.gguf"));
        let theirs = lowrank_gguf::GgufFile::open(&path).unwrap();
        let name = theirs.str("general.name").unwrap().to_string();
        let model = Llama::load(&path, &Device::Cpu).unwrap();
        let tokenizer = Tokenizer::load(&path).unwrap();
        let out = tmp.path().join(format!("{family}.gguf"));
        let bytes = model_gguf(&model, &tokenizer, &name, GgufFileType::F32)
            .unwrap_or_else(|e| panic!("{family}: {e}"))
            .to_bytes();
        std::fs::write(&out, bytes).unwrap();
        let ours = lowrank_gguf::GgufFile::open(&out).unwrap();
        for (k, v) in theirs.metadata() {
            assert_eq!(ours.get(k), Some(v), "{family}: {k}");
        }
        for k in ours.metadata().keys() {
            assert!(theirs.get(k).is_some(), "{family}: extra key {k}");
        }
        assert_eq!(ours.tensors().len(), theirs.tensors().len(), "{family}");
        for t in theirs.tensors() {
            let o = ours
                .tensor(&t.name)
                .unwrap_or_else(|| panic!("{family}: no {}", t.name));
            assert_eq!(
                (o.tensor_type, &o.dims),
                (t.tensor_type, &t.dims),
                "{family}: {}",
                t.name
            );
            assert!(
                ours.data(o) == theirs.data(t),
                "{family}: {} differs",
                t.name
            );
        }
    }
}

/// A copy of family fixture `family`'s f32 GGUF with its metadata and tensors edited
/// (`meta` may change or drop a key's value, `keep` drops tensors), and extra keys and tensors.
fn edited_family(
    dir: &std::path::Path,
    family: &str,
    meta: impl Fn(&str, &lowrank_gguf::Value) -> Option<lowrank_gguf::Value>,
    keep: impl Fn(&str) -> bool,
    extra_meta: &[(&str, lowrank_gguf::Value)],
    extra: &[(&str, Vec<usize>)],
) -> std::path::PathBuf {
    let path = fixtures().join(format!("gguf/families/{family}-f32.gguf"));
    let file = lowrank_gguf::GgufFile::open(&path).unwrap();
    let mut w = lowrank_gguf::GgufWriter::new();
    for (k, v) in file.metadata() {
        if let Some(v) = meta(k, v) {
            w.add(k, v);
        }
    }
    for (k, v) in extra_meta {
        w.add(k, v.clone());
    }
    for t in file.tensors().iter().filter(|t| keep(&t.name)) {
        let (shape, values) = file.dequantize(&t.name).unwrap();
        w.add_tensor(&t.name, &shape, &values, lowrank_gguf::TensorType::F32);
    }
    for (name, shape) in extra {
        let values = vec![0.5f32; shape.iter().product()];
        w.add_tensor(name, shape, &values, lowrank_gguf::TensorType::F32);
    }
    let out = dir.join(format!("{family}-edited.gguf"));
    std::fs::write(&out, w.to_bytes()).unwrap();
    out
}

/// What a family's metadata or tensors cannot stand for is an error naming the file and the
/// key or tensor; `attention.sliding_window_pattern`, when a file has it, decides the layers.
#[test]
fn family_ggufs_with_unsupported_or_inconsistent_contents_are_clear_errors() {
    use lowrank_gguf::Value as V;
    let tmp = tempfile::tempdir().unwrap();
    let err = |path: &std::path::Path| -> String {
        match Llama::load(path, &Device::Cpu) {
            Ok(_) => panic!("{} loaded", path.display()),
            Err(e) => e.to_string(),
        }
    };
    let all = |_: &str| true;
    let same = |_: &str, v: &V| Some(v.clone());

    let yarn = edited_family(
        tmp.path(),
        "gemma3",
        |k, v| {
            Some(if k == "gemma3.rope.scaling.type" {
                V::String("yarn".into())
            } else {
                v.clone()
            })
        },
        all,
        &[],
        &[],
    );
    let msg = err(&yarn);
    assert!(
        msg.contains("gemma3-edited.gguf")
            && msg.contains("gemma3.rope.scaling.type")
            && msg.contains("\"yarn\""),
        "{msg}"
    );

    let no_short = edited_family(
        tmp.path(),
        "phi3",
        same,
        |n| n != "rope_factors_short.weight",
        &[],
        &[],
    );
    let msg = err(&no_short);
    assert!(
        msg.contains("phi3-edited.gguf") && msg.contains("rope_factors_short.weight"),
        "{msg}"
    );

    let stray = edited_family(
        tmp.path(),
        "qwen3",
        same,
        all,
        &[],
        &[("blk.0.attn_qkv.weight", vec![64, 32])],
    );
    let msg = err(&stray);
    assert!(
        msg.contains("qwen3-edited.gguf")
            && msg.contains("\"blk.0.attn_qkv.weight\"")
            && msg.contains("qwen3"),
        "{msg}"
    );

    let pattern_key = "gemma2.attention.sliding_window_pattern";
    let with_pattern = |flags: Vec<bool>| {
        let flags = V::Array(flags.into_iter().map(V::Bool).collect());
        edited_family(
            tmp.path(),
            "gemma2",
            same,
            all,
            &[(pattern_key, flags)],
            &[],
        )
    };
    let msg = err(&with_pattern(vec![true]));
    assert!(
        msg.contains(pattern_key) && msg.contains("2 bools"),
        "{msg}"
    );
    let config =
        lowrank_models::ModelConfig::load_for_model(&with_pattern(vec![true, true])).unwrap();
    assert_eq!(config.layer_windows, vec![Some(4), Some(4)]);
    // Without the key: llama.cpp's Gemma 2 default, every other layer from the first.
    let config = lowrank_models::ModelConfig::load_for_model(
        &fixtures().join("gguf/families/gemma2-f32.gguf"),
    )
    .unwrap();
    assert_eq!(config.layer_windows, vec![Some(4), None]);
}

/// The configuration read from a family GGUF's metadata is that of the HF model converted
/// (fixtures/gguf/families/<family>-config.json): every field the model uses, floats compared
/// in f32 (GGUF stores them so).
#[test]
fn family_gguf_metadata_rebuilds_the_hf_config() {
    use lowrank_models::config::RopeScaling;
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    let scaling = |s: &RopeScaling| match s {
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } => format!(
            "longrope {:?} {:?} {original_max_position_embeddings} {}",
            f32s(short_factor),
            f32s(long_factor),
            *attention_factor as f32
        ),
        other => format!("{other:?}"),
    };
    let summary = |c: &lowrank_models::ModelConfig| {
        format!(
            "{:?} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {:?} {} {} {:?} {} {:?} {:?} {:?} {:?} {:?} {:?}",
            c.architecture,
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.rotary_dim,
            c.rms_norm_eps as f32,
            c.rope_theta as f32,
            scaling(&c.rope_scaling),
            c.tie_word_embeddings,
            c.max_position_embeddings,
            c.qkv_bias,
            c.o_bias,
            c.mlp_bias,
            c.qk_norm,
            c.fused_projections,
            c.norm_plus_one,
            c.sandwich_norms,
            c.embed_scale,
            c.attention_scale as f32,
            c.attention_softcap.map(|x| x as f32),
            c.final_softcap.map(|x| x as f32),
            c.layer_windows,
            c.local_rope
                .as_ref()
                .map(|l| (l.theta as f32, scaling(&l.scaling))),
            c.bos_token_id,
            c.eos_token_ids,
        ) + &format!(" {:?}", c.activation)
    };
    for family in ["qwen3", "phi3", "gemma2", "gemma3"] {
        let hf = lowrank_models::ModelConfig::load(
            &fixtures().join(format!("gguf/families/{family}-config.json")),
        )
        .unwrap();
        let ours = lowrank_models::ModelConfig::load_for_model(
            &fixtures().join(format!("gguf/families/{family}-f32.gguf")),
        )
        .unwrap();
        assert_eq!(summary(&ours), summary(&hf), "{family}");
    }
}

/// Each family GGUF's `tokenizer.chat_template` renders the family's chat cases
/// (fixtures/families/<family>/reference.json) as transformers does, refusals included. The
/// Gemma fixtures have a second template in tokenizer_config.json, which gguf-py's SpecialVocab
/// prefers (transformers takes chat_template.jinja): their GGUF holds that one.
#[test]
fn family_gguf_chat_templates_render_like_transformers() {
    for family in ["qwen3", "phi3", "gemma2", "gemma3"] {
        let tokenizer =
            Tokenizer::load(&fixtures().join(format!("gguf/families/{family}-f32.gguf"))).unwrap();
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(
                fixtures().join(format!("families/{family}/model/tokenizer_config.json")),
            )
            .unwrap(),
        )
        .unwrap();
        if let Some(template) = config["chat_template"].as_str() {
            assert_eq!(tokenizer.chat_template(), Some(template), "{family}");
            continue;
        }
        let text =
            std::fs::read_to_string(fixtures().join(format!("families/{family}/reference.json")))
                .unwrap();
        let reference: Value = serde_json::from_str(&text).unwrap();
        let cases = reference["chat"].as_array().unwrap();
        assert!(!cases.is_empty(), "{family}");
        for case in cases {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let add = case["add_generation_prompt"].as_bool().unwrap();
            let got = tokenizer.apply_chat_template(&messages, add);
            match case["error"].as_str() {
                Some(expect) => {
                    let err = got.unwrap_err().to_string();
                    assert!(err.contains(expect), "{family}: {err} vs {expect}");
                }
                None => assert_eq!(got.unwrap(), case["text"].as_str().unwrap(), "{family}"),
            }
        }
    }
}
