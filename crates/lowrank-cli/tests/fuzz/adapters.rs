//! PEFT adapter folders (LoRA, DoRA, AdaLoRA): `adapter_config.json` and
//! `adapter_model.safetensors`, loaded against the llama-tied fixture model as `eval`,
//! `generate`, `merge` and the server load them, and standalone as `inspect`, `combine` and
//! `analyze` do.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::Device;
use lowrank_core::lora::LoraAdapter;
use lowrank_models::Llama;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use crate::ensure;
use crate::support::*;

const CONFIG_CASES: u32 = 1500;
const GENERATED_CONFIG_CASES: u32 = 500;
const WEIGHTS_CASES: u32 = 1500;
const GENERATED_WEIGHTS_CASES: u32 = 300;

/// Adapters of the llama-tied fixture: LoRA, DoRA, AdaLoRA (masked and not yet masked).
const ADAPTERS: &[&str] = &[
    "adapters/llama-tied__lora-qv",
    "adapters/llama-tied__dora",
    "adalora/trained",
    "adalora/init",
];
/// Adapters of other bases, only spliced from.
const FOREIGN: &[&str] = &[
    "adapters/qwen2-tied__regex",
    "adapters/mistral__layers",
    "adapters/llama-untied__all-linear",
];

const SHARED_FIELDS: &[(&str, &[Ty])] = &[
    ("peft_type", &[Ty::Str]),
    ("task_type", &[Ty::Str, Ty::Null]),
    ("base_model_name_or_path", &[Ty::Str, Ty::Null]),
    ("lora_alpha", &[Ty::Num]),
    ("lora_dropout", &[Ty::Num]),
    ("target_modules", &[Ty::Str, Ty::Strs, Ty::Null]),
    ("exclude_modules", &[Ty::Str, Ty::Strs, Ty::Null]),
    ("layers_to_transform", &[Ty::UInt, Ty::UInts, Ty::Null]),
    ("layers_pattern", &[Ty::Str, Ty::Strs, Ty::Null]),
    ("bias", &[Ty::Str]),
    ("fan_in_fan_out", &[Ty::Bool]),
    ("use_dora", &[Ty::Bool]),
    ("modules_to_save", &[Ty::Strs, Ty::Null]),
];
const LORA_FIELDS: &[(&str, &[Ty])] = &[
    ("r", &[Ty::UInt]),
    ("use_rslora", &[Ty::Bool]),
    ("rank_pattern", &[Ty::Object]),
    ("alpha_pattern", &[Ty::Object]),
];
const ADALORA_FIELDS: &[(&str, &[Ty])] = &[
    ("init_r", &[Ty::UInt]),
    ("target_r", &[Ty::UInt]),
    ("tinit", &[Ty::UInt]),
    ("tfinal", &[Ty::UInt]),
    ("deltaT", &[Ty::UInt]),
    ("beta1", &[Ty::Num]),
    ("beta2", &[Ty::Num]),
    ("orth_reg_weight", &[Ty::Num]),
    ("total_step", &[Ty::UInt, Ty::Null]),
    ("rank_pattern", &[Ty::Object, Ty::Null]),
];

/// The fields of a config that have a type its parser cannot take.
fn config_type_errors(config: &Value) -> Vec<String> {
    let kind = config.get("peft_type").and_then(Value::as_str);
    let specific = match kind {
        Some("ADALORA") => ADALORA_FIELDS,
        _ => LORA_FIELDS,
    };
    let mut wrong = wrong_types(config, SHARED_FIELDS);
    wrong.extend(wrong_types(config, specific));
    wrong
}

fn model() -> &'static Llama {
    static MODEL: OnceLock<Llama> = OnceLock::new();
    MODEL.get_or_init(|| Llama::load(&fixtures().join("models/llama-tied"), &Device::Cpu).unwrap())
}

struct Sources {
    configs: Vec<Vec<u8>>,
    weights: Vec<Vec<u8>>,
    /// Every adapter file, own and foreign, to splice from.
    donors: Vec<Vec<u8>>,
}

