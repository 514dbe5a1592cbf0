//! Model checkpoints as every command loads them (`Llama::load`): `config.json`,
//! `model.safetensors` (dense and bitsandbytes 4-bit), sharded checkpoints'
//! `model.safetensors.index.json`, and the 4-bit reader of the quant crate on its own.

use std::path::Path;

use candle_core::{Device, Tensor};
use lowrank_models::Llama;
use lowrank_quant::qtensor::RawDtype;
use lowrank_quant::{BnbCheckpoint, QuantType, Quantized4Bit};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use crate::ensure;
use crate::support::*;

const CONFIG_CASES: u32 = 1000;
const GENERATED_CONFIG_CASES: u32 = 500;
const SAFETENSORS_CASES: u32 = 800;
const QUANT_CASES: u32 = 800;
const QUANT_GENERATED_CASES: u32 = 500;
const GENERATED_SAFETENSORS_CASES: u32 = 300;
const INDEX_CASES: u32 = 500;
const GENERATION_CONFIG_CASES: u32 = 500;

/// Dense and 4-bit fixtures of the same model.
const MODELS: &[&str] = &["models/llama-tied", "quant/llama-tied-nf4-dq"];

const CONFIG_FIELDS: &[(&str, &[Ty])] = &[
    ("model_type", &[Ty::Str]),
    ("vocab_size", &[Ty::UInt]),
    ("hidden_size", &[Ty::UInt]),
    ("intermediate_size", &[Ty::UInt]),
    ("num_hidden_layers", &[Ty::UInt]),
    ("num_attention_heads", &[Ty::UInt]),
    ("num_key_value_heads", &[Ty::UInt, Ty::Null]),
    ("head_dim", &[Ty::UInt, Ty::Null]),
    ("rms_norm_eps", &[Ty::Num]),
    ("rope_theta", &[Ty::Num, Ty::Null]),
    ("rope_scaling", &[Ty::Object, Ty::Null]),
    ("rope_parameters", &[Ty::Object, Ty::Null]),
    ("rope_parameters.rope_theta", &[Ty::Num]),
    ("tie_word_embeddings", &[Ty::Bool, Ty::Null]),
    ("max_position_embeddings", &[Ty::UInt]),
    ("attention_bias", &[Ty::Bool]),
    ("mlp_bias", &[Ty::Bool]),
    ("hidden_act", &[Ty::Str, Ty::Null]),
    ("sliding_window", &[Ty::UInt, Ty::Null]),
    ("use_sliding_window", &[Ty::Bool]),
    ("bos_token_id", &[Ty::U32, Ty::U32s, Ty::Null]),
    ("eos_token_id", &[Ty::U32, Ty::U32s, Ty::Null]),
    ("torch_dtype", &[Ty::Str, Ty::Null]),
    ("dtype", &[Ty::Str, Ty::Null]),
    ("quantization_config", &[Ty::Object]),
    ("quantization_config.quant_method", &[Ty::Str]),
    ("quantization_config.bnb_4bit_quant_type", &[Ty::Str]),
    ("quantization_config.load_in_4bit", &[Ty::Bool]),
    ("quantization_config.bnb_4bit_use_double_quant", &[Ty::Bool]),
];

/// Writes a checkpoint folder (`files` by name), loads it, and checks the outcome: no panic,
/// an error naming the folder, an error whenever `must_fail` lists something, nothing written.
fn check_model(files: &[(&str, &[u8])], must_fail: &[String]) -> Result<(), TestCaseError> {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let before = snapshot(root.path());
    match Llama::load(&dir, &Device::Cpu) {
        Ok(model) => {
            ensure!(
                must_fail.is_empty(),
                "loaded with fields of the wrong type: {must_fail:?}"
            );
            // What loads must run (or refuse with an error): a short forward pass.
            let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
            if let Err(e) = model.forward(&ids, None, &[]) {
                check_error(&e.to_string(), &[])?;
            }
        }
        Err(e) => {
            check_error(&e.to_string(), &[&dir.display().to_string()])?;
            check_type_error_names_field(
                &e.to_string(),
                &["/config.json", "index.json"],
                must_fail,
            )?;
        }
    }
    check_unchanged(root.path(), &before)
}

