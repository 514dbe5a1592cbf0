//! The server's request bodies (completions, chat, adapter loading) and headers, sent through
//! its router in-process (`tower::ServiceExt::oneshot`, no socket), and the API keys file.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use lowrank_serve::auth::ApiKeys;
use lowrank_serve::{AppState, ServeOptions};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use crate::support::*;
use crate::tokenizers::messages;
use crate::{ensure, fail};

const GENERATED_CASES: u32 = 1500;
const MUTATED_CASES: u32 = 1500;
const ADMIN_CASES: u32 = 400;
const KEYS_FILE_CASES: u32 = 1500;

const ADMIN_KEY: &str = "sk-admin";

struct Served {
    adapters: tempfile::TempDir,
    open: Arc<AppState>,
    keyed: Arc<AppState>,
    runtime: tokio::runtime::Runtime,
}

/// Two servers over the llama-tied fixture and two of its adapters: one without keys, one
/// with an API keys file.
fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let adapters = tempfile::tempdir().unwrap();
        for (name, src) in [
            ("tenant-lora", "llama-tied__lora-qv"),
            ("tenant-dora", "llama-tied__dora"),
        ] {
            let dir = adapters.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(fixtures().join("adapters").join(src).join(f), dir.join(f)).unwrap();
            }
        }
        let keys = adapters.path().join("keys.json");
        std::fs::write(
            &keys,
            json!({ADMIN_KEY: "*", "sk-a": ["tenant-lora"], "sk-base": ["base"]}).to_string(),
        )
        .unwrap();
        let options = |api_keys: Option<&Path>| ServeOptions {
            model: fixtures()
                .join("models/llama-tied")
                .to_string_lossy()
                .into_owned(),
            adapters: adapters.path().to_path_buf(),
            host: "127.0.0.1".into(),
            port: 0,
            api_keys: api_keys.map(Path::to_path_buf),
            max_batch: 4,
            max_queue: 64,
            max_loaded_adapters: 4,
            adapter_memory_mb: 64,
            kv_cache_mb: 16,
            max_tokens_limit: 64,
            max_body_bytes: 256 * 1024,
            request_timeout: std::time::Duration::from_secs(60),
            max_connections: 64,
            header_timeout: std::time::Duration::from_secs(10),
            body_timeout: std::time::Duration::from_secs(30),
            allow_any_adapter_path: false,
            allow_adapter_sources: Vec::new(),
            adapter_cache_dir: None,
            adapter_cache_mb: 1024,
            allow_hub_adapters: false,
            merge: None,
            served_model_name: Some("base".into()),
            bf16_weights: false,
            bf16_activations: false,
            quantize: None,
        };
        let open = lowrank_serve::build_state(&options(None)).unwrap();
        let keyed = lowrank_serve::build_state(&options(Some(&keys))).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Served {
            adapters,
            open,
            keyed,
            runtime,
        }
    })
}

/// Sends one request and checks the answer: never a server error, an error body with a
/// message for every refusal, a 4xx whenever `must_fail` lists something, a complete answer
/// (streams to their `[DONE]`) for every success.
fn check_request(
    state: &Arc<AppState>,
    path: &str,
    body: Vec<u8>,
    authorization: Option<&str>,
    must_fail: &[String],
) -> Result<(), TestCaseError> {
    let mut req = Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/json");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let Ok(req) = req.body(Body::from(body)) else {
        // Not a header value a client could send.
        return Ok(());
    };
    let router = lowrank_serve::router(state.clone());
    let (status, bytes) = served().runtime.block_on(async move {
        let resp = router.oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
            .await
            .unwrap();
        (status, bytes)
    });
    let text = String::from_utf8_lossy(&bytes);
    verbose(status.as_str(), &text);
    ensure!(!status.is_server_error(), "{status}: {text}");
    if status == StatusCode::OK {
        ensure!(
            must_fail.is_empty(),
            "200 for a body with fields of the wrong type {must_fail:?}: {text}"
        );
        if text.starts_with("data:") {
            ensure!(
                text.trim_end().ends_with("data: [DONE]"),
                "a stream without its end: {text}"
            );
        } else {
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
            if path.ends_with("completions") {
                ensure!(
                    v["choices"].as_array().is_some_and(|c| !c.is_empty()),
                    "no choices: {text}"
                );
            }
        }
    } else {
        ensure!(status.is_client_error(), "{status}: {text}");
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            TestCaseError::fail(format!("{status}: not a JSON error body ({e}): {text}"))
        })?;
        check_error(v["error"]["message"].as_str().unwrap_or_default(), &[])?;
    }
    Ok(())
}

