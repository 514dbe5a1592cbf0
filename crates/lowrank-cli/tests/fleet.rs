//! lowrank servers as a fleet behind the Gateway API Inference Extension: the deployment files
//! agree with the binary, and several `lowrank serve` processes over one adapter store each
//! export the model-server protocol's metrics. Servers listen on 127.0.0.1 only and are killed
//! at the end of each test.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

mod common;
use common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every YAML document of a file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_norway::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(v).unwrap()
        })
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// The value following `flag` in an argument list.
fn flag_value<'a>(args: &'a [Value], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[at + 1].as_str().unwrap()
}

/// `selector` ⊆ `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// A `lowrank serve` process that has printed its "serving … on http://ADDR" line.
struct Served {
    child: Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .arg("serve")
        .args(["--model", &fx("models/llama-tied")])
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run lowrank serve");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if let Some(at) = line.find("on http://") {
                let addr = line[at + 3..].split_whitespace().next().unwrap_or("");
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("lowrank serve did not start");
    Served { child, url }
}

fn get(url: &str) -> (u16, String) {
    match ureq::get(url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let answer = ureq::post(url)
        .set("content-type", "application/json")
        .send_string(&body.to_string());
    let (status, r) = match answer {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("POST {url}: {e}"),
    };
    (
        status,
        serde_json::from_str(&r.into_string().unwrap()).unwrap(),
    )
}

/// The `vllm:lora_requests_info` labels and the protocol gauges of a /metrics answer, read
/// with a Prometheus text-format parser.
fn protocol(metrics: &str) -> BTreeMap<String, String> {
    let scrape = prom_text_format_parser::Scrape::parse(metrics)
        .unwrap_or_else(|e| panic!("{e:?}\n{metrics}"));
    let mut seen = BTreeMap::new();
    for f in &scrape.metrics {
        if !f.name.starts_with("vllm:") {
            continue;
        }
        let s = &f.samples[0];
        seen.insert(f.name.clone(), s.value.value.as_f64().to_string());
        if f.name == "vllm:lora_requests_info" {
            for l in s.labels.iter() {
                seen.insert(l.key.clone(), l.value.clone());
            }
        }
    }
    seen
}

#[test]
fn deploy_files_agree_with_the_binary() {
    let docs = yaml_documents(&repo().join("deploy/k8s/lowrank.yaml"));
    let deployment = kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        labels
    ));
    // The endpoint picker reads vLLM's metric names from pods of this engine type.
    assert_eq!(labels["llm-d.ai/engine-type"], "vllm");
    let container = &pod["spec"]["containers"][0];
    let args = container["args"].as_array().unwrap();
    assert_eq!(args[0], "serve");
    // Every flag is one `lowrank serve` takes.
    let help = ok(&lowrank(&["serve", "--help"]));
    for flag in args
        .iter()
        .filter_map(|a| a.as_str())
        .filter(|a| a.starts_with("--"))
    {
        assert!(
            help.contains(&format!("{flag} ")),
            "`lowrank serve` has no {flag}"
        );
    }
    let port: u64 = flag_value(args, "--port").parse().unwrap();
    let http = &container["ports"][0];
    assert_eq!(http["containerPort"], port);
    let port_name = http["name"].as_str().unwrap();
    // Probes: /health on the served port.
    let mut probe_paths = Vec::new();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["port"], port_name, "{probe}");
        probe_paths.push(get["path"].as_str().unwrap().to_string());
    }
    // SIGTERM's drain (running requests finish, or time out) fits in the grace period.
    let timeout: u64 = flag_value(args, "--request-timeout-s").parse().unwrap();
    let pause: u64 = container["lifecycle"]["preStop"]["exec"]["command"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(grace > timeout + pause, "{grace} <= {timeout} + {pause}");
    assert_ne!(pod["spec"]["securityContext"]["runAsUser"], 0);
    let service = kind(&docs, "Service");
    assert!(selects(&service["spec"]["selector"], labels));
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port_name);

    let docs = yaml_documents(&repo().join("deploy/k8s/inferencepool.yaml"));
    let pool = kind(&docs, "InferencePool");
    assert_eq!(pool["apiVersion"], "inference.networking.k8s.io/v1");
    assert!(selects(&pool["spec"]["selector"]["matchLabels"], labels));
    assert_eq!(pool["spec"]["targetPorts"][0]["number"], port);
    let config_map = kind(&docs, "ConfigMap");
    let (_, config) = config_map["data"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    let config: serde_norway::Value = serde_norway::from_str(config.as_str().unwrap()).unwrap();
    let config = serde_json::to_value(config).unwrap();
    assert_eq!(config["kind"], "EndpointPickerConfig");
    assert_eq!(config["apiVersion"], "llm-d.ai/v1alpha1");
    let plugins = config["plugins"].as_array().unwrap();
    let source = plugins
        .iter()
        .find(|p| p["type"] == "metrics-data-source")
        .unwrap();
    let metrics_path = source["parameters"]["path"].as_str().unwrap();
    let scorers: Vec<&Value> = config["schedulingProfiles"][0]["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["pluginRef"])
        .collect();
    assert!(scorers.iter().any(|p| *p == "lora-affinity-scorer"));
    for scorer in scorers {
        assert!(plugins
            .iter()
            .any(|p| &p["type"] == scorer || &p["name"] == scorer));
    }

    // The container image listens where the manifests look, as a non-root user.
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains(&format!("EXPOSE {port}\n")));
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );

    // The paths the probes and the picker use answer on a real server.
    let adapters = tempfile::tempdir().unwrap();
    let server = serve(&["--adapters", adapters.path().to_str().unwrap()]);
    for path in &probe_paths {
        assert_eq!(get(&format!("{}{path}", server.url)).0, 200, "{path}");
    }
    let (status, metrics) = get(&format!("{}{metrics_path}", server.url));
    assert_eq!(status, 200);
    let seen = protocol(&metrics);
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
    ] {
        assert!(seen.contains_key(name), "no {name} in {metrics}");
    }
}