struct Model {
    config: Vec<u8>,
    weights: Vec<u8>,
}

fn models() -> Vec<Model> {
    MODELS
        .iter()
        .map(|m| Model {
            config: read_fixture(&format!("{m}/config.json")),
            weights: read_fixture(&format!("{m}/model.safetensors")),
        })
        .collect()
}

/// `config.json` of the dense and the 4-bit model, edited as JSON or as text.
#[test]
fn model_config_json() {
    let models = models();
    let docs: Vec<Value> = models
        .iter()
        .map(|m| serde_json::from_slice(&m.config).unwrap())
        .collect();
    let donors: Vec<Value> = [
        "models/mistral/config.json",
        "models/qwen2-tied/config.json",
        "models/llama-untied/config.json",
    ]
    .iter()
    .map(|f| fixture_json(f))
    .chain(docs.iter().cloned())
    .collect();
    let text_donors: Vec<Vec<u8>> = donors
        .iter()
        .map(|d| serde_json::to_vec(d).unwrap())
        .collect();
    run(
        "config.json (mutated fixtures)",
        CONFIG_CASES,
        (
            any::<Index>(),
            prop_oneof![4 => json_edits(3).prop_map(Ok), 1 => byte_edits(3).prop_map(Err)],
        ),
        |(src, edit)| {
            let i = src.index(models.len());
            let config = match &edit {
                Ok(e) => {
                    let refs: Vec<&Value> = donors.iter().collect();
                    serde_json::to_vec_pretty(&apply_json(&docs[i], e, &refs)).unwrap()
                }
                Err(e) => {
                    let refs: Vec<&[u8]> = text_donors.iter().map(Vec::as_slice).collect();
                    apply_bytes(&models[i].config, 0..models[i].config.len(), e, &refs)
                }
            };
            let must_fail = json_faults(&config, |v| wrong_types(v, CONFIG_FIELDS));
            check_model(
                &[
                    ("config.json", &config),
                    ("model.safetensors", &models[i].weights),
                ],
                &must_fail,
            )
        },
    );
}

/// Configs made from scratch: the fixture's with each field of its own type or any other.
#[test]
fn model_config_generated() {
    let models = models();
    let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = CONFIG_FIELDS
        .iter()
        .filter(|(name, _)| !name.contains('.'))
        .map(|(name, tys)| {
            let name = name.to_string();
            let typed = prop::sample::select(tys.to_vec()).prop_flat_map(model_field_value);
            prop::option::weighted(0.4, prop_oneof![2 => typed, 1 => nasty_value()])
                .prop_map(move |v| v.map(|v| (name.clone(), v)))
                .boxed()
        })
        .collect();
    run(
        "config.json (generated)",
        GENERATED_CONFIG_CASES,
        (any::<Index>(), fields),
        |(src, fields)| {
            let i = src.index(models.len());
            let mut doc: Value = serde_json::from_slice(&models[i].config).unwrap();
            for (k, v) in fields.into_iter().flatten() {
                doc[k] = v;
            }
            let must_fail = wrong_types(&doc, CONFIG_FIELDS);
            let config = serde_json::to_vec(&doc).unwrap();
            check_model(
                &[
                    ("config.json", &config),
                    ("model.safetensors", &models[i].weights),
                ],
                &must_fail,
            )
        },
    );
}