/// The fields both endpoints read, with the types they take.
const SAMPLING_FIELDS: &[(&str, &[Ty])] = &[
    ("model", &[Ty::Str, Ty::Null]),
    ("adapter", &[Ty::Str, Ty::Null]),
    ("max_tokens", &[Ty::UInt, Ty::Null]),
    ("max_completion_tokens", &[Ty::UInt, Ty::Null]),
    ("temperature", &[Ty::Num, Ty::Null]),
    ("top_p", &[Ty::Num, Ty::Null]),
    ("seed", &[Ty::UInt, Ty::Null]),
    ("stop", &[Ty::Str, Ty::Strs, Ty::Null]),
    ("stream", &[Ty::Bool, Ty::Null]),
    ("stream_options", &[Ty::Object, Ty::Null]),
];

fn must_fail(path: &str, body: &[u8]) -> Vec<String> {
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return vec!["not JSON".into()];
    };
    let mut wrong = wrong_types(&doc, SAMPLING_FIELDS);
    if path == "/v1/completions" {
        wrong.extend(wrong_types(&doc, &[("prompt", &[Ty::Str, Ty::Strs])]));
    } else {
        wrong.extend(wrong_types(&doc, &[("messages", &[Ty::Array])]));
        let bad_message = doc["messages"].as_array().is_some_and(|list| {
            list.iter()
                .any(|m| !(m["role"].is_string() && m["content"].is_string()))
        });
        if bad_message {
            wrong.push("messages: not role/content strings".into());
        }
    }
    wrong
}

/// A plausible value of request field `name` most of the time, anything now and then.
fn field_value(name: &'static str) -> BoxedStrategy<Value> {
    let text = |re: &'static str| re.prop_map(Value::from);
    let typed: BoxedStrategy<Value> = match name {
        "model" => prop_oneof![
            4 => prop::sample::select(vec!["base", "tenant-lora", "tenant-dora"]),
            1 => prop::sample::select(vec!["missing", "../tenant-lora", ""]),
        ]
        .prop_map(Value::from)
        .boxed(),
        "adapter" => prop::sample::select(vec!["tenant-lora", "tenant-dora", "base", "nope"])
            .prop_map(Value::from)
            .boxed(),
        "max_tokens" | "max_completion_tokens" => {
            prop_oneof![4 => 0u64..5, 1 => Just(64u64), 1 => Just(65u64), 1 => Just(300u64)]
                .prop_map(Value::from)
                .boxed()
        }
        "temperature" => prop_oneof![Just(0.0), 0.0..2.5f64, Just(-1.0)]
            .prop_map(Value::from)
            .boxed(),
        "top_p" => prop_oneof![Just(1.0), 0.0..1.2f64, Just(0.0)]
            .prop_map(Value::from)
            .boxed(),
        "seed" => any::<u64>().prop_map(Value::from).boxed(),
        "stop" => prop_oneof![
            text("[a-z.\n]{0,3}"),
            prop::collection::vec("[a-z.\n]{0,3}", 0..6).prop_map(Value::from),
        ]
        .boxed(),
        "stream" => any::<bool>().prop_map(Value::Bool).boxed(),
        "stream_options" => any::<bool>()
            .prop_map(|b| json!({"include_usage": b}))
            .boxed(),
        "prompt" => prop_oneof![
            3 => text("[a-zA-Z .]{0,40}"),
            1 => prop::collection::vec("[a-z ]{0,10}", 0..3).prop_map(Value::from),
        ]
        .boxed(),
        "messages" => messages()
            .prop_map(|m| serde_json::to_value(m).unwrap())
            .boxed(),
        // Fields OpenAI defines (honoured or refused) and unknown ones.
        _ => nasty_value().boxed(),
    };
    prop_oneof![10 => typed, 1 => nasty_value()].boxed()
}

/// A request body of the endpoint whose content field is `content`.
fn body(content: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let names = [
        "model",
        "adapter",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        content,
        "n",
        "logprobs",
        "echo",
        "best_of",
        "user",
    ];
    let fields: Vec<_> = names
        .iter()
        .map(|&n| {
            // The content, the model and a small max_tokens most of the time; the rest now
            // and then.
            let p = match n {
                "model" | "prompt" | "messages" | "max_tokens" => 0.9,
                "adapter" | "temperature" | "stream" | "n" | "logprobs" | "echo" | "best_of"
                | "user" => 0.1,
                _ => 0.25,
            };
            prop::option::weighted(p, field_value(n))
                .prop_map(move |v| v.map(|v| (n.to_string(), v)))
        })
        .collect();
    fields.prop_map(|fields| {
        let mut m = Map::new();
        m.extend(fields.into_iter().flatten());
        serde_json::to_vec(&Value::Object(m)).unwrap()
    })
}

