//! A 4-bit (QLoRA) base against transformers + bitsandbytes + PEFT: eval losses of
//! fixtures/quant/reference.json (made by scripts/make_quant_fixtures.py), the pre-quantized
//! checkpoint transformers saved (fixtures/quant/llama-tied-nf4-dq), writing it back byte for
//! byte, merging over a 4-bit base, memory accounting.

mod common;
use common::{eval_texts, fixtures};
use std::path::PathBuf;

use candle_core::Device;
use lowrank_core::lora::LoraAdapter;
use lowrank_core::QuantSpec;
use lowrank_models::generate::sequence_nll;
use lowrank_models::{ActiveAdapter, Llama, LoadOptions, Tokenizer};
use lowrank_quant::QuantType;

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("quant/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `lowrank eval`'s loss: total NLL / predicted tokens over fixtures/data/eval.jsonl.
fn eval_loss(model: &Llama, tok: &Tokenizer, adapter: Option<&LoraAdapter>) -> (f64, usize) {
    let active: Vec<ActiveAdapter> = adapter.into_iter().map(ActiveAdapter::new).collect();
    let (mut total, mut count) = (0.0, 0);
    for text in eval_texts() {
        let ids = tok.encode(&text, true).unwrap();
        let (nll, n) = sequence_nll(model, &ids, &active).unwrap();
        total += nll;
        count += n;
    }
    (total / count as f64, count)
}

fn spec(kind: &str, dq: bool) -> QuantSpec {
    QuantSpec::new(QuantType::parse(kind).unwrap(), dq, 64).unwrap()
}

fn load_quantized(name: &str, kind: &str, dq: bool) -> Llama {
    let opts = LoadOptions {
        quantize: Some(spec(kind, dq)),
    };
    Llama::load_with(&fixtures().join("models").join(name), &Device::Cpu, &opts).unwrap()
}

/// Every (model, adapter, nf4 + DQ / fp4) case of the reference, quantized at load.
#[test]
fn eval_loss_over_4bit_base_equals_transformers_bitsandbytes() {
    let r = reference();
    let mut worst = 0f64;
    let mut checked = 0;
    for case in r["eval"].as_array().unwrap() {
        let Some(kind) = case["quant_type"].as_str() else {
            continue;
        };
        let name = case["model"].as_str().unwrap();
        let dq = case["double_quant"].as_bool().unwrap();
        let model = load_quantized(name, kind, dq);
        assert!(model.is_quantized());
        let tok = Tokenizer::load(&fixtures().join("models").join(name)).unwrap();
        let adapter = case["adapter"].as_str().map(|a| {
            model
                .load_adapter(&fixtures().join("adapters").join(a))
                .unwrap()
        });
        let (loss, tokens) = eval_loss(&model, &tok, adapter.as_ref());
        let want = case["loss"].as_f64().unwrap();
        assert_eq!(tokens as u64, case["tokens"].as_u64().unwrap());
        let d = (loss - want).abs();
        eprintln!(
            "{name} {:?} {kind} dq={dq}: ours {loss:.8} bnb {want:.8} |diff| {d:.2e}",
            case["adapter"]
        );
        assert!(d <= 1e-4, "{case}: ours {loss}");
        worst = worst.max(d);
        checked += 1;
    }
    assert_eq!(checked, 10);
    eprintln!("worst |diff| {worst:e}");
}

/// The checkpoint transformers saved with load_in_4bit (nf4 + DQ) loads 4-bit, holds exactly
/// what quantizing at load gives, and evaluates to bitsandbytes' loss, with and without adapters.
#[test]
fn prequantized_transformers_checkpoint_loads_and_matches() {
    let dir = fixtures().join("quant/llama-tied-nf4-dq");
    let model = Llama::load(&dir, &Device::Cpu).unwrap();
    assert!(model.is_quantized());
    assert!(model.config().quantization.is_some());
    let fly = load_quantized("llama-tied", "nf4", true);
    for l in model.linears() {
        let a = model
            .linear(&l.name)
            .unwrap()
            .base()
            .as_quantized()
            .unwrap();
        let b = fly.linear(&l.name).unwrap().base().as_quantized().unwrap();
        assert_eq!(a.as_ref(), b.as_ref(), "{}", l.name);
    }
    let tok = Tokenizer::load(&fixtures().join("models/llama-tied")).unwrap();
    let r = reference();
    for case in r["eval"].as_array().unwrap() {
        if case["model"] != "llama-tied" || case["quant_type"] != "nf4" {
            continue;
        }
        let adapter = case["adapter"].as_str().map(|a| {
            model
                .load_adapter(&fixtures().join("adapters").join(a))
                .unwrap()
        });
        let (loss, _) = eval_loss(&model, &tok, adapter.as_ref());
        let want = case["loss"].as_f64().unwrap();
        assert!((loss - want).abs() <= 1e-4, "{case}: ours {loss}");
    }
    // --quantize on a checkpoint that is 4-bit already is an error naming the cause.
    let opts = LoadOptions {
        quantize: Some(spec("nf4", true)),
    };
    let err = Llama::load_with(&dir, &Device::Cpu, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("quantized already"), "{err}");
}

/// Quantizing llama-tied at load and saving it writes the very file transformers wrote.
#[test]
fn saved_4bit_checkpoint_is_byte_identical_to_transformers() {
    let model = load_quantized("llama-tied", "nf4", true);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    model
        .save_pretrained(&fixtures().join("models/llama-tied"), &out)
        .unwrap();
    let ours = std::fs::read(out.join("model.safetensors")).unwrap();
    let theirs =
        std::fs::read(fixtures().join("quant/llama-tied-nf4-dq/model.safetensors")).unwrap();
    assert!(
        ours == theirs,
        "model.safetensors differs ({} vs {} bytes)",
        ours.len(),
        theirs.len()
    );
    // config.json gains the quantization_config transformers writes.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("quant/llama-tied-nf4-dq/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["quantization_config"], want["quantization_config"]);
    // And it reads back as the same 4-bit model.
    let back = Llama::load(&out, &Device::Cpu).unwrap();
    for l in model.linears() {
        assert_eq!(
            back.linear(&l.name)
                .unwrap()
                .base()
                .as_quantized()
                .unwrap()
                .as_ref(),
            model
                .linear(&l.name)
                .unwrap()
                .base()
                .as_quantized()
                .unwrap()
                .as_ref()
        );
    }
}

/// Merging over a 4-bit base: the default writes full precision (base dequantized + ΔW) that
/// evaluates like the unmerged adapter over the 4-bit base; requantizing writes a 4-bit
/// checkpoint and reports its error.
#[test]
fn merge_over_4bit_base_full_precision_and_requantized() {
    let tok = Tokenizer::load(&fixtures().join("models/llama-tied")).unwrap();
    for adapter in ["llama-tied__lora-qv", "llama-tied__dora"] {
        let mut model = load_quantized("llama-tied", "nf4", true);
        let a = model
            .load_adapter(&fixtures().join("adapters").join(adapter))
            .unwrap();
        let (unmerged, _) = eval_loss(&model, &tok, Some(&a));
        let before = model.linear_memory();
        model.merge_adapter("a", &a, 1.0).unwrap();
        let (merged, _) = eval_loss(&model, &tok, None);
        assert!(
            (merged - unmerged).abs() < 1e-4,
            "{adapter}: {merged} vs {unmerged}"
        );
        // Untouched layers stay 4-bit; merged ones are dense now.
        assert!(model.linear_memory().bytes > before.bytes);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let mut full = model.clone();
        // The full-precision default: every layer dense.
        full.dequantize_linears().unwrap();
        full.save_pretrained(&fixtures().join("models/llama-tied"), &out)
            .unwrap();
        let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(!cfg.contains("quantization_config"));
        let back = Llama::load(&out, &Device::Cpu).unwrap();
        assert!(!back.is_quantized());
        let (loss, _) = eval_loss(&back, &tok, None);
        assert!(
            (loss - unmerged).abs() < 1e-4,
            "{adapter}: {loss} vs {unmerged}"
        );
        // Requantized.
        let stats = model.quantize_linears(&spec("nf4", true)).unwrap();
        assert!(
            stats.relative_error() > 0.0 && stats.relative_error() < 0.2,
            "{stats:?}"
        );
        let out = tmp.path().join("requantized");
        model
            .save_pretrained(&fixtures().join("models/llama-tied"), &out)
            .unwrap();
        let back = Llama::load(&out, &Device::Cpu).unwrap();
        assert!(back.is_quantized() && back.config().quantization.is_some());
        let (loss, _) = eval_loss(&back, &tok, None);
        assert!(
            (loss - unmerged).abs() < 0.5,
            "{adapter}: {loss} vs {unmerged}"
        );
        // Unmerge over the 4-bit base gives back the packed weights exactly.
        let mut m = load_quantized("llama-tied", "nf4", true);
        let fresh = m.clone();
        m.merge_adapter("a", &a, 1.0).unwrap();
        m.unmerge_adapter("a").unwrap();
        for l in m.linears() {
            assert_eq!(
                m.linear(&l.name)
                    .unwrap()
                    .base()
                    .as_quantized()
                    .unwrap()
                    .as_ref(),
                fresh
                    .linear(&l.name)
                    .unwrap()
                    .base()
                    .as_quantized()
                    .unwrap()
                    .as_ref()
            );
        }
    }
}

/// Resident bytes of the linear weights are what the bits say.
#[test]
fn memory_accounting_of_4bit_linears() {
    let dense = Llama::load(&fixtures().join("models/llama-tied"), &Device::Cpu).unwrap();
    let d = dense.linear_memory();
    assert_eq!(d.bytes, d.params * 4);
    assert_eq!(d.quantized_params, 0);
    for (dq, max_bits) in [(true, 4.2), (false, 4.5)] {
        let q = load_quantized("llama-tied", "nf4", dq).linear_memory();
        assert_eq!(q.params, d.params);
        assert_eq!(q.quantized_params, q.params);
        let bits = q.quantized_bits_per_param();
        eprintln!(
            "dq={dq}: {} bytes for {} params = {bits:.4} bits/param",
            q.bytes, q.params
        );
        assert!(bits <= max_bits + 1e-12, "dq={dq}: {bits}");
        // Exactly: packed nibbles + per weight (absmax bytes).
        let blocks: usize = dense
            .linears()
            .iter()
            .map(|l| (l.out_features * l.in_features).div_ceil(64))
            .sum();
        let weights = dense.linears().len();
        let want = q.params / 2
            + if dq {
                blocks + weights * (4 + 4)
            } else {
                blocks * 4
            };
        assert_eq!(q.bytes, want);
    }
}

/// fixtures/quant-straddle/ (scripts/make_quant_fixtures.py): 4-bit blocks that do not align
/// with weight rows.
fn straddle() -> PathBuf {
    fixtures().join("quant-straddle")
}

fn straddle_reference() -> serde_json::Value {
    let text = std::fs::read_to_string(straddle().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The straddle model quantized at load as a reference case says (quant type, double quant,
/// block size), with the case's adapter if it names one.
fn load_straddle_case(case: &serde_json::Value) -> (Llama, Option<LoraAdapter>) {
    let kind = QuantType::parse(case["quant_type"].as_str().unwrap()).unwrap();
    let dq = case["double_quant"].as_bool().unwrap();
    let block = case["block_size"].as_u64().unwrap() as usize;
    let opts = LoadOptions {
        quantize: Some(QuantSpec::new(kind, dq, block).unwrap()),
    };
    let model = Llama::load_with(&straddle().join("llama-i176"), &Device::Cpu, &opts).unwrap();
    assert!(model.is_quantized());
    let adapter = case["adapter"]
        .as_str()
        .map(|a| model.load_adapter(&straddle().join(a)).unwrap());
    (model, adapter)
}

/// down_proj's rows (176 values) end mid-block at block 64; at 256 and 4096 a block spans
/// several rows (and at 4096 a whole q/k/v/o weight is one short block): every (adapter:
/// none, LoRA, DoRA) × block × nf4/fp4 × double quant case evaluates to transformers +
/// bitsandbytes' loss.
#[test]
fn eval_loss_with_blocks_straddling_rows_equals_bitsandbytes() {
    let r = straddle_reference();
    let tok = Tokenizer::load(&straddle().join("llama-i176")).unwrap();
    let mut checked = 0;
    let mut worst = 0f64;
    for case in r["eval"].as_array().unwrap() {
        if case["quant_type"].is_null() {
            continue;
        }
        let (model, adapter) = load_straddle_case(case);
        let (loss, tokens) = eval_loss(&model, &tok, adapter.as_ref());
        assert_eq!(tokens as u64, case["tokens"].as_u64().unwrap());
        let d = (loss - case["loss"].as_f64().unwrap()).abs();
        eprintln!("{case}: ours {loss:.8} |diff| {d:.2e}");
        assert!(d <= 1e-5, "{case}: ours {loss}");
        worst = worst.max(d);
        checked += 1;
    }
    assert_eq!(checked, 3 * 3 * 4);
    eprintln!("worst |diff| {worst:e}");
}

/// Greedy decoding over the KV cache (one row through each 4-bit linear a step) gives
/// bitsandbytes' tokens and, step by step, its logits.
#[test]
fn decoding_steps_with_blocks_straddling_rows_equal_bitsandbytes() {
    let r = straddle_reference();
    let logits =
        candle_core::safetensors::load(straddle().join("decode.safetensors"), &Device::Cpu)
            .unwrap();
    let tok = Tokenizer::load(&straddle().join("llama-i176")).unwrap();
    let cases = r["decode"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let (model, adapter) = load_straddle_case(case);
        let active: Vec<ActiveAdapter> = adapter.iter().map(ActiveAdapter::new).collect();
        let prompt = tok.encode(case["prompt"].as_str().unwrap(), true).unwrap();
        let want_prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(prompt, want_prompt);
        let want_tokens: Vec<u32> = serde_json::from_value(case["token_ids"].clone()).unwrap();
        let key = case["key"].as_str().unwrap();
        let want_logits: Vec<Vec<f32>> = logits[&format!("{key}.logits")].to_vec2().unwrap();
        assert_eq!(want_logits.len(), want_tokens.len());
        let mut cache = lowrank_models::KvCache::new();
        let mut input = candle_core::Tensor::new(&prompt[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut worst = 0f32;
        for (step, (want, &want_token)) in want_logits.iter().zip(&want_tokens).enumerate() {
            let out = model.forward(&input, Some(&mut cache), &active).unwrap();
            let last: Vec<f32> = out
                .squeeze(0)
                .unwrap()
                .get(out.dim(1).unwrap() - 1)
                .unwrap()
                .to_vec1()
                .unwrap();
            let d = last
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d <= 1e-4, "{key} step {step}: max |logit diff| {d}");
            worst = worst.max(d);
            let token = lowrank_models::generate::argmax(&last);
            assert_eq!(token, want_token, "{key} step {step}");
            input = candle_core::Tensor::new(&[token], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
        }
        eprintln!("{key}: max |logit diff| {worst:e}");
    }
}

/// `eval` scores with the step `generate` and the server decode with: its NLL is, bit for bit,
/// the one read off the logits of a cached forward (the batched step), over an f32, a 4-bit
/// and a bf16 base with an adapter.
#[test]
fn eval_scores_with_the_decoding_step() {
    use candle_core::{Tensor, D};
    use lowrank_models::KvCache;
    let tok = Tokenizer::load(&fixtures().join("models/llama-tied")).unwrap();
    let f32_model = Llama::load(&fixtures().join("models/llama-tied"), &Device::Cpu).unwrap();
    let mut bf16_model = Llama::load(&fixtures().join("models/llama-tied"), &Device::Cpu).unwrap();
    bf16_model
        .cast_for_inference(candle_core::DType::BF16)
        .unwrap();
    for model in [
        f32_model,
        load_quantized("llama-tied", "nf4", true),
        bf16_model,
    ] {
        let adapter = model
            .load_adapter(&fixtures().join("adapters/llama-tied__lora-qv"))
            .unwrap();
        let active = [ActiveAdapter::new(&adapter)];
        let ids = tok.encode(&eval_texts()[0], true).unwrap();
        let (nll, n) = sequence_nll(&model, &ids, &active).unwrap();
        assert_eq!(n, ids.len() - 1);
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let decoding_nll = |cache: Option<&mut KvCache>| {
            let logits = model
                .forward(&input, cache, &active)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let logprobs =
                candle_nn::ops::log_softmax(&logits.narrow(0, 0, n).unwrap(), D::Minus1).unwrap();
            let targets = Tensor::new(&ids[1..], &Device::Cpu)
                .unwrap()
                .unsqueeze(1)
                .unwrap();
            let picked = logprobs.gather(&targets, 1).unwrap().sum_all().unwrap();
            -f64::from(picked.to_scalar::<f32>().unwrap())
        };
        let mut cache = KvCache::with_capacity(ids.len());
        let stepped = decoding_nll(Some(&mut cache));
        assert_eq!(
            nll.to_bits(),
            stepped.to_bits(),
            "eval {nll} vs step {stepped}"
        );
        // The check can tell the two forwards apart.
    }
}
