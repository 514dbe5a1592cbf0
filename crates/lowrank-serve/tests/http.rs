//! The server over real HTTP on loopback: mixed-adapter batches, run-time adapter changes,
//! eviction, auth, bad requests and streaming.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use lowrank_models::generate::{generate, Sampler, SamplingParams};
use lowrank_models::{ActiveAdapter, Llama, Tokenizer};
use lowrank_serve::ServeOptions;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// An adapter root holding the fixtures' adapters for llama-tied under short names.
fn adapter_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (name, src) in [
        ("tenant-lora", "llama-tied__lora-qv"),
        ("tenant-dora", "llama-tied__dora"),
        ("wrong-base", "llama-untied__all-linear"),
    ] {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fixtures().join("adapters").join(src).join(f), dir.join(f)).unwrap();
        }
    }
    root
}

fn options(adapters: &Path) -> ServeOptions {
    ServeOptions {
        model: fixtures()
            .join("models/llama-tied")
            .to_string_lossy()
            .into_owned(),
        adapters: adapters.to_path_buf(),
        host: "127.0.0.1".into(),
        port: 0,
        api_keys: None,
        max_batch: 8,
        max_queue: 16,
        max_loaded_adapters: 8,
        adapter_memory_mb: 64,
        kv_cache_mb: 64,
        max_tokens_limit: 512,
        max_body_bytes: 64 * 1024,
        request_timeout_s: 60,
        allow_any_adapter_path: false,
        merge: None,
        served_model_name: Some("base".into()),
        bf16_weights: false,
        quantize: None,
    }
}