fn endpoint() -> impl Strategy<Value = (&'static str, &'static str)> {
    prop::sample::select(vec![
        ("/v1/completions", "prompt"),
        ("/v1/chat/completions", "messages"),
    ])
}

/// Bodies made from scratch: every field OpenAI clients send, of its type or any other.
#[test]
fn request_bodies_generated() {
    let s = served();
    run(
        "request bodies (generated)",
        GENERATED_CASES,
        endpoint().prop_flat_map(|(path, content)| (Just(path), body(content))),
        |(path, body)| {
            let must_fail = must_fail(path, &body);
            check_request(&s.open, path, body, None, &must_fail)
        },
    );
}

/// Well-formed requests edited as JSON or bytes, to both servers with any authorization.
#[test]
fn request_bodies_mutated() {
    let s = served();
    let valid = [
        (
            "/v1/completions",
            json!({"model": "base", "prompt": "The small dog", "max_tokens": 3, "temperature": 0}),
        ),
        (
            "/v1/completions",
            json!({"model": "tenant-lora", "prompt": ["A bright window"], "max_tokens": 2,
                   "stream": true, "stream_options": {"include_usage": true}, "stop": ["."]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tenant-dora", "messages": [{"role": "user", "content": "Where is the dog?"}],
                   "max_tokens": 3, "seed": 7, "top_p": 0.9}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "base", "adapter": "tenant-lora", "max_completion_tokens": 2, "stream": true,
                   "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}),
        ),
    ];
    let donors: Vec<&Value> = valid.iter().map(|(_, v)| v).collect();
    let texts: Vec<Vec<u8>> = donors
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap())
        .collect();
    let text_refs: Vec<&[u8]> = texts.iter().map(Vec::as_slice).collect();
    let authorization = prop_oneof![
        4 => Just(None),
        2 => prop::sample::select(vec![
            "Bearer sk-admin", "Bearer sk-a", "Bearer sk-base", "bearer sk-a", "Bearer  sk-a ",
            "Bearer", "Bearer ", "Basic c2stYQ==", "sk-a",
        ])
        .prop_map(|s| Some(s.to_string())),
        1 => nasty_string().prop_map(Some),
    ];
    run(
        "request bodies (mutated)",
        MUTATED_CASES,
        (
            any::<Index>(),
            prop_oneof![3 => json_edits(3).prop_map(Ok), 1 => byte_edits(3).prop_map(Err)],
            any::<bool>(),
            authorization,
        ),
        |(src, edit, keyed, authorization)| {
            let i = src.index(valid.len());
            let (path, doc) = &valid[i];
            let body = match &edit {
                Ok(e) => serde_json::to_vec(&apply_json(doc, e, &donors)).unwrap(),
                Err(e) => apply_bytes(&texts[i], 0..texts[i].len(), e, &text_refs),
            };
            let must_fail = must_fail(path, &body);
            let state = if keyed { &s.keyed } else { &s.open };
            check_request(state, path, body, authorization.as_deref(), &must_fail)
        },
    );
}

/// `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` bodies from an admin: names and
/// paths of every kind (the adapters folder's own, outside it, missing, not names at all).
#[test]
fn adapter_management_bodies() {
    let s = served();
    let root = s.adapters.path().to_string_lossy().into_owned();
    let path = prop_oneof![
        3 => prop::sample::select(vec![
            format!("{root}/tenant-lora"),
            format!("{root}/tenant-dora"),
            "tenant-lora".to_string(),
            format!("{root}/../"),
            format!("{root}/missing"),
            root.clone(),
            "/".into(),
            "".into(),
            fixtures().join("adapters/llama-tied__lora-qv").to_string_lossy().into_owned(),
            fixtures().join("adapters/qwen2-tied__regex").to_string_lossy().into_owned(),
        ])
        .prop_map(Value::from),
        1 => nasty_value(),
    ];
    let long_name = "x".repeat(200);
    let name = prop_oneof![
        3 => prop::sample::select(vec!["fresh".to_string(), "tenant-lora".into(), "base".into(),
            "..".into(), ".".into(), "a/b".into(), "".into(), long_name])
            .prop_map(Value::from),
        1 => nasty_value(),
    ];
    run(
        "adapter management bodies (generated)",
        ADMIN_CASES,
        (any::<bool>(), name, prop::option::of(path)),
        |(load, name, path)| {
            // Keep the served adapters: unloading one would change what later cases mean.
            if !load && name.as_str().is_some_and(|n| n.starts_with("tenant-")) {
                return Ok(());
            }
            let mut body = json!({"lora_name": name});
            if let Some(p) = path {
                body["lora_path"] = p;
            }
            let endpoint = if load {
                "/v1/load_lora_adapter"
            } else {
                "/v1/unload_lora_adapter"
            };
            let mut must_fail = wrong_types(&body, &[("lora_name", &[Ty::Str])]);
            if load {
                must_fail.extend(wrong_types(&body, &[("lora_path", &[Ty::Str])]));
                if body.get("lora_path").is_none() {
                    must_fail.push("no lora_path".into());
                }
            }
            let bytes = serde_json::to_vec(&body).unwrap();
            let admin = format!("Bearer {ADMIN_KEY}");
            check_request(&s.keyed, endpoint, bytes, Some(&admin), &must_fail)
        },
    );
}

