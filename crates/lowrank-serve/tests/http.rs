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

/// A client for the loopback server (plain HTTP). Roots for TLS are never needed here, and
/// not loading the platform's (reqwest's default) keeps building one cheap.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([])
        .build()
        .unwrap()
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
        request_timeout: Duration::from_secs(60),
        max_connections: 256,
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(30),
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
        let mut req = client().post(format!("{}{path}", self.url)).json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> String {
        client()
            .get(format!("{}{path}", self.url))
            .send()
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

    /// Posts `body` to /v1/completions in the background and waits until the engine runs it;
    /// the handle yields the answer.
    async fn start_running(self: &Arc<Self>, body: Value) -> tokio::task::JoinHandle<(u16, Value)> {
        let server = self.clone();
        let handle = tokio::spawn(async move { server.post("/v1/completions", body).await });
        self.wait_running(1).await;
        handle
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
    expected_text_with(adapter, prompt, max_tokens, Weights::F32)
}

/// How the expected texts' model stores its weights and rounds its activations, as the server's
/// `bf16_weights` and `bf16_activations` options.
#[derive(Clone, Copy, PartialEq)]
enum Weights {
    F32,
    Bf16,
    Bf16Activations,
}

/// Greedy text of one sequence decoded alone, over a base stored as `weights` says.
fn expected_text_with(
    adapter: Option<&str>,
    prompt: &str,
    max_tokens: usize,
    weights: Weights,
) -> String {
    let stack: Vec<(PathBuf, f64)> = adapter
        .map(|a| (fixtures().join("adapters").join(a), 1.0))
        .into_iter()
        .collect();
    expected_stacked(&stack, prompt, max_tokens, weights)
}

/// Greedy text of one sequence decoded alone with the adapter folders of `stack` applied
/// together at their weights, as `lowrank generate --adapter DIR:WEIGHT …` does.
fn expected_stacked(
    stack: &[(PathBuf, f64)],
    prompt: &str,
    max_tokens: usize,
    weights: Weights,
) -> String {
    expected_on(
        &fixtures().join("models/llama-tied"),
        stack,
        prompt,
        max_tokens,
        weights,
    )
}

/// [`expected_stacked`] over the model in `dir`.
fn expected_on(
    dir: &Path,
    stack: &[(PathBuf, f64)],
    prompt: &str,
    max_tokens: usize,
    weights: Weights,
) -> String {
    let mut model = Llama::load(dir, &Device::Cpu).unwrap();
    if weights != Weights::F32 {
        model.cast_for_inference(candle_core::DType::BF16).unwrap();
    }
    if weights == Weights::Bf16Activations {
        model.round_activations_to_bf16().unwrap();
    }
    let tokenizer = Tokenizer::load(dir).unwrap();
    let adapters: Vec<_> = stack
        .iter()
        .map(|(path, _)| model.load_adapter(path).unwrap())
        .collect();
    let active: Vec<ActiveAdapter> = adapters
        .iter()
        .zip(stack)
        .map(|(a, (_, w))| ActiveAdapter::with_coefficient(a, *w))
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
/// that sequence decoded alone (over a base stored as `weights` says).
async fn assert_concurrent_greedy(
    server: &Arc<Server>,
    cases: &[(&'static str, Option<&str>, &'static str)],
    max_tokens: usize,
    weights: Weights,
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
            expected_text_with(*adapter, prompt, max_tokens, weights),
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
    assert_concurrent_greedy(&server, &cases, 24, Weights::F32).await;
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
                expected_on(&model_dir, &stack, prompt, 16, Weights::F32),
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
    let resp = client()
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
    let text = client()
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
    // A prompt whose greedy answer runs the full 240 tokens (no early EOS).
    let long = server
        .start_running(completion("tenant-lora", "A dog runs", 240))
        .await;
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
    // The scheme's name is case-insensitive.
    let lower = client()
        .post(format!("{}/v1/completions", server.url))
        .header("authorization", "bearer sk-lora")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);
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
    let models = client()
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
    let client = client();
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
    let long = server
        .start_running(completion("base", "The quick cat", 240))
        .await;
    let (s, b) = server
        .post("/v1/completions", completion("base", "x", 2))
        .await;
    assert_eq!(s, 429, "{b}");
    // Clients are told when to come back.
    let resp = client()
        .post(format!("{}/v1/completions", server.url))
        .json(&completion("base", "x", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
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
    let mut resp = client()
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
    serves_mixed_batches(Weights::Bf16).await;
}

/// With bf16 activations too, the same: every row's input rounded alike whatever the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_activations_serve_mixed_batches() {
    serves_mixed_batches(Weights::Bf16Activations).await;
}

/// LoRA, DoRA and base rows in one batch over a base stored as `weights` says, each as that
/// sequence decoded alone.
async fn serves_mixed_batches(weights: Weights) {
    let root = adapter_root();
    let mut opts = options(root.path());
    opts.bf16_weights = weights != Weights::F32;
    opts.bf16_activations = weights == Weights::Bf16Activations;
    let server = Arc::new(Server::start(opts).await);
    let cases = [
        ("tenant-lora", Some("llama-tied__lora-qv"), "The quick cat"),
        ("tenant-dora", Some("llama-tied__dora"), "A dog runs"),
        ("base", None, "Birds sing in the morning"),
    ];
    assert_concurrent_greedy(&server, &cases, 16, weights).await;
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
    // Far shorter than 240 decoding steps (a zero timeout is refused at start).
    opts.request_timeout = Duration::from_millis(1);
    let server = Server::start(opts).await;
    let (s, b) = server
        .post("/v1/completions", completion("base", "The quick cat", 240))
        .await;
    assert_eq!(s, 504, "{b}");
    assert_eq!(b["error"]["type"], "timeout_error", "{b}");
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
            let resp = client()
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

/// The value of an unlabelled metric line.
fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
        .parse()
        .unwrap()
}

impl Server {
    fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// A raw connection that has sent `bytes`.
    fn raw(&self, bytes: &[u8]) -> std::net::TcpStream {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(self.addr()).unwrap();
        stream.write_all(bytes).unwrap();
        stream
    }
}

/// Reads until the server closes the connection (30 s at most), returning what it sent.
async fn read_until_closed(mut stream: std::net::TcpStream) -> String {
    use std::io::Read;
    tokio::task::spawn_blocking(move || {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut out = Vec::new();
        let read = stream.read_to_end(&mut out);
        assert!(
            read.is_ok(),
            "the server kept the connection open: {read:?}"
        );
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap()
}

const PARTIAL_HEAD: &[u8] = b"GET /health HTTP/1.1\r\nHost: x\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_heads_and_idle_connections_are_closed_after_the_header_timeout() {
    let root = adapter_root();
    let mut opts = options(root.path());
    opts.header_timeout = Duration::from_millis(500);
    let server = Server::start(opts).await;
    // Slowloris clients: a bounded number of connections that never finish their head.
    let partial: Vec<_> = (0..200).map(|_| server.raw(PARTIAL_HEAD)).collect();
    // The server still answers meanwhile.
    assert_eq!(server.get("/health").await, r#"{"status":"ok"}"#);
    // A kept-alive connection that goes idle after one answer.
    let idle = server.raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    for stream in partial {
        read_until_closed(stream).await;
    }
    let answered = read_until_closed(idle).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert!(answered.ends_with(r#"{"status":"ok"}"#), "{answered}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_makes_clients_wait_for_a_free_slot() {
    let root = adapter_root();
    let mut opts = options(root.path());
    opts.max_connections = 2;
    opts.header_timeout = Duration::from_secs(2);
    let server = Server::start(opts).await;
    let start = std::time::Instant::now();
    let first = server.raw(PARTIAL_HEAD);
    let second = server.raw(PARTIAL_HEAD);
    // The two partial connections hold both slots: this one can be served only once the
    // header timeout has closed one of them, so not before it has run out.
    let third = server.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let answer = read_until_closed(third).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "a third connection was served while two were open"
    );
    read_until_closed(first).await;
    read_until_closed(second).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_gets_408_and_an_oversized_one_413_as_json() {
    let root = adapter_root();
    let mut opts = options(root.path());
    opts.body_timeout = Duration::from_millis(300);
    let server = Server::start(opts).await;
    let slow = server.raw(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"",
    );
    let answer = read_until_closed(slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""type":"timeout_error""#), "{answer}");
    assert!(answer.contains("--body-timeout-s"), "{answer}");
    let big = "x".repeat(100 * 1024);
    let resp = client()
        .post(format!("{}/v1/completions", server.url))
        .json(&json!({"model": "base", "prompt": big}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], 413, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-body-bytes"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_many_adapters_is_evicted_as_soon_as_it_ends() {
    let root = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..12).map(|i| format!("tenant-{i:02}")).collect();
    for id in &ids {
        let dir = root.path().join(id);
        std::fs::create_dir(&dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            let src = fixtures().join("adapters/llama-tied__lora-qv").join(f);
            std::fs::copy(src, dir.join(f)).unwrap();
        }
    }
    let mut opts = options(root.path());
    opts.max_loaded_adapters = 2;
    opts.max_batch = 12;
    let server = Arc::new(Server::start(opts).await);
    let mut tasks = Vec::new();
    for id in &ids {
        let (server, id) = (server.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            server
                .post("/v1/completions", completion(&id, "The quick cat", 8))
                .await
        }));
    }
    for task in tasks {
        let (s, b) = task.await.unwrap();
        assert_eq!(s, 200, "{b}");
    }
    let metrics = server.get("/metrics").await;
    assert_eq!(metric(&metrics, "lowrank_adapter_loads_total"), 12);
    assert!(
        metric(&metrics, "lowrank_adapters_loaded") <= 2,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "lowrank_adapter_evictions_total") >= 10,
        "{metrics}"
    );
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}

/// Log-softmax rows (f64) of the model's full forward over `ids`: row i is the distribution
/// of the token after position i. Independent of the server's engine and batching.
fn log_softmax_rows(adapter: Option<&str>, ids: &[u32]) -> Vec<Vec<f64>> {
    let dir = fixtures().join("models/llama-tied");
    let model = Llama::load(&dir, &Device::Cpu).unwrap();
    let adapter = adapter.map(|a| {
        model
            .load_adapter(&fixtures().join("adapters").join(a))
            .unwrap()
    });
    let active: Vec<ActiveAdapter> = adapter.iter().map(ActiveAdapter::new).collect();
    let input = candle_core::Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, None, &active).unwrap();
    let rows = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    rows.into_iter()
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let norm = max
                + row
                    .iter()
                    .map(|&l| (l as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row.iter().map(|&l| l as f64 - norm).collect()
        })
        .collect()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::load(&fixtures().join("models/llama-tied")).unwrap()
}

fn close(got: &Value, want: f64) -> bool {
    (got.as_f64().unwrap() - want).abs() < 1e-4
}

/// The k largest values of a row, largest first.
fn top_values(row: &[f64], k: usize) -> Vec<f64> {
    let mut sorted = row.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted.truncate(k);
    sorted
}

/// Greedy ids after `prompt` (as `lowrank generate` picks them), and the log-softmax rows of
/// prompt + answer.
fn greedy_ids_and_rows(
    adapter: Option<&str>,
    prompt: &[u32],
    max_tokens: usize,
) -> (Vec<u32>, Vec<Vec<f64>>) {
    let dir = fixtures().join("models/llama-tied");
    let model = Llama::load(&dir, &Device::Cpu).unwrap();
    let loaded = adapter.map(|a| {
        model
            .load_adapter(&fixtures().join("adapters").join(a))
            .unwrap()
    });
    let active: Vec<ActiveAdapter> = loaded.iter().map(ActiveAdapter::new).collect();
    let stops = lowrank_models::generate::stop_token_ids(&dir, &model, &tokenizer()).unwrap();
    let mut sampler = Sampler::new(SamplingParams::default());
    let ids = generate(
        &model,
        prompt,
        &active,
        &mut sampler,
        max_tokens,
        &stops,
        |_| Ok(()),
    )
    .unwrap();
    let all: Vec<u32> = prompt.iter().chain(&ids).copied().collect();
    (ids, log_softmax_rows(adapter, &all))
}

/// Checks a completion `logprobs` object: token i is `ids[i]`, with the log-probability
/// `rows[i][ids[i]]` and the `k` most likely tokens of `rows[i]` (no row: no logprob, as the
/// prompt's first token). Token texts join up to `text` and `text_offset` counts them.
fn assert_completion_logprobs(
    lp: &Value,
    text: &str,
    ids: &[u32],
    rows: &[Option<&Vec<f64>>],
    k: usize,
) {
    let keys: Vec<&str> = lp.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
    );
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), ids.len(), "{lp}");
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, text);
    let mut offset = 0;
    for (i, (&id, row)) in ids.iter().zip(rows).enumerate() {
        assert_eq!(lp["text_offset"][i], offset, "text_offset {i}: {lp}");
        let token = tokens[i].as_str().unwrap();
        offset += token.chars().count();
        let Some(row) = row else {
            assert!(lp["token_logprobs"][i].is_null(), "{lp}");
            assert!(lp["top_logprobs"][i].is_null(), "{lp}");
            continue;
        };
        assert!(
            close(&lp["token_logprobs"][i], row[id as usize]),
            "token {i}: {lp}"
        );
        // The k most likely and the token itself, keyed by text (tokens that read the same,
        // like partial characters, share one entry: the likelier one's).
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= k + 1, "{top:?}");
        let mut allowed = top_values(row, k);
        allowed.push(row[id as usize]);
        for value in top.values() {
            assert!(
                allowed.iter().any(|a| close(value, *a)),
                "top at {i}: {top:?} vs {allowed:?}"
            );
        }
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            (best - allowed[0].max(row[id as usize])).abs() < 1e-4,
            "{top:?}"
        );
    }
}