/// A value a model config field could plausibly hold, of type `ty`.
fn model_field_value(ty: Ty) -> BoxedStrategy<Value> {
    match ty {
        Ty::UInt | Ty::U32 => prop_oneof![0u64..600, Just(1 << 40), any::<u64>()]
            .prop_map(Value::from)
            .boxed(),
        Ty::U32s => prop::collection::vec(0u64..400, 0..3)
            .prop_map(|v| Value::Array(v.into_iter().map(Value::from).collect()))
            .boxed(),
        Ty::Num => prop_oneof![
            0.0..1e-3f64,
            1.0..1e7f64,
            Just(0.0),
            Just(-1.0),
            Just(1e300)
        ]
        .prop_map(Value::from)
        .boxed(),
        Ty::Str => prop::sample::select(vec![
            "llama", "mistral", "qwen2", "silu", "float32", "bfloat16", "gpt2",
        ])
        .prop_map(Value::from)
        .boxed(),
        Ty::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        Ty::Null => Just(Value::Null).boxed(),
        Ty::Object => prop::collection::btree_map(
            prop::sample::select(vec![
                "rope_type",
                "type",
                "factor",
                "rope_theta",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
                "quant_method",
                "load_in_4bit",
                "bnb_4bit_quant_type",
            ]),
            prop_oneof![
                prop::sample::select(vec![
                    "default",
                    "linear",
                    "llama3",
                    "yarn",
                    "bitsandbytes",
                    "nf4",
                    "fp4"
                ])
                .prop_map(Value::from),
                (0.0..10.0f64).prop_map(Value::from),
                any::<bool>().prop_map(Value::Bool),
            ],
            0..5,
        )
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
        .boxed(),
        Ty::Strs | Ty::UInts | Ty::Array => nasty_value().boxed(),
    }
}

/// `model.safetensors` of the dense model edited: header bytes, any bytes, the header as JSON,
/// and tensor by tensor (dropped, renamed, resized, retyped, reshaped, copied).
#[test]
fn model_safetensors() {
    let models = models();
    let dense = &models[0];
    let donors: Vec<Vec<u8>> = [
        "models/mistral/model.safetensors",
        "adapters/llama-tied__lora-qv/adapter_model.safetensors",
    ]
    .iter()
    .map(|f| read_fixture(f))
    .collect();
    let (tensors, metadata) = parse_tensors(&dense.weights);
    run(
        "model.safetensors (mutated fixtures)",
        SAFETENSORS_CASES,
        prop_oneof![
            safetensors_edit().prop_map(Ok),
            prop::collection::vec(tensor_edit(), 1..4).prop_map(Err),
        ],
        |edit| {
            let weights = match &edit {
                Ok(e) => {
                    let refs: Vec<&[u8]> = donors.iter().map(Vec::as_slice).collect();
                    apply_safetensors(&dense.weights, e, &refs)
                }
                Err(e) => {
                    let mut t = tensors.clone();
                    apply_tensor_edits(&mut t, e);
                    build_tensors(&t, metadata.as_ref())
                }
            };
            check_model(
                &[
                    ("config.json", &dense.config),
                    ("model.safetensors", &weights),
                ],
                &[],
            )
        },
    );
}

/// Safetensors files made from scratch under the model's tensor names (and others).
#[test]
fn model_safetensors_generated() {
    let models = models();
    let dense = &models[0];
    let (tensors, _) = parse_tensors(&dense.weights);
    let mut names: Vec<String> = tensors.into_iter().map(|t| t.name).collect();
    names.extend(["lm_head.weight".to_string(), "x".into(), String::new()]);
    run(
        "model.safetensors (generated)",
        GENERATED_SAFETENSORS_CASES,
        generated_safetensors(names),
        |weights| {
            check_model(
                &[
                    ("config.json", &dense.config),
                    ("model.safetensors", &weights),
                ],
                &[],
            )
        },
    );
}