struct Server {
    url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(opts: ServeOptions) -> Server {
        let state = lowrank_serve::build_state(&opts).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            lowrank_serve::serve_on(state, listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server {
            url,
            shutdown: Some(tx),
            handle,
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_with(path, body, None).await
    }

    async fn post_with(&self, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> String {
        reqwest::get(format!("{}{path}", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits (up to 30 s: tests run side by side on two cores) until the engine reports `n`
    /// running sequences.
    async fn wait_running(&self, n: usize) {
        let want = format!("lowrank_running_requests {n}\n");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            if self.get("/metrics").await.contains(&want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("never saw {n} running requests");
    }

    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .unwrap()
            .unwrap();
    }
}

/// What `lowrank generate` gives for this adapter and prompt, greedy.
fn expected_text(adapter: Option<&str>, prompt: &str, max_tokens: usize) -> String {
    expected_text_with(adapter, prompt, max_tokens, false)
}

/// Greedy text of one sequence decoded alone, over a base stored in bf16 when `bf16`.
fn expected_text_with(
    adapter: Option<&str>,
    prompt: &str,
    max_tokens: usize,
    bf16: bool,
) -> String {
    let stack: Vec<(PathBuf, f64)> = adapter
        .map(|a| (fixtures().join("adapters").join(a), 1.0))
        .into_iter()
        .collect();
    expected_stacked(&stack, prompt, max_tokens, bf16)
}

/// Greedy text of one sequence decoded alone with the adapter folders of `stack` applied
/// together at their weights, as `lowrank generate --adapter DIR:WEIGHT …` does.
fn expected_stacked(
    stack: &[(PathBuf, f64)],
    prompt: &str,
    max_tokens: usize,
    bf16: bool,
) -> String {
    expected_on(
        &fixtures().join("models/llama-tied"),
        stack,
        prompt,
        max_tokens,
        bf16,
    )
}

/// [`expected_stacked`] over the model in `dir`.
fn expected_on(
    dir: &Path,
    stack: &[(PathBuf, f64)],
    prompt: &str,
    max_tokens: usize,
    bf16: bool,
) -> String {
    let mut model = Llama::load(dir, &Device::Cpu).unwrap();
    if bf16 {
        model.cast_for_inference(candle_core::DType::BF16).unwrap();
    }
    let tokenizer = Tokenizer::load(dir).unwrap();
    let adapters: Vec<_> = stack
        .iter()
        .map(|(path, _)| model.load_adapter(path).unwrap())
        .collect();
    let active: Vec<ActiveAdapter> = adapters
        .iter()
        .zip(stack)
        .map(|(a, (_, w))| ActiveAdapter::weighted(a, *w))
        .collect();
    let ids = tokenizer.encode(prompt, true).unwrap();
    let stops = lowrank_models::generate::stop_token_ids(dir, &model, &tokenizer).unwrap();
    let mut sampler = Sampler::new(SamplingParams::default());
    let out = generate(
        &model,
        &ids,
        &active,
        &mut sampler,
        max_tokens,
        &stops,
        |_| Ok(()),
    )
    .unwrap();
    tokenizer.decode(&out, true).unwrap()
}

fn completion(model: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// Sends every (model, adapter fixture, prompt) case at once and checks each answer against
/// that sequence decoded alone (over a bf16 base when `bf16`).
async fn assert_concurrent_greedy(
    server: &Arc<Server>,
    cases: &[(&'static str, Option<&str>, &'static str)],
    max_tokens: usize,
    bf16: bool,
) {
    let mut tasks = Vec::new();
    for &(model, _, prompt) in cases {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            server
                .post("/v1/completions", completion(model, prompt, max_tokens))
                .await
        }));
    }
    for ((_, adapter, prompt), task) in cases.iter().zip(tasks) {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["text"],
            expected_text_with(*adapter, prompt, max_tokens, bf16),
            "{adapter:?} {prompt}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_adapter_batches_give_each_request_its_own_greedy_tokens() {
    let root = adapter_root();
    let server = Arc::new(Server::start(options(root.path())).await);
    let cases = [
        ("tenant-lora", Some("llama-tied__lora-qv"), "The quick cat"),
        ("tenant-dora", Some("llama-tied__dora"), "A dog runs"),
        ("base", None, "The quick cat"),
        (
            "tenant-lora",
            Some("llama-tied__lora-qv"),
            "Birds sing in the morning",
        ),
        ("tenant-dora", Some("llama-tied__dora"), "The quick cat"),
    ];
    assert_concurrent_greedy(&server, &cases, 24, false).await;
    let metrics = server.get("/metrics").await;
    // Rows were batched: some step saw more than one row.
    let single: u64 = metrics
        .lines()
        .find(|l| l.starts_with("lowrank_batch_size_bucket{le=\"1\"}"))
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let all: u64 = metrics
        .lines()
        .find(|l| l.starts_with("lowrank_batch_size_count"))
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(all > single, "no batched step: {single} of {all}");
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}

/// The newer model families (fixtures/families): requests with each family's adapters
/// (all-linear LoRA, DoRA, a rank/alpha pattern on one layer) and the base, sent at once, each
/// get the greedy tokens of their sequence decoded alone; a system turn to Gemma 2 gets its
/// template's refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_adapter_batches_on_every_family() {
    for family in ["qwen3", "phi3", "gemma2", "gemma3"] {
        let family_dir = fixtures().join("families").join(family);
        let root = tempfile::tempdir().unwrap();
        let adapters = ["all-linear", "dora", "pattern"];
        for name in adapters {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                let src = family_dir.join("adapters").join(name).join(f);
                std::fs::copy(src, dir.join(f)).unwrap();
            }
        }
        let model_dir = family_dir.join("model");
        let opts = ServeOptions {
            model: model_dir.to_string_lossy().into_owned(),
            ..options(root.path())
        };
        let server = Arc::new(Server::start(opts).await);
        let cases = [
            ("all-linear", "The quick cat"),
            ("dora", "A dog runs"),
            ("base", "The quick cat"),
            ("pattern", "Birds sing in the morning"),
            ("all-linear", "Why does my garden"),
        ];
        let mut tasks = Vec::new();
        for (model, prompt) in cases {
            let server = server.clone();
            tasks.push(tokio::spawn(async move {
                server
                    .post("/v1/completions", completion(model, prompt, 16))
                    .await
            }));
        }
        for ((model, prompt), task) in cases.iter().zip(tasks) {
            let (status, body) = task.await.unwrap();
            assert_eq!(status, 200, "{family}: {body}");
            let stack: Vec<(PathBuf, f64)> = (*model != "base")
                .then(|| (family_dir.join("adapters").join(model), 1.0))
                .into_iter()
                .collect();
            assert_eq!(
                body["choices"][0]["text"],
                expected_on(&model_dir, &stack, prompt, 16, false),
                "{family} {model} {prompt}"
            );
        }
        if family == "gemma2" {
            // Gemma 2's template refuses a system turn: the request gets its reason.
            let messages = json!([{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}]);
            let (status, body) = server
                .post(
                    "/v1/chat/completions",
                    json!({"model": "base", "messages": messages}),
                )
                .await;
            assert_eq!(status, 400, "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("System role not supported"), "{body}");
        }
        Arc::try_unwrap(server).ok().unwrap().stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sends_the_same_text_as_a_whole_answer() {
    let root = adapter_root();
    let server = Server::start(options(root.path())).await;
    let mut body = completion("tenant-lora", "The quick cat", 20);
    body["stream"] = true.into();
    body["stream_options"] = json!({"include_usage": true});
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", server.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        streamed,
        expected_text(Some("llama-tied__lora-qv"), "The quick cat", 20)
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 20);
    // Chat streaming starts with the assistant role.
    let chat = json!({"model": "tenant-dora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true});
    let text = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&chat)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let first: Value =
        serde_json::from_str(text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["object"], "chat.completion.chunk");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_unload_and_replace_while_requests_run() {
    let root = adapter_root();
    let server = Arc::new(Server::start(options(root.path())).await);
    let long = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .post(
                    "/v1/completions",
                    // A prompt whose greedy answer runs the full 240 tokens (no early EOS).
                    completion("tenant-lora", "A dog runs", 240),
                )
                .await
        })
    };
    server.wait_running(1).await;
    // Replace tenant-lora by the DoRA adapter and add a new id, while the long request runs.
    let (s, b) = server
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "tenant-lora", "lora_path": "tenant-dora"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, _) = server
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "extra", "lora_path": "tenant-lora"}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, b) = server
        .post(
            "/v1/completions",
            completion("tenant-lora", "A dog runs", 8),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        b["choices"][0]["text"],
        expected_text(Some("llama-tied__dora"), "A dog runs", 8)
    );
    // The running request kept the version it started with.
    let (s, b) = long.await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        b["choices"][0]["text"],
        expected_text(Some("llama-tied__lora-qv"), "A dog runs", 240)
    );
    let (s, _) = server
        .post("/v1/unload_lora_adapter", json!({"lora_name": "extra"}))
        .await;
    assert_eq!(s, 200);
    let (s, _) = server
        .post("/v1/completions", completion("extra", "x", 2))
        .await;
    assert_eq!(s, 404);
    let (s, b) = server
        .post("/v1/unload_lora_adapter", json!({"lora_name": "extra"}))
        .await;
    assert_eq!(s, 404, "{b}");
    // No path traversal out of the adapter root.
    let (s, b) = server
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "evil", "lora_path": "../"}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .contains("outside the adapter root"));
    let (s, _) = server
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "../x", "lora_path": "tenant-lora"}),
        )
        .await;
    assert_eq!(s, 400);
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_budgets_evict_least_recently_used_adapters() {
    let root = adapter_root();
    let mut opts = options(root.path());
    opts.max_loaded_adapters = 1;
    let server = Server::start(opts).await;
    for model in ["tenant-lora", "tenant-dora", "tenant-lora"] {
        let (s, b) = server
            .post("/v1/completions", completion(model, "The quick cat", 4))
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let metrics = server.get("/metrics").await;
    assert!(metrics.contains("lowrank_adapters_loaded 1\n"), "{metrics}");
    assert!(
        metrics.contains("lowrank_adapter_evictions_total 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lowrank_adapter_loads_total 3\n"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_adapters_and_management() {
    let root = adapter_root();
    let keys = root.path().join("keys.json");
    std::fs::write(&keys, r#"{"sk-lora": ["tenant-lora"], "sk-admin": "*"}"#).unwrap();
    let mut opts = options(root.path());
    opts.api_keys = Some(keys);
    let server = Server::start(opts).await;
    let req = completion("tenant-lora", "x", 2);
    assert_eq!(
        server
            .post_with("/v1/completions", req.clone(), None)
            .await
            .0,
        401
    );
    assert_eq!(
        server
            .post_with("/v1/completions", req.clone(), Some("sk-wrong"))
            .await
            .0,
        401
    );
    assert_eq!(
        server
            .post_with("/v1/completions", req.clone(), Some("sk-lora"))
            .await
            .0,
        200
    );
    let (s, b) = server
        .post_with(
            "/v1/completions",
            completion("tenant-dora", "x", 2),
            Some("sk-lora"),
        )
        .await;
    assert_eq!(s, 403, "{b}");
    assert_eq!(
        server
            .post_with(
                "/v1/completions",
                completion("base", "x", 2),
                Some("sk-lora")
            )
            .await
            .0,
        403
    );
    let load = json!({"lora_name": "more", "lora_path": "tenant-dora"});
    assert_eq!(
        server
            .post_with("/v1/load_lora_adapter", load.clone(), Some("sk-lora"))
            .await
            .0,
        403
    );
    assert_eq!(
        server
            .post_with("/v1/load_lora_adapter", load, Some("sk-admin"))
            .await
            .0,
        200
    );
    let models = reqwest::Client::new()
        .get(format!("{}/v1/models", server.url))
        .bearer_auth("sk-lora")
        .send()
        .await
        .unwrap();
    let ids: Vec<String> = models.json::<Value>().await.unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["tenant-lora"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let root = adapter_root();
    let server = Server::start(options(root.path())).await;
    let client = reqwest::Client::new();
    let raw = client
        .post(format!("{}/v1/completions", server.url))
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let body: Value = raw.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid request body"));
    for (req, status, needle) in [
        (json!({"model": "base"}), 400, "prompt"),
        (
            json!({"model": "base", "prompt": "x", "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": "base", "prompt": "x", "max_tokens": 100000}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": "base", "prompt": "x", "temperature": 5}),
            400,
            "temperature",
        ),
        (
            json!({"model": "base", "prompt": "x", "top_p": 0}),
            400,
            "top_p",
        ),
        (
            json!({"model": "base", "prompt": ["a", "b"]}),
            400,
            "exactly one",
        ),
        (json!({"model": "nobody", "prompt": "x"}), 404, "not found"),
        (
            json!({"model": "tenant-lora", "adapter": "tenant-dora", "prompt": "x"}),
            400,
            "disagree",
        ),
        (
            json!({"model": "wrong-base", "prompt": "x"}),
            422,
            "cannot be loaded",
        ),
    ] {
        let (s, b) = server.post("/v1/completions", req.clone()).await;
        assert_eq!(s, status, "{req}: {b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains(needle),
            "{req}: {b}"
        );
    }
    let (s, _) = server
        .post(
            "/v1/chat/completions",
            json!({"model": "base", "messages": []}),
        )
        .await;
    assert_eq!(s, 400);
    // A broken adapter does not hurt the others.
    assert_eq!(
        server
            .post("/v1/completions", completion("tenant-lora", "x", 2))
            .await
            .0,
        200
    );
    let big = "x".repeat(100 * 1024);
    let resp = client
        .post(format!("{}/v1/completions", server.url))
        .json(&json!({"model": "base", "prompt": big}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(server.get("/health").await, r#"{"status":"ok"}"#);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429() {
    let root = adapter_root();
    let mut opts = options(root.path());
    opts.max_batch = 1;
    opts.max_queue = 0;
    let server = Arc::new(Server::start(opts).await);
    let long = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .post("/v1/completions", completion("base", "The quick cat", 240))
                .await
        })
    };
    server.wait_running(1).await;
    let (s, b) = server
        .post("/v1/completions", completion("base", "x", 2))
        .await;
    assert_eq!(s, 429, "{b}");
    assert_eq!(long.await.unwrap().0, 200);
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_cancels_its_sequence() {
    let root = adapter_root();
    let server = Server::start(options(root.path())).await;
    // The fixture model has 256 positions: about the longest answer it can give after this
    // prompt (whose greedy answer does not stop at EOS before).
    let mut body = completion("tenant-lora", "A dog runs", 240);
    body["stream"] = true.into();
    let mut resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", server.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.chunk().await.unwrap().is_some());
    drop(resp);
    let mut cancelled = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let m = server.get("/metrics").await;
        if m.contains("lowrank_requests_total{status=\"cancelled\"} 1")
            && m.contains("lowrank_running_requests 0")
        {
            cancelled = true;
            break;
        }
    }
    assert!(cancelled, "the sequence kept running after the client left");
    let m = server.get("/metrics").await;
    let generated: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("lowrank_generated_tokens_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        generated < 240,
        "generated {generated} tokens for a client that left"
    );
    server.stop().await;
}

/// A bf16 base serves LoRA, DoRA and base rows in one batch, each as that sequence decoded
/// alone over the same bf16 base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bf16_base_serves_mixed_batches() {
    let root = adapter_root();
    let mut opts = options(root.path());
    opts.bf16_weights = true;
    let server = Arc::new(Server::start(opts).await);
    let cases = [
        ("tenant-lora", Some("llama-tied__lora-qv"), "The quick cat"),
        ("tenant-dora", Some("llama-tied__dora"), "A dog runs"),
        ("base", None, "Birds sing in the morning"),
    ];
    assert_concurrent_greedy(&server, &cases, 16, true).await;
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_mode_serves_one_adapter_at_base_speed() {
    let root = adapter_root();
    let mut opts = options(root.path());
    opts.merge = Some("tenant-lora".into());
    opts.served_model_name = None;
    let server = Server::start(opts).await;
    let (s, b) = server
        .post(
            "/v1/completions",
            completion("tenant-lora", "The quick cat", 12),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["choices"][0]["text"],
        expected_text(Some("llama-tied__lora-qv"), "The quick cat", 12)
    );
    // No adapters on top of a merged model.
    let (s, _) = server
        .post("/v1/completions", completion("tenant-dora", "x", 2))
        .await;
    assert_eq!(s, 422);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_and_end_the_request() {
    let root = adapter_root();
    let server = Server::start(options(root.path())).await;
    let full = expected_text(Some("llama-tied__lora-qv"), "The quick cat", 24);
    // A stop string taken from the middle of the greedy answer.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[6..8].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let mut body = completion("tenant-lora", "The quick cat", 24);
    body["stop"] = json!([stop]);
    let (s, b) = server.post("/v1/completions", body).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["choices"][0]["text"], cut);
    assert_eq!(b["choices"][0]["finish_reason"], "stop");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_their_timeout_get_an_error() {
    let root = adapter_root();
    let mut opts = options(root.path());
    opts.request_timeout_s = 0;
    let server = Server::start(opts).await;
    let (s, b) = server
        .post("/v1/completions", completion("base", "The quick cat", 8))
        .await;
    assert_eq!(s, 500, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{b}"
    );
    assert!(server
        .get("/metrics")
        .await
        .contains("lowrank_requests_total{status=\"timed_out\"} 1"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapter_memory_budget_evicts_too() {
    let root = adapter_root();
    let mut opts = options(root.path());
    // Room for no adapter at all: each load evicts every other idle one.
    opts.adapter_memory_mb = 0;
    let server = Server::start(opts).await;
    for model in ["tenant-lora", "tenant-dora"] {
        let (s, b) = server
            .post("/v1/completions", completion(model, "x", 2))
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let metrics = server.get("/metrics").await;
    assert!(metrics.contains("lowrank_adapters_loaded 1\n"), "{metrics}");
    assert!(
        metrics.contains("lowrank_adapter_evictions_total 1\n"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_running_requests() {
    let root = adapter_root();
    let mut server = Server::start(options(root.path())).await;
    // Three long requests in one batch: on this tiny model a lone one can finish between two
    // polls of /metrics, and the test needs requests still running when the signal comes.
    // (Prompts whose greedy answers run the full 240 tokens rather than stopping at EOS.)
    let prompts = ["A dog runs", "Birds sing", "The quick dog"];
    let mut tasks = Vec::new();
    for prompt in prompts {
        let url = format!("{}/v1/completions", server.url);
        tasks.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(url)
                .json(&completion("tenant-lora", prompt, 240))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }));
    }
    server.wait_running(prompts.len()).await;
    let _ = server.shutdown.take().unwrap().send(());
    for (prompt, task) in prompts.iter().zip(tasks) {
        let (s, b) = task.await.unwrap();
        assert_eq!(s, 200, "{b}");
        assert_eq!(
            b["choices"][0]["text"],
            expected_text(Some("llama-tied__lora-qv"), prompt, 240)
        );
    }
    tokio::time::timeout(Duration::from_secs(30), server.handle)
        .await
        .unwrap()
        .unwrap();
}

/// A rank-8 LoRA on every linear of the llama-tied fixture, written under `root/name`.
fn write_wide_adapter(root: &Path, name: &str) -> PathBuf {
    use lowrank_core::lora::{LoraAdapter, LoraConfig, LoraModule};
    let model = Llama::load(&fixtures().join("models/llama-tied"), &Device::Cpu).unwrap();
    let modules = model
        .linears()
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let t = |rows: usize, cols: usize, seed: usize| {
                let v: Vec<f32> = (0..rows * cols)
                    .map(|k| (((k * 31 + seed * 17 + i * 7) % 61) as f32 - 30.0) / 90.0)
                    .collect();
                candle_core::Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
            };
            let module = LoraModule {
                a: t(8, l.in_features, 1),
                b: t(l.out_features, 8, 2),
                magnitude: None,
                scale: 0.5,
            };
            (l.name, module)
        })
        .collect();
    let config = LoraConfig::new(
        8,
        4.0,
        lowrank_core::targets::ModuleSelector::Names(
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
        ),
    );
    let dir = root.join(name);
    LoraAdapter { config, modules }.save(&dir).unwrap();
    dir
}

/// A request stacking two adapters of different ranks at weights, batched with one-adapter,
/// DoRA and base requests, gets the greedy tokens of that stack decoded alone; a DoRA adapter
/// in a stack, a stack beside `adapter` or naming the base are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stacked_adapters_batch_with_everything_else() {
    let root = adapter_root();
    let wide = write_wide_adapter(root.path(), "tenant-wide");
    let lora = fixtures().join("adapters/llama-tied__lora-qv");
    let server = Arc::new(Server::start(options(root.path())).await);
    let stacked = |prompt: &str| {
        json!({"model": "base", "prompt": prompt, "max_tokens": 16, "temperature": 0,
               "adapters": [{"name": "tenant-lora", "weight": 0.7}, {"name": "tenant-wide", "weight": 0.3}]})
    };
    let mut tasks = Vec::new();
    for body in [
        stacked("The quick cat"),
        completion("tenant-lora", "The quick cat", 16),
        completion("tenant-dora", "A dog runs", 16),
        stacked("Birds sing in the morning"),
        completion("base", "The quick cat", 16),
    ] {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            server.post("/v1/completions", body).await
        }));
    }
    let stack = [(lora.clone(), 0.7), (wide.clone(), 0.3)];
    let want = [
        expected_stacked(&stack, "The quick cat", 16, false),
        expected_text(Some("llama-tied__lora-qv"), "The quick cat", 16),
        expected_text(Some("llama-tied__dora"), "A dog runs", 16),
        expected_stacked(&stack, "Birds sing in the morning", 16, false),
        expected_text(None, "The quick cat", 16),
    ];
    for (i, (task, want)) in tasks.into_iter().zip(want).enumerate() {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(body["choices"][0]["text"], want, "request {i}");
    }
    assert_ne!(
        expected_stacked(&stack, "The quick cat", 16, false),
        expected_text(Some("llama-tied__lora-qv"), "The quick cat", 16),
        "the stack changes the answer"
    );
    for (adapters, extra, needle) in [
        (
            json!([{"name": "tenant-dora"}, {"name": "tenant-lora"}]),
            json!({}),
            "DoRA",
        ),
        (
            json!([{"name": "tenant-dora", "weight": 0.5}]),
            json!({}),
            "DoRA",
        ),
        (
            json!([{"name": "tenant-lora"}]),
            json!({"adapter": "tenant-lora"}),
            "without `adapter`",
        ),
        (json!([{"name": "base"}]), json!({}), "names adapters"),
        (json!([]), json!({}), "1 to 8"),
    ] {
        let mut body =
            json!({"model": "base", "prompt": "x", "max_tokens": 2, "adapters": adapters});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, answer) = server.post("/v1/completions", body).await;
        assert_eq!(status, 400, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}