fn sources() -> &'static Sources {
    static SOURCES: OnceLock<Sources> = OnceLock::new();
    SOURCES.get_or_init(|| {
        let read = |dir: &str, file: &str| read_fixture(&format!("{dir}/{file}"));
        let configs = ADAPTERS
            .iter()
            .map(|d| read(d, "adapter_config.json"))
            .collect();
        let weights = ADAPTERS
            .iter()
            .map(|d| read(d, "adapter_model.safetensors"))
            .collect();
        let donors = ADAPTERS
            .iter()
            .chain(FOREIGN)
            .flat_map(|d| {
                [
                    read(d, "adapter_config.json"),
                    read(d, "adapter_model.safetensors"),
                ]
            })
            .collect();
        Sources {
            configs,
            weights,
            donors,
        }
    })
}

/// Writes the folder, loads it both ways, and checks the outcome: no panic, an error naming the
/// folder's file, an error whenever the config has a field of the wrong type, nothing written.
fn check_adapter(config: &[u8], weights: &[u8]) -> Result<(), TestCaseError> {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("adapter");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
    let before = snapshot(root.path());
    let must_fail = json_faults(config, config_type_errors);
    let dir_name = dir.display().to_string();
    for (how, result) in [
        ("against the model", model().load_adapter(&dir).map(|_| ())),
        (
            "standalone",
            LoraAdapter::load_standalone(&dir, &Device::Cpu).map(|_| ()),
        ),
    ] {
        match result {
            Ok(()) => ensure!(
                must_fail.is_empty(),
                "loaded {how} with fields of the wrong type: {must_fail:?}"
            ),
            Err(e) => {
                check_error(&e.to_string(), &[&dir_name])?;
                check_type_error_names_field(&e.to_string(), &["adapter_config.json"], &must_fail)?;
            }
        }
    }
    check_unchanged(root.path(), &before)
}

/// How a config is made: a fixture's edited as JSON or as text.
#[derive(Debug, Clone)]
enum ConfigEdit {
    Json(Vec<JsonEdit>),
    Text(Vec<ByteEdit>),
}

fn config_edit() -> impl Strategy<Value = ConfigEdit> {
    prop_oneof![
        4 => json_edits(3).prop_map(ConfigEdit::Json),
        1 => byte_edits(3).prop_map(ConfigEdit::Text),
    ]
}

fn donor_refs(s: &Sources) -> Vec<&[u8]> {
    s.donors.iter().map(Vec::as_slice).collect()
}

/// `adapter_config.json` edited (over the weights of the same or, for splicing, another
/// adapter).
#[test]
fn adapter_config_json() {
    let s = sources();
    let donor_jsons: Vec<Value> = s
        .donors
        .iter()
        .filter_map(|d| serde_json::from_slice(d).ok())
        .collect();
    run(
        "adapter_config.json (mutated fixtures)",
        CONFIG_CASES,
        (any::<Index>(), any::<Index>(), any::<bool>(), config_edit()),
        |(config_src, weights_src, same, edit)| {
            let c = config_src.index(ADAPTERS.len());
            let w = if same {
                c
            } else {
                weights_src.index(ADAPTERS.len())
            };
            let config = match &edit {
                ConfigEdit::Json(e) => {
                    let doc: Value = serde_json::from_slice(&s.configs[c]).unwrap();
                    let refs: Vec<&Value> = donor_jsons.iter().collect();
                    serde_json::to_vec_pretty(&apply_json(&doc, e, &refs)).unwrap()
                }
                ConfigEdit::Text(e) => {
                    apply_bytes(&s.configs[c], 0..s.configs[c].len(), e, &donor_refs(s))
                }
            };
            check_adapter(&config, &s.weights[w])
        },
    );
}