/// The bitsandbytes 4-bit checkpoint edited tensor by tensor, its `quant_state` JSON blobs
/// included, and as bytes; loaded as a model and by the quant crate's own reader.
#[test]
fn quantized_safetensors() {
    let models = models();
    let quant = &models[1];
    let (tensors, metadata) = parse_tensors(&quant.weights);
    run(
        "4-bit model.safetensors (mutated fixtures)",
        QUANT_CASES,
        prop_oneof![
            1 => safetensors_edit().prop_map(QuantEdit::File),
            2 => prop::collection::vec(tensor_edit(), 1..4).prop_map(QuantEdit::Tensors),
            2 => (any::<Index>(), quant_state_field(), nasty_value())
                .prop_map(|(blob, field, value)| QuantEdit::StateField { blob, field, value }),
        ],
        |edit| {
            let (weights, must_fail) = match &edit {
                QuantEdit::File(e) => (apply_safetensors(&quant.weights, e, &[]), vec![]),
                QuantEdit::Tensors(e) => {
                    let mut t = tensors.clone();
                    apply_tensor_edits(&mut t, e);
                    (build_tensors(&t, metadata.as_ref()), quant_state_faults(&t))
                }
                QuantEdit::StateField { blob, field, value } => {
                    let mut t = tensors.clone();
                    let blobs: Vec<usize> = (0..t.len())
                        .filter(|&i| t[i].name.contains(".quant_state."))
                        .collect();
                    let b = &mut t[blobs[blob.index(blobs.len())]];
                    let mut doc: Value = serde_json::from_slice(&b.data).unwrap();
                    doc[field.as_str()] = value.clone();
                    b.data = serde_json::to_vec(&doc).unwrap();
                    b.shape = vec![b.data.len()];
                    (build_tensors(&t, metadata.as_ref()), quant_state_faults(&t))
                }
            };
            match BnbCheckpoint::from_bytes(&weights) {
                Ok(ck) => {
                    ensure!(must_fail.is_empty(), "read {must_fail:?}");
                    use_quantized(&ck)?;
                }
                Err(e) => {
                    check_error(&e.to_string(), &[])?;
                    check_type_error_names_field(&e.to_string(), &["quant_state"], &must_fail)?;
                }
            }
            check_model(
                &[
                    ("config.json", &quant.config),
                    ("model.safetensors", &weights),
                ],
                &must_fail,
            )
        },
    );
}

/// How the 4-bit checkpoint is broken.
#[derive(Debug, Clone)]
enum QuantEdit {
    File(SafetensorsEdit),
    Tensors(Vec<TensorEdit>),
    /// One field of one weight's quant_state blob set to `value`.
    StateField {
        blob: Index,
        field: String,
        value: Value,
    },
}

fn quant_state_field() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(QUANT_STATE_FIELDS.iter().map(|(f, _)| f.to_string()).collect::<Vec<_>>()),
        1 => key(),
    ]
}

/// Dequantizes every 4-bit weight read and multiplies a row by it: what loads must be usable.
fn use_quantized(ck: &BnbCheckpoint) -> Result<(), TestCaseError> {
    for q in ck.quantized.values() {
        ensure!(q.dequantize().len() == q.numel(), "dequantized length");
        if let [_, cols] = q.shape() {
            if let Err(e) = lowrank_quant::matmul_4bit(&vec![1.0; *cols], 1, q) {
                check_error(&e.to_string(), &[])?;
            }
        }
    }
    Ok(())
}