/// An adapter folder under `root` copied from the fixtures.
fn copy_adapter(root: &Path, name: &str) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let from = fixtures().join("adapters/llama-tied__lora-qv").join(f);
        std::fs::copy(from, dir.join(f)).unwrap();
    }
}

/// A static file server over a folder (the fleet's adapter store, as `http://…`): GET
/// `/{path}` answers the file's bytes, or 404. Stops when dropped.
struct FolderServer {
    url: String,
    _runtime: tokio::runtime::Runtime,
}

impl FolderServer {
    fn start(root: &Path) -> FolderServer {
        use axum::extract::{Path as UrlPath, State};
        use axum::http::StatusCode;
        async fn file(
            State(root): State<PathBuf>,
            UrlPath(path): UrlPath<String>,
        ) -> Result<Vec<u8>, StatusCode> {
            if path.split('/').any(|part| part == "..") {
                return Err(StatusCode::BAD_REQUEST);
            }
            std::fs::read(root.join(path)).map_err(|_| StatusCode::NOT_FOUND)
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::get(file))
            .with_state(root.to_path_buf());
        runtime.spawn(async move { axum::serve(listener, app).await });
        FolderServer {
            url,
            _runtime: runtime,
        }
    }
}

#[test]
fn three_servers_over_one_adapter_store_report_their_running_adapters() {
    let store = tempfile::tempdir().unwrap();
    copy_adapter(&store.path().join("adapters"), "shared");
    let files = FolderServer::start(store.path());
    let root = format!("{}/adapters", files.url);
    let caches: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers: Vec<Served> = caches
        .iter()
        .map(|cache| {
            serve(&[
                "--adapters",
                &root,
                "--adapter-cache-dir",
                cache.path().to_str().unwrap(),
                "--max-batch",
                "4",
            ])
        })
        .collect();
    // Added to the store after the servers started: found on first use.
    copy_adapter(&store.path().join("adapters"), "late");
    for (i, server) in servers.iter().enumerate() {
        let seen = protocol(&get(&format!("{}/metrics", server.url)).1);
        assert_eq!(seen["max_lora"], "4");
        assert_eq!(seen["running_lora_adapters"], "");
        let adapter = if i == 2 { "late" } else { "shared" };
        // A prompt whose greedy answer runs the full 240 tokens, in a thread; meanwhile the
        // server reports its adapter as running (polled, bounded: a round that finishes before
        // a scrape sees it is tried again).
        let mut saw_running = false;
        for _round in 0..20 {
            let url = format!("{}/v1/completions", server.url);
            let body = json!({"model": adapter, "prompt": "A dog runs", "max_tokens": 240, "temperature": 0});
            let request = std::thread::spawn(move || post(&url, &body));
            while !request.is_finished() && !saw_running {
                let seen = protocol(&get(&format!("{}/metrics", server.url)).1);
                saw_running = seen["running_lora_adapters"] == adapter
                    && seen["vllm:num_requests_running"] == "1";
            }
            let (status, answer) = request.join().unwrap();
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["model"], adapter);
            if saw_running {
                break;
            }
        }
        assert!(saw_running, "server {i} never reported {adapter} running");
        let metrics = get(&format!("{}/metrics", server.url)).1;
        let seen = protocol(&metrics);
        assert_eq!(seen["running_lora_adapters"], "");
        assert_eq!(seen["vllm:num_requests_running"], "0");
        // Loaded once, on its first request, however many rounds it took.
        assert!(
            metrics.contains("\nlowrank_adapter_loads_total 1\n"),
            "{metrics}"
        );
        let (_, models) = get(&format!("{}/v1/models", server.url));
        let models: Value = serde_json::from_str(&models).unwrap();
        let card = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == adapter)
            .unwrap_or_else(|| panic!("{adapter} not listed: {models}"));
        assert_eq!(card["root"], format!("{root}/{adapter}"));
        assert_eq!(card["parent"], "llama-tied");
    }
    // Each server cached the adapter it served, in its own cache folder.
    for cache in &caches {
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);
    }
    // An adapter outside the store and the allowed sources is refused, naming the flag.
    let (status, answer) = post(
        &format!("{}/v1/load_lora_adapter", servers[0].url),
        &json!({"lora_name": "elsewhere", "lora_path": format!("{}/elsewhere/a", files.url)}),
    );
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("--allow-adapter-source"), "{message}");
    // An unknown adapter is a 404, as for a local folder.
    let (status, _) = post(
        &format!("{}/v1/completions", servers[1].url),
        &json!({"model": "missing", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(status, 404);
}