/// `got` equals `want` but for numbers, which may differ by 1e-4: the same request batched
/// differently sums in another order.
fn assert_json_close(got: &Value, want: &Value) {
    match (got, want) {
        (Value::Number(a), Value::Number(b)) => {
            assert!(
                (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4,
                "{a} vs {b}"
            )
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{got} vs {want}");
            a.iter().zip(b).for_each(|(x, y)| assert_json_close(x, y));
        }
        (Value::Object(a), Value::Object(b)) => {
            let keys = |o: &serde_json::Map<String, Value>| o.keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(a), keys(b));
            a.iter().for_each(|(k, x)| assert_json_close(x, &b[k]));
        }
        _ => assert_eq!(got, want),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_honour_n_logprobs_and_echo() {
    let root = adapter_root();
    let server = Server::start(options(root.path())).await;
    let tok = tokenizer();
    let prompt = "The quick cat";
    let prompt_ids = tok.encode(prompt, true).unwrap();
    let p = prompt_ids.len();
    let (answer_ids, rows) = greedy_ids_and_rows(Some("llama-tied__lora-qv"), &prompt_ids, 6);
    assert_eq!(answer_ids.len(), 6, "the fixture's answer stops early");
    let greedy = tok.decode(&answer_ids, true).unwrap();

    // n greedy choices: the same answer each, counted n times in usage.
    let mut body = completion("tenant-lora", prompt, 6);
    body["n"] = 3.into();
    body["logprobs"] = 2.into();
    let (s, b) = server.post("/v1/completions", body).await;
    assert_eq!(s, 200, "{b}");
    let choices = b["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["text"], greedy);
        assert_json_close(&c["logprobs"], &choices[0]["logprobs"]);
    }
    assert_eq!(b["usage"]["prompt_tokens"], p);
    assert_eq!(b["usage"]["completion_tokens"], 18);
    // Answer token j is predicted by row p - 1 + j of the model's own forward.
    let answer_rows: Vec<Option<&Vec<f64>>> = rows[p - 1..p + 5].iter().map(Some).collect();
    assert_completion_logprobs(
        &choices[0]["logprobs"],
        &greedy,
        &answer_ids,
        &answer_rows,
        2,
    );

    // echo + logprobs: the prompt's tokens first (the first without a logprob), then the answer.
    let mut body = completion("tenant-lora", prompt, 6);
    body["echo"] = true.into();
    body["logprobs"] = 3.into();
    let (s, b) = server.post("/v1/completions", body).await;
    assert_eq!(s, 200, "{b}");
    let c = &b["choices"][0];
    assert_eq!(c["text"], format!("{prompt}{greedy}"));
    let all: Vec<u32> = prompt_ids.iter().chain(&answer_ids).copied().collect();
    let all_rows: Vec<Option<&Vec<f64>>> = std::iter::once(None)
        .chain(rows[..all.len() - 1].iter().map(Some))
        .collect();
    assert_completion_logprobs(
        &c["logprobs"],
        &format!("{prompt}{greedy}"),
        &all,
        &all_rows,
        3,
    );

    // echo with max_tokens 0 scores the prompt only (over the base).
    let body =
        json!({"model": "base", "prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 1});
    let (s, b) = server.post("/v1/completions", body).await;
    assert_eq!(s, 200, "{b}");
    let c = &b["choices"][0];
    assert_eq!(c["text"], prompt);
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(b["usage"]["completion_tokens"], 0);
    let base_rows = log_softmax_rows(None, &prompt_ids);
    let prompt_rows: Vec<Option<&Vec<f64>>> = std::iter::once(None)
        .chain(base_rows[..p - 1].iter().map(Some))
        .collect();
    assert_completion_logprobs(&c["logprobs"], prompt, &prompt_ids, &prompt_rows, 1);

    // echo without logprobs: the text only. max_tokens 0 needs echo.
    let body =
        json!({"model": "base", "prompt": prompt, "max_tokens": 3, "echo": true, "temperature": 0});
    let (s, b) = server.post("/v1/completions", body).await;
    assert_eq!(s, 200, "{b}");
    let base_answer = expected_text(None, prompt, 3);
    assert_eq!(b["choices"][0]["text"], format!("{prompt}{base_answer}"));
    assert!(b["choices"][0]["logprobs"].is_null());
    let (s, b) = server
        .post(
            "/v1/completions",
            json!({"model": "base", "prompt": prompt, "max_tokens": 0}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs_have_openai_shapes() {
    let root = adapter_root();
    let server = Server::start(options(root.path())).await;
    let tok = tokenizer();
    let messages = vec![lowrank_models::Message {
        role: "user".into(),
        content: "hello".into(),
    }];
    let prompt_ids = tok.encode_chat(&messages, true).unwrap();
    let p = prompt_ids.len();
    let (answer_ids, rows) = greedy_ids_and_rows(Some("llama-tied__dora"), &prompt_ids, 5);
    let body = json!({"model": "tenant-dora", "messages": [{"role": "user", "content": "hello"}],
                      "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 2, "n": 2});
    let (s, b) = server.post("/v1/chat/completions", body).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["choices"].as_array().unwrap().len(), 2);
    let c = &b["choices"][0];
    let keys: Vec<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["index", "message", "logprobs", "finish_reason"]);
    assert_eq!(b["choices"][1]["message"], c["message"]);
    let content = c["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), answer_ids.len());
    let mut joined = String::new();
    for (j, entry) in content.iter().enumerate() {
        let keys: Vec<&str> = entry
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["token", "logprob", "bytes", "top_logprobs"]);
        let token = entry["token"].as_str().unwrap();
        joined.push_str(token);
        let bytes: Vec<u8> = entry["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, token.as_bytes());
        let row = &rows[p - 1 + j];
        assert!(
            close(&entry["logprob"], row[answer_ids[j] as usize]),
            "{entry}"
        );
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        for (t, want) in top.iter().zip(top_values(row, 2)) {
            let keys: Vec<&str> = t.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys, ["token", "logprob", "bytes"]);
            assert!(close(&t["logprob"], want), "{t}");
        }
    }
    assert_eq!(joined, c["message"]["content"].as_str().unwrap());
    // Without logprobs: null, as OpenAI answers.
    let body = json!({"model": "tenant-dora", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2});
    let (s, b) = server.post("/v1/chat/completions", body).await;
    assert_eq!(s, 200, "{b}");
    assert!(b["choices"][0]["logprobs"].is_null(), "{b}");
    let (s, b) = server
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("logprobs"));
    server.stop().await;
}

/// The `data:` payloads of an SSE answer, before `[DONE]` (which must end it).
async fn sse_chunks(server: &Server, path: &str, body: Value) -> Vec<Value> {
    let text = client()
        .post(format!("{}{path}", server.url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_every_choice_with_its_logprobs_and_echo() {
    let root = adapter_root();
    let server = Server::start(options(root.path())).await;
    let prompt = "A dog runs";
    let mut body = completion("tenant-lora", prompt, 12);
    body["n"] = 2.into();
    body["logprobs"] = 2.into();
    body["echo"] = true.into();
    let (s, whole) = server.post("/v1/completions", body.clone()).await;
    assert_eq!(s, 200, "{whole}");
    body["stream"] = true.into();
    body["stream_options"] = json!({"include_usage": true});
    let chunks = sse_chunks(&server, "/v1/completions", body).await;
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);
    for index in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .filter(|c| c["index"] == index)
            .collect();
        let text: String = mine.iter().map(|c| c["text"].as_str().unwrap()).collect();
        assert_eq!(text, whole["choices"][index]["text"]);
        let mut joined =
            json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
        for c in &mine {
            if c["logprobs"].is_null() {
                continue;
            }
            for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                let more = c["logprobs"][key].as_array().unwrap().clone();
                joined[key].as_array_mut().unwrap().extend(more);
            }
        }
        assert_json_close(&joined, &whole["choices"][index]["logprobs"]);
        assert_eq!(
            mine.last().unwrap()["finish_reason"],
            whole["choices"][index]["finish_reason"]
        );
    }
    // Chat: each choice starts with the assistant role; logprobs ride along.
    let mut chat = json!({"model": "tenant-dora", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 4, "temperature": 0, "n": 2, "logprobs": true});
    let (s, whole) = server.post("/v1/chat/completions", chat.clone()).await;
    assert_eq!(s, 200, "{whole}");
    chat["stream"] = true.into();
    let chunks = sse_chunks(&server, "/v1/chat/completions", chat).await;
    for index in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .filter(|c| c["index"] == index)
            .collect();
        assert_eq!(mine[0]["delta"]["role"], "assistant");
        let text: String = mine
            .iter()
            .filter_map(|c| c["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, whole["choices"][index]["message"]["content"]);
        let content: Vec<Value> = mine
            .iter()
            .filter_map(|c| c["logprobs"]["content"].as_array())
            .flatten()
            .cloned()
            .collect();
        assert_json_close(
            &Value::from(content),
            &whole["choices"][index]["logprobs"]["content"],
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_fields_are_refused_by_name() {
    let root = adapter_root();
    let server = Server::start(options(root.path())).await;
    for (field, value) in [
        ("best_of", json!(2)),
        ("suffix", json!("end")),
        ("logit_bias", json!({"5": 10})),
        ("presence_penalty", json!(0.5)),
        ("frequency_penalty", json!(1)),
        ("response_format", json!({"type": "json_object"})),
    ] {
        let mut body = completion("base", "x", 2);
        body[field] = value;
        let (s, b) = server.post("/v1/completions", body).await;
        assert_eq!(s, 400, "{field}: {b}");
        assert_eq!(
            b["error"]["message"],
            format!("`{field}` is not supported by this server")
        );
    }
    for (field, value) in [
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("tool_choice", json!("auto")),
        ("functions", json!([{"name": "f"}])),
        ("response_format", json!({"type": "json_schema"})),
        ("best_of", json!(3)),
    ] {
        let mut body = json!({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2});
        body[field] = value;
        let (s, b) = server.post("/v1/chat/completions", body).await;
        assert_eq!(s, 400, "{field}: {b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains(field),
            "{b}"
        );
    }
    // Values that ask for nothing, and fields that change nothing, pass.
    let mut body = completion("base", "x", 2);
    for (field, value) in [
        ("best_of", json!(1)),
        ("suffix", json!(null)),
        ("presence_penalty", json!(0)),
        ("logit_bias", json!({})),
        ("user", json!("someone")),
    ] {
        body[field] = value;
    }
    let (s, b) = server.post("/v1/completions", body).await;
    assert_eq!(s, 200, "{b}");
    let body = json!({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                      "tools": [], "tool_choice": "none", "response_format": {"type": "text"}});
    let (s, b) = server.post("/v1/chat/completions", body).await;
    assert_eq!(s, 200, "{b}");
    for (body, needle) in [
        (json!({"model": "base", "prompt": "x", "n": 0}), "n must be"),
        (json!({"model": "base", "prompt": "x", "n": 9}), "n must be"),
        (
            json!({"model": "base", "prompt": "x", "logprobs": 21}),
            "logprobs must be",
        ),
    ] {
        let (s, b) = server.post("/v1/completions", body).await;
        assert_eq!(s, 400, "{b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains(needle),
            "{b}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_model_is_served_by_the_base() {
    let root = adapter_root();
    let server = Server::start(options(root.path())).await;
    let (s, b) = server
        .post(
            "/v1/completions",
            json!({"prompt": "The quick cat", "max_tokens": 5, "temperature": 0}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["model"], "base");
    assert_eq!(
        b["choices"][0]["text"],
        expected_text(None, "The quick cat", 5)
    );
    let (s, b) = server
        .post(
            "/v1/completions",
            json!({"prompt": "The quick cat", "adapter": "tenant-lora", "max_tokens": 5, "temperature": 0}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["choices"][0]["text"],
        expected_text(Some("llama-tied__lora-qv"), "The quick cat", 5)
    );
    let (s, b) = server
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    server.stop().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_ids_and_folders_follow_one_rule() {
    let root = adapter_root();
    let outside = tempfile::tempdir().unwrap();
    let elsewhere = outside.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let src = fixtures().join("adapters/llama-tied__lora-qv").join(f);
        std::fs::copy(&src, elsewhere.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(&elsewhere, root.path().join("escape")).unwrap();
    // A folder under the base's id would be unreachable, and listed twice.
    std::fs::create_dir(root.path().join("base")).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let src = fixtures().join("adapters/llama-tied__lora-qv").join(f);
        std::fs::copy(&src, root.path().join("base").join(f)).unwrap();
    }
    let server = Server::start(options(root.path())).await;
    let models: Value = serde_json::from_str(&server.get("/v1/models").await).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "tenant-dora", "tenant-lora", "wrong-base"]);
    let (s, b) = server
        .post("/v1/completions", completion("escape", "x", 2))
        .await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = server
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "base", "lora_path": "tenant-lora"}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("base model's id"),
        "{b}"
    );
    let (s, b) = server
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "escape", "lora_path": "escape"}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside the adapter root"),
        "{b}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_during_prefill_is_cancelled_before_its_prompt_is_fed() {
    let root = adapter_root();
    let mut opts = options(root.path());
    // One running sequence; the next waits in the queue.
    opts.max_batch = 1;
    let server = Arc::new(Server::start(opts).await);
    let running = server
        .start_running(completion("base", "A dog runs", 240))
        .await;
    // A long prompt, streamed: no event reaches its client before its first token.
    let mut body = completion("base", &"the cat sat on a mat ".repeat(20), 8);
    body["stream"] = true.into();
    let resp = client()
        .post(format!("{}/v1/completions", server.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !server
        .get("/metrics")
        .await
        .contains(r#"lowrank_requests_total{status="cancelled"} 1"#)
    {
        assert!(tokio::time::Instant::now() < deadline, "never cancelled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (s, b) = running.await.unwrap();
    assert_eq!(s, 200, "{b}");
    // Only the running request's prompt was ever fed.
    let metrics = server.get("/metrics").await;
    assert_eq!(
        metric(&metrics, "lowrank_prompt_tokens_total"),
        b["usage"]["prompt_tokens"].as_u64().unwrap(),
        "{metrics}"
    );
    Arc::try_unwrap(server).ok().unwrap().stop().await;
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
        // Every linear of the model's layers.
        lowrank_core::targets::ModuleSelector::Names(
            lowrank_core::lora::ALL_LINEAR
                .iter()
                .map(|s| s.to_string())
                .collect(),
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
        expected_stacked(&stack, "The quick cat", 16, Weights::F32),
        expected_text(Some("llama-tied__lora-qv"), "The quick cat", 16),
        expected_text(Some("llama-tied__dora"), "A dog runs", 16),
        expected_stacked(&stack, "Birds sing in the morning", 16, Weights::F32),
        expected_text(None, "The quick cat", 16),
    ];
    for (i, (task, want)) in tasks.into_iter().zip(want).enumerate() {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(body["choices"][0]["text"], want, "request {i}");
    }
    assert_ne!(
        expected_stacked(&stack, "The quick cat", 16, Weights::F32),
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

/// An adapter root holding copies of one LoRA fixture (whose greedy answer to "A dog runs" runs
/// the full 240 tokens) under each of `names`.
fn lora_copies(names: &[&str]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for name in names {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            let src = fixtures().join("adapters/llama-tied__lora-qv").join(f);
            std::fs::copy(src, dir.join(f)).unwrap();
        }
    }
    root
}

/// The metric families of a /metrics answer, read by a Prometheus text-format parser.
fn scrape(text: &str) -> Vec<prom_text_format_parser::Metric> {
    prom_text_format_parser::Scrape::parse(text)
        .unwrap_or_else(|e| panic!("not Prometheus' text format: {e:?}\n{text}"))
        .metrics
}

fn family<'a>(
    families: &'a [prom_text_format_parser::Metric],
    name: &str,
) -> &'a prom_text_format_parser::Metric {
    families
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no {name} family"))
}

fn label<'a>(sample: &'a prom_text_format_parser::Sample, key: &str) -> &'a str {
    sample
        .labels
        .iter()
        .find(|l| l.key == key)
        .map(|l| l.value.as_str())
        .unwrap_or_else(|| panic!("no label {key}"))
}

/// The single sample of an unlabelled (or constant-labelled) family.
fn value(families: &[prom_text_format_parser::Metric], name: &str) -> f64 {
    let f = family(families, name);
    assert_eq!(f.samples.len(), 1, "{name}");
    f.samples[0].value.value.as_f64()
}

/// What the Inference Extension's endpoint picker reads from one pod's /metrics, replaying its
/// core metrics extractor for the `vllm` engine type (llm-d router,
/// pkg/epp/framework/plugins/datalayer/extractor/metrics: extractor.go, spec.go, loraspec.go).
#[derive(Debug, Default, PartialEq)]
struct PickerView {
    waiting_queue_size: i64,
    running_requests_size: i64,
    kv_cache_usage_percent: f64,
    active_models: std::collections::BTreeSet<String>,
    waiting_models: std::collections::BTreeSet<String>,
    max_active_models: i64,
    cache_block_size: i64,
    cache_num_blocks: i64,
}

fn picker_view(families: &[prom_text_format_parser::Metric]) -> PickerView {
    // Spec.getLatestMetric: of the family's series, the first with the largest timestamp (0
    // when absent); a missing family is an extraction error.
    let latest = |name: &str| {
        let f = family(families, name);
        let mut best: Option<&prom_text_format_parser::Sample> = None;
        for s in &f.samples {
            let ts = s.value.timestamp.unwrap_or(0);
            if best.is_none_or(|b| ts > b.value.timestamp.unwrap_or(0)) {
                best = Some(s);
            }
        }
        best.unwrap_or_else(|| panic!("no series in {name}"))
    };
    let mut view = PickerView {
        waiting_queue_size: latest("vllm:num_requests_waiting").value.value.as_f64() as i64,
        running_requests_size: latest("vllm:num_requests_running").value.value.as_f64() as i64,
        kv_cache_usage_percent: latest("vllm:kv_cache_usage_perc").value.value.as_f64(),
        ..PickerView::default()
    };
    // LoRASpec.getLatestMetric: the series with the largest value (its update time).
    let lora = family(families, "vllm:lora_requests_info")
        .samples
        .iter()
        .fold(
            None::<&prom_text_format_parser::Sample>,
            |best, s| match best {
                Some(b) if b.value.value.as_f64() >= s.value.value.as_f64() => Some(b),
                _ => Some(s),
            },
        )
        .expect("a vllm:lora_requests_info series");
    let names = |csv: &str| {
        csv.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect()
    };
    view.active_models = names(label(lora, "running_lora_adapters"));
    view.waiting_models = names(label(lora, "waiting_lora_adapters"));
    view.max_active_models = label(lora, "max_lora")
        .parse()
        .expect("max_lora is an integer");
    let cache = latest("vllm:cache_config_info");
    view.cache_block_size = label(cache, "block_size").parse().unwrap();
    view.cache_num_blocks = label(cache, "num_gpu_blocks").parse().unwrap();
    view
}

/// The picker's LoRA-affinity scorer (scheduling/scorer/loraaffinity) for one pod.
fn lora_affinity(view: &PickerView, target: &str) -> f64 {
    let room = (view.active_models.len() + view.waiting_models.len()) as i64;
    if view.active_models.contains(target) {
        1.0
    } else if room < view.max_active_models {
        0.8
    } else if view.waiting_models.contains(target) {
        0.6
    } else {
        0.0
    }
}

const PROTOCOL_ADAPTERS: [&str; 4] = ["a1", "a2", "a3", "a4"];
const PROTOCOL_PROMPT: &str = "A dog runs";
const PROTOCOL_MAX_TOKENS: usize = 240;

/// A /metrics answer taken while two requests run and two wait (batch of 2), each for its own
/// adapter; and one taken once they are all done. On this tiny model a batch can finish
/// between two scrapes, so a round that never shows that state is tried again.
async fn busy_and_idle_scrapes() -> (String, String) {
    let root = lora_copies(&PROTOCOL_ADAPTERS);
    let mut opts = options(root.path());
    opts.max_batch = 2;
    let server = Server::start(opts).await;
    let mut busy = None;
    for _round in 0..20 {
        let tasks: Vec<_> = PROTOCOL_ADAPTERS
            .iter()
            .map(|a| {
                let url = format!("{}/v1/completions", server.url);
                let body = completion(a, PROTOCOL_PROMPT, PROTOCOL_MAX_TOKENS);
                tokio::spawn(async move {
                    let r = client().post(url).json(&body).send().await;
                    r.unwrap().status().as_u16()
                })
            })
            .collect();
        while busy.is_none() && !tasks.iter().all(|t| t.is_finished()) {
            let text = server.get("/metrics").await;
            let families = scrape(&text);
            if value(&families, "vllm:num_requests_running") == 2.0
                && value(&families, "vllm:num_requests_waiting") == 2.0
            {
                busy = Some(text);
            }
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
        if busy.is_some() {
            break;
        }
    }
    let idle = server.get("/metrics").await;
    server.stop().await;
    (
        busy.expect("never saw 2 running and 2 waiting requests"),
        idle,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_metrics_follow_the_engine_state() {
    let (busy, idle) = busy_and_idle_scrapes().await;
    let families = scrape(&busy);
    // vLLM's series agree with lowrank's own and carry the model's name.
    assert_eq!(value(&families, "lowrank_running_requests"), 2.0);
    assert_eq!(value(&families, "lowrank_queue_length"), 2.0);
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ] {
        let f = family(&families, name);
        assert_eq!(f.kind, prom_text_format_parser::Type::Gauge, "{name}");
        assert_eq!(label(&f.samples[0], "model_name"), "base");
    }
    // Each running sequence reserved prompt + max_tokens tokens of the 64 MiB budget; a token
    // takes 2 layers × (key + value) × 2 KV heads × 8 dims × 4 bytes.
    let prompt = tokenizer().encode(PROTOCOL_PROMPT, true).unwrap().len();
    let reserved = 2 * (prompt + PROTOCOL_MAX_TOKENS) * 2 * 2 * 2 * 8 * 4;
    let usage = value(&families, "vllm:kv_cache_usage_perc");
    assert!(
        (usage - reserved as f64 / (64.0 * 1024.0 * 1024.0)).abs() < 1e-12,
        "{usage}"
    );
    // One series naming the two running and the two waiting adapters, stamped with the time.
    let lora = family(&families, "vllm:lora_requests_info");
    assert_eq!(lora.kind, prom_text_format_parser::Type::Gauge);
    assert_eq!(lora.samples.len(), 1);
    let sample = &lora.samples[0];
    assert_eq!(label(sample, "max_lora"), "2");
    let running: Vec<&str> = label(sample, "running_lora_adapters").split(',').collect();
    let waiting: Vec<&str> = label(sample, "waiting_lora_adapters").split(',').collect();
    assert_eq!(running.len(), 2, "{running:?}");
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    let mut all: Vec<&str> = running.iter().chain(&waiting).copied().collect();
    all.sort_unstable();
    assert_eq!(all, PROTOCOL_ADAPTERS);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let stamp = sample.value.value.as_f64();
    assert!(stamp > now - 600.0 && stamp <= now, "{stamp} vs {now}");
    // The KV cache is reserved by the token: blocks of one token, as many as the budget holds.
    let cache = &family(&families, "vllm:cache_config_info").samples[0];
    assert_eq!(label(cache, "block_size"), "1");
    assert_eq!(
        label(cache, "num_gpu_blocks"),
        (64 * 1024 * 1024 / 256).to_string()
    );
    assert_eq!(cache.value.value.as_f64(), 1.0);
    // Once done, nothing runs or waits and no adapter is named.
    let families = scrape(&idle);
    assert_eq!(value(&families, "vllm:num_requests_running"), 0.0);
    assert_eq!(value(&families, "vllm:num_requests_waiting"), 0.0);
    assert_eq!(value(&families, "vllm:kv_cache_usage_perc"), 0.0);
    let sample = &family(&families, "vllm:lora_requests_info").samples[0];
    assert_eq!(label(sample, "running_lora_adapters"), "");
    assert_eq!(label(sample, "waiting_lora_adapters"), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_picker_reads_adapter_affinity_from_metrics() {
    let (busy, idle) = busy_and_idle_scrapes().await;
    let view = picker_view(&scrape(&busy));
    assert_eq!(view.running_requests_size, 2);
    assert_eq!(view.waiting_queue_size, 2);
    assert!(view.kv_cache_usage_percent > 0.0 && view.kv_cache_usage_percent < 1.0);
    assert_eq!(view.max_active_models, 2);
    assert_eq!(view.cache_block_size, 1);
    assert_eq!(view.cache_num_blocks, 64 * 1024 * 1024 / 256);
    assert_eq!(view.active_models.len() + view.waiting_models.len(), 4);
    // A request for a running adapter goes here first; one for a waiting adapter is a fair
    // choice; with both batch slots taken by adapters, an adapter not here is a poor one.
    for a in &view.active_models {
        assert_eq!(lora_affinity(&view, a), 1.0);
    }
    for a in &view.waiting_models {
        assert_eq!(lora_affinity(&view, a), 0.6);
    }
    assert_eq!(lora_affinity(&view, "another"), 0.0);
    // Idle, every adapter has room.
    let view = picker_view(&scrape(&idle));
    assert!(view.active_models.is_empty() && view.waiting_models.is_empty());
    assert_eq!(view.running_requests_size + view.waiting_queue_size, 0);
    assert_eq!(lora_affinity(&view, "a1"), 0.8);
}

/// A server that cannot start says why by kind: a flag, the model, or the adapters.
#[test]
fn start_errors_are_typed_and_name_the_flag_or_file() {
    use lowrank_serve::server::StartError;
    let root = adapter_root();
    let mut zero = options(root.path());
    zero.max_batch = 0;
    match lowrank_serve::build_state(&zero) {
        Err(StartError::Options(m)) => assert!(m.contains("--max-batch"), "{m}"),
        other => panic!("--max-batch 0: {:?}", other.err()),
    }
    let mut missing = options(root.path());
    missing.model = root.path().join("no-model").to_string_lossy().into_owned();
    match lowrank_serve::build_state(&missing) {
        Err(StartError::Model(m)) => assert!(m.contains("no-model"), "{m}"),
        other => panic!("a missing model: {:?}", other.err()),
    }
    let mut keys = options(root.path());
    keys.api_keys = Some(root.path().join("no-keys.txt"));
    match lowrank_serve::build_state(&keys) {
        Err(StartError::Open(m)) => assert!(m.contains("no-keys.txt"), "{m}"),
        other => panic!("a missing keys file: {:?}", other.err()),
    }
}

/// A GGUF base serves what its HF original does: the base and a PEFT adapter of the HF model,
/// greedy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_base_serves_the_hf_models_tokens() {
    let root = adapter_root();
    let mut opts = options(root.path());
    opts.model = fixtures()
        .join("gguf/llama-tied-f32.gguf")
        .to_string_lossy()
        .into_owned();
    let server = Server::start(opts).await;
    for (model, adapter) in [("base", None), ("tenant-lora", Some("llama-tied__lora-qv"))] {
        let (s, b) = server
            .post(
                "/v1/completions",
                json!({"model": model, "prompt": "The quick cat", "max_tokens": 6, "temperature": 0}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(
            b["choices"][0]["text"],
            expected_text(adapter, "The quick cat", 6),
            "{model}"
        );
    }
}