/// 4-bit weights made from scratch (any shape, block size, NF4/FP4, double quantization),
/// written in the bitsandbytes layout and read back: equal to what was written, then with one
/// quant_state field changed: read and usable, or refused.
#[test]
fn quantized_generated() {
    let block = prop_oneof![
        4 => prop::sample::select(vec![32usize, 64, 128, 256, 4096]),
        1 => prop::sample::select(vec![0usize, 1, 48, 8192]),
    ];
    let kind = prop::sample::select(vec![QuantType::Nf4, QuantType::Fp4]);
    let edit = prop::option::of((quant_state_field(), nasty_value()));
    run(
        "4-bit tensors (generated)",
        QUANT_GENERATED_CASES,
        ((1usize..9, 1usize..300), block, kind, any::<bool>(), edit),
        |((rows, cols), block, kind, double_quant, edit)| {
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let q = match Quantized4Bit::quantize(&values, &[rows, cols], kind, block, double_quant)
            {
                Ok(q) => q,
                Err(e) => return check_error(&e.to_string(), &[]),
            };
            let mut tensors: Vec<StoredTensor> = q
                .to_bnb_tensors("w.weight")
                .into_iter()
                .map(|(name, t)| StoredTensor {
                    name,
                    dtype: match t.dtype {
                        RawDtype::U8 => "U8",
                        RawDtype::F32 => "F32",
                    }
                    .into(),
                    shape: t.shape,
                    data: t.data,
                })
                .collect();
            let must_fail = match &edit {
                None => vec![],
                Some((field, value)) => {
                    let blob = tensors
                        .iter_mut()
                        .find(|t| t.name.contains(".quant_state."))
                        .unwrap();
                    let mut doc: Value = serde_json::from_slice(&blob.data).unwrap();
                    doc[field.as_str()] = value.clone();
                    blob.data = serde_json::to_vec(&doc).unwrap();
                    blob.shape = vec![blob.data.len()];
                    quant_state_faults(&tensors)
                }
            };
            match BnbCheckpoint::from_bytes(&build_tensors(&tensors, None)) {
                Ok(ck) => {
                    ensure!(must_fail.is_empty(), "read {must_fail:?}");
                    if edit.is_none() {
                        ensure!(
                            ck.quantized.get("w.weight") == Some(&q),
                            "not read back as written"
                        );
                    }
                    use_quantized(&ck)
                }
                Err(e) => {
                    ensure!(edit.is_some(), "a weight as written is refused: {e}");
                    check_error(&e.to_string(), &[])?;
                    check_type_error_names_field(&e.to_string(), &["quant_state"], &must_fail)
                }
            }
        },
    );
}

const QUANT_STATE_FIELDS: &[(&str, &[Ty])] = &[
    ("quant_type", &[Ty::Str]),
    ("blocksize", &[Ty::UInt]),
    ("dtype", &[Ty::Str, Ty::Null]),
    ("shape", &[Ty::UInts, Ty::Null]),
    ("nested_blocksize", &[Ty::UInt, Ty::Null]),
    ("nested_offset", &[Ty::Num, Ty::Null]),
];

/// What must make the quant_state blobs (`<weight>.quant_state.bitsandbytes__nf4|fp4`, which
/// the loaders read) refused: not a JSON object, fields of the wrong type, a dtype that is
/// no float type.
fn quant_state_faults(tensors: &[StoredTensor]) -> Vec<String> {
    let mut faults = Vec::new();
    for t in tensors
        .iter()
        .filter(|t| t.name.contains(".quant_state.bitsandbytes__"))
    {
        if serde_json::from_slice::<serde::de::IgnoredAny>(&t.data).is_err() {
            faults.push(format!("<{}: not JSON>", t.name));
            continue;
        }
        // Nested deeper than `Value` may be (serde_json's limit): valid, checked no further.
        let Ok(doc) = serde_json::from_slice::<Value>(&t.data) else {
            continue;
        };
        faults.extend(wrong_types(&doc, QUANT_STATE_FIELDS));
        if let Some(d) = doc.get("dtype").and_then(Value::as_str) {
            if !["float32", "float16", "bfloat16", "float64"].contains(&d) {
                faults.push(format!("{}: dtype {d:?}", t.name));
            }
        }
    }
    faults
}

