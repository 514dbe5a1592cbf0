//! The shrunk inputs the properties found, kept as plain tests (each failed before its fix).

use candle_core::Device;
use lowrank_core::lora::LoraAdapter;
use lowrank_models::Llama;
use serde_json::Value;

use crate::support::*;

/// The llama-tied fixture with `edit` applied to its config.json, loaded.
fn load_with_config(edit: impl FnOnce(&mut Value)) -> String {
    let root = tempfile::tempdir().unwrap();
    let mut config = fixture_json("models/llama-tied/config.json");
    edit(&mut config);
    std::fs::write(root.path().join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        fixtures().join("models/llama-tied/model.safetensors"),
        root.path().join("model.safetensors"),
    )
    .unwrap();
    match Llama::load(root.path(), &Device::Cpu) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

/// `num_hidden_layers` 2^31 aborted the process: the layer list (later the per-layer windows)
/// was allocated for that many.
#[test]
fn a_huge_layer_count_is_an_error_not_an_abort() {
    let err = load_with_config(|c| c["num_hidden_layers"] = Value::from(1u64 << 31));
    assert!(err.contains("num_hidden_layers"), "{err}");
    // Within the bound, the checkpoint's tensors decide.
    let err = load_with_config(|c| c["num_hidden_layers"] = Value::from(1000));
    assert!(err.contains("model.layers.2"), "{err}");
}

/// An `eos_token_id` of the wrong type in generation_config.json was ignored, as in config.json.
#[test]
fn generation_config_token_ids_of_the_wrong_type_are_errors() {
    let fixture = fixtures().join("models/llama-tied");
    let model = Llama::load(&fixture, &Device::Cpu).unwrap();
    let tokenizer = lowrank_models::Tokenizer::load(&fixture).unwrap();
    let root = tempfile::tempdir().unwrap();
    for text in [
        r#"{"eos_token_id": "2"}"#,
        r#"{"eos_token_id": [2, 1e20]}"#,
        "[]",
    ] {
        std::fs::write(root.path().join("generation_config.json"), text).unwrap();
        let err = lowrank_models::generate::stop_token_ids(root.path(), &model, &tokenizer)
            .unwrap_err()
            .to_string();
        assert!(err.contains("generation_config.json"), "{text}: {err}");
    }
}

/// An AdaLoRA `init_r` of u64::MAX panicked (capacity overflow) and one of 2^40 aborted: the
/// kept rank of a module the rank_pattern does not name was counted from a mask of init_r
/// entries built before the tensors were checked.
#[test]
fn a_huge_adalora_init_r_is_an_error_not_a_crash() {
    let fixture = fixtures().join("adalora/init");
    let model = Llama::load(&fixtures().join("models/llama-tied"), &Device::Cpu).unwrap();
    for init_r in [u64::MAX, 1 << 40] {
        let root = tempfile::tempdir().unwrap();
        let mut config = fixture_json("adalora/init/adapter_config.json");
        config["init_r"] = Value::from(init_r);
        std::fs::write(root.path().join("adapter_config.json"), config.to_string()).unwrap();
        std::fs::copy(
            fixture.join("adapter_model.safetensors"),
            root.path().join("adapter_model.safetensors"),
        )
        .unwrap();
        let err = model.load_adapter(root.path()).unwrap_err().to_string();
        assert!(err.contains("has shape"), "{err}");
        let err = LoraAdapter::load_standalone(root.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("has shape"), "{err}");
    }
}