/// The API keys file (`--api-keys`), JSON or TOML, made from scratch and edited: it loads only
/// when every entry is usable (each key then grants what it lists), else the error names the
/// file.
#[test]
fn api_keys_file() {
    let key = prop_oneof![
        4 => "sk-[a-zA-Z0-9]{1,12}",
        1 => prop::sample::select(vec!["", " ", " sk-pad", "sk-pad ", "sk\u{0}x", "é", "Bearer sk", "*"])
            .prop_map(str::to_string),
    ];
    let grant = prop_oneof![
        3 => Just(Value::from("*")),
        3 => prop::collection::vec(prop::sample::select(vec!["base", "tenant-lora", "*", ""]), 0..3)
            .prop_map(Value::from),
        1 => nasty_value(),
    ];
    let file = (
        prop::collection::btree_map(key, grant, 0..4),
        any::<bool>(),
        prop::option::of(byte_edits(2)),
    );
    run(
        "API keys file (generated and mutated)",
        KEYS_FILE_CASES,
        file,
        |(entries, as_json, edits)| {
            let doc = Value::Object(entries.into_iter().collect());
            let toml_text = toml::to_string(&doc).ok().filter(|_| !as_json);
            let (name, mut text) = match toml_text {
                Some(t) => ("keys.toml", t.into_bytes()),
                // TOML has no null: such documents are written as JSON.
                None => ("keys.json", serde_json::to_vec(&doc).unwrap()),
            };
            if let Some(e) = &edits {
                text = apply_bytes(&text, 0..text.len(), e, &[]);
            }
            let root = tempfile::tempdir().unwrap();
            let path = root.path().join(name);
            std::fs::write(&path, &text).unwrap();
            let before = snapshot(root.path());
            match ApiKeys::load(&path) {
                Ok(keys) => check_keys_usable(&keys, name, &text)?,
                Err(e) => check_error(&e, &[&path.display().to_string()])?,
            }
            check_unchanged(root.path(), &before)
        },
    );
}

/// Every key of a file that loaded can be presented and grants what the file lists.
fn check_keys_usable(keys: &ApiKeys, name: &str, text: &[u8]) -> Result<(), TestCaseError> {
    // What the file says, read apart from the loader.
    let parsed: Option<Value> = if name.ends_with(".json") {
        serde_json::from_slice(text).ok()
    } else {
        std::str::from_utf8(text)
            .ok()
            .and_then(|t| toml::from_str(t).ok())
    };
    let entries = parsed.and_then(|v| v.as_object().cloned());
    let Some(entries) = entries.filter(|m| !m.is_empty()) else {
        fail!(
            "loaded a file that holds no keys: {:?}",
            String::from_utf8_lossy(text)
        );
    };
    for (k, grant) in entries {
        let header = format!("Bearer {k}");
        // What the server reads of the header a client sends.
        let sent = axum::http::HeaderValue::from_str(&header)
            .ok()
            .and_then(|h| h.to_str().ok().map(str::to_string));
        let Some(found) = sent.and_then(|h| keys.check(Some(&h))) else {
            fail!("key {k:?} loads but can never be presented");
        };
        match &grant {
            Value::String(s) => ensure!(
                s == "*" && found.is_admin(),
                "key {k:?}: {grant} read as {found:?}"
            ),
            Value::Array(ids) => {
                for id in ids {
                    ensure!(
                        id.as_str().is_some_and(|id| found.allows(id)),
                        "key {k:?} loses {id}"
                    );
                }
            }
            other => fail!("key {k:?}: {other} accepted"),
        }
    }
    Ok(())
}