/// A sharded checkpoint: `model.safetensors.index.json` edited (shards renamed, missing,
/// outside the folder, of the wrong type) over the fixture's four shards.
#[test]
fn sharded_index_json() {
    let dir = fixtures().join("models/llama-untied");
    let index_name = "model.safetensors.index.json";
    let index: Value = fixture_json(&format!("models/llama-untied/{index_name}"));
    let shards: Vec<(String, Vec<u8>)> = (1..=4)
        .map(|i| {
            let name = format!("model-0000{i}-of-00004.safetensors");
            let bytes = std::fs::read(dir.join(&name)).unwrap();
            (name, bytes)
        })
        .collect();
    let config = std::fs::read(dir.join("config.json")).unwrap();
    let shard_names: Vec<Value> = shards
        .iter()
        .map(|(n, _)| Value::from(n.as_str()))
        .chain(
            [
                "",
                ".",
                "..",
                "/",
                "config.json",
                "../model/config.json",
                "missing.safetensors",
                "/missing.safetensors",
                "/dev/null",
            ]
            .map(Value::from),
        )
        .collect();
    let name_edit = (any::<Index>(), prop::sample::select(shard_names));
    run(
        "model.safetensors.index.json (mutated fixtures)",
        INDEX_CASES,
        (
            prop::collection::vec(name_edit, 0..3),
            prop::option::of(json_edits(2)),
            prop::option::of(any::<Index>()),
        ),
        |(renames, edits, drop_shard)| {
            let mut doc = index.clone();
            let map = doc["weight_map"].as_object_mut().unwrap();
            let keys: Vec<String> = map.keys().cloned().collect();
            for (at, to) in &renames {
                map[&keys[at.index(keys.len())]] = to.clone();
            }
            if let Some(e) = &edits {
                doc = apply_json(&doc, e, &[]);
            }
            let must_fail = wrong_types(&doc, &[("weight_map", &[Ty::Object])]);
            let text = serde_json::to_vec(&doc).unwrap();
            let mut files: Vec<(&str, &[u8])> = vec![("config.json", &config), (index_name, &text)];
            let dropped = drop_shard.map(|d| d.index(shards.len()));
            for (i, (name, bytes)) in shards.iter().enumerate() {
                if Some(i) != dropped {
                    files.push((name, bytes));
                }
            }
            check_model(&files, &must_fail)
        },
    );
}

/// `generation_config.json` edited, read for the stop tokens as `generate` and the server do.
#[test]
fn generation_config_json() {
    let fixture = fixtures().join("models/llama-tied");
    let model = Llama::load(&fixture, &Device::Cpu).unwrap();
    let tokenizer = lowrank_models::Tokenizer::load(&fixture).unwrap();
    let source = read_fixture("models/llama-tied/generation_config.json");
    let doc: Value = serde_json::from_slice(&source).unwrap();
    run(
        "generation_config.json (mutated fixtures)",
        GENERATION_CONFIG_CASES,
        prop_oneof![4 => json_edits(3).prop_map(Ok), 1 => byte_edits(3).prop_map(Err)],
        |edit| {
            let text = match &edit {
                Ok(e) => serde_json::to_vec(&apply_json(&doc, e, &[])).unwrap(),
                Err(e) => apply_bytes(&source, 0..source.len(), e, &[]),
            };
            let must_fail = json_faults(&text, |v| {
                wrong_types(v, &[("eos_token_id", &[Ty::U32, Ty::U32s, Ty::Null])])
            });
            let root = tempfile::tempdir().unwrap();
            std::fs::write(root.path().join("generation_config.json"), &text).unwrap();
            let before = snapshot(root.path());
            match lowrank_models::generate::stop_token_ids(root.path(), &model, &tokenizer) {
                Ok(ids) => {
                    ensure!(must_fail.is_empty(), "accepted {must_fail:?}");
                    ensure!(!ids.is_empty(), "no stop token at all");
                }
                Err(e) => {
                    check_error(&e.to_string(), &[&root.path().display().to_string()])?;
                    check_type_error_names_field(
                        &e.to_string(),
                        &["generation_config.json"],
                        &must_fail,
                    )?;
                }
            }
            check_unchanged(root.path(), &before)
        },
    );
}

/// Every fixture model loads as it is: the properties above start from working files.
#[test]
fn fixture_models_load() {
    for m in MODELS.iter().chain(&["models/llama-untied"]) {
        Llama::load(Path::new(&fixtures().join(m)), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{m}: {e}"));
    }
}