/// A value of type `ty`, as a config would hold it.
fn typed_value(ty: Ty) -> BoxedStrategy<Value> {
    match ty {
        Ty::Null => Just(Value::Null).boxed(),
        Ty::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        Ty::UInt => prop_oneof![0u64..20, any::<u64>()]
            .prop_map(Value::from)
            .boxed(),
        Ty::Num => prop_oneof![0.0..1.0f64, -100.0..100.0f64, Just(1e300)]
            .prop_map(Value::from)
            .boxed(),
        Ty::Str => prop::sample::select(vec![
            "LORA",
            "ADALORA",
            "none",
            "q_proj",
            ".*",
            "all-linear",
        ])
        .prop_map(Value::from)
        .boxed(),
        Ty::Strs => prop::collection::vec(
            prop::sample::select(vec!["q_proj", "v_proj", "down_proj", "layers", "x"]),
            0..4,
        )
        .prop_map(|v| Value::Array(v.into_iter().map(Value::from).collect()))
        .boxed(),
        Ty::UInts => prop::collection::vec(0u64..4, 0..3)
            .prop_map(|v| Value::Array(v.into_iter().map(Value::from).collect()))
            .boxed(),
        Ty::Object => prop::collection::btree_map(key(), 0u64..6, 0..3)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k, Value::from(v))).collect()))
            .boxed(),
        Ty::U32 | Ty::U32s | Ty::Array => nasty_value().boxed(),
    }
}

/// Configs made from scratch: every field PEFT writes, each of its own type or any other.
#[test]
fn adapter_config_generated() {
    let s = sources();
    let all_fields: Vec<(&str, &[Ty])> = SHARED_FIELDS
        .iter()
        .chain(LORA_FIELDS)
        .chain(ADALORA_FIELDS)
        .copied()
        .collect();
    let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = all_fields
        .iter()
        .map(|(name, tys)| {
            let name = name.to_string();
            let typed = prop::sample::select(tys.to_vec()).prop_flat_map(typed_value);
            let value = prop_oneof![3 => typed, 1 => nasty_value()];
            prop::option::weighted(0.6, value.prop_map(move |v| (name.clone(), v))).boxed()
        })
        .collect();
    run(
        "adapter_config.json (generated)",
        GENERATED_CONFIG_CASES,
        (
            prop::sample::select(vec!["LORA", "ADALORA"]),
            fields,
            any::<Index>(),
        ),
        |(kind, fields, weights_src)| {
            let mut doc = serde_json::Map::new();
            doc.insert("peft_type".into(), Value::from(kind));
            doc.extend(fields.into_iter().flatten());
            let config = serde_json::to_vec(&Value::Object(doc)).unwrap();
            check_adapter(&config, &s.weights[weights_src.index(ADAPTERS.len())])
        },
    );
}

/// `adapter_model.safetensors` edited: bytes of the header, bytes anywhere, the header as
/// JSON (dtypes, shapes, offsets, names), splices from other adapters' files.
#[test]
fn adapter_safetensors() {
    let s = sources();
    run(
        "adapter_model.safetensors (mutated fixtures)",
        WEIGHTS_CASES,
        (any::<Index>(), safetensors_edit()),
        |(src, edit)| {
            let i = src.index(ADAPTERS.len());
            let weights = apply_safetensors(&s.weights[i], &edit, &donor_refs(s));
            check_adapter(&s.configs[i], &weights)
        },
    );
}

/// Safetensors files made from scratch, under PEFT tensor names and others.
#[test]
fn adapter_safetensors_generated() {
    let s = sources();
    let mut names: Vec<String> = Vec::new();
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "lm_head",
    ] {
        for part in [
            "lora_A.weight",
            "lora_B.weight",
            "lora_magnitude_vector",
            "lora_A",
            "lora_E",
            "lora_B",
            "lora_embedding_A",
        ] {
            names.push(format!("base_model.model.{module}.{part}"));
        }
    }
    names.extend(["x".to_string(), String::new(), "__metadata__".to_string()]);
    run(
        "adapter_model.safetensors (generated)",
        GENERATED_WEIGHTS_CASES,
        (any::<Index>(), generated_safetensors(names)),
        |(src, weights)| check_adapter(&s.configs[src.index(ADAPTERS.len())], &weights),
    );
}

/// Every fixture adapter loads as it is: the properties above start from working files.
#[test]
fn fixture_adapters_load() {
    for dir in ADAPTERS {
        model()
            .load_adapter(Path::new(&fixtures().join(dir)))
            .unwrap_or_else(|e| panic!("{dir}: {e}"));
    }
}
