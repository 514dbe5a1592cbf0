//! `--model org/name` and `--adapter org/name` through the real Hub client against a stand-in
//! Hub on 127.0.0.1 (tests/common/fake_hub.rs) serving the fixture model and adapters: the
//! download into the HF cache layout, then offline use, no request once cached, a cut transfer
//! resumed, a sharded model's exact shards, and the errors a user can act on. Nothing reaches
//! outside the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::*;

#[path = "common/fake_hub.rs"]
mod fake_hub;
use fake_hub::{blob_name, FakeHub, FakeRepo, TOKEN};

const MODEL: &str = "org/tiny";
const ADAPTER: &str = "org/tiny-lora";
const SHARDED: &str = "org/sharded";

/// The Hub's repos: the fixture model and adapter (each with files lowrank must not fetch),
/// a sharded model with a stray safetensors file beside its shards, a gated copy of the model,
/// and a repo with pickled weights only.
fn fixture_repos() -> Vec<(String, FakeRepo)> {
    let models = fixtures().join("models");
    let readme: (&str, &[u8]) = ("README.md", b"# a model card\n");
    let (gated_name, mut gated) = FakeRepo::from_dir("org/gated", &models.join("llama-tied"), &[]);
    gated.gated = true;
    let (bin_name, mut bin_only) =
        FakeRepo::from_dir("org/bin-only", &models.join("llama-tied"), &[]);
    bin_only.files.retain(|f, _| !f.ends_with(".safetensors"));
    bin_only
        .files
        .insert("pytorch_model.bin".into(), b"pickle".to_vec());
    bin_only.files.insert("model.gguf".into(), b"GGUF".to_vec());
    vec![
        FakeRepo::from_dir(
            MODEL,
            &models.join("llama-tied"),
            &[readme, ("pytorch_model.bin", b"not wanted")],
        ),
        FakeRepo::from_dir(
            ADAPTER,
            &fixtures().join("adapters/llama-tied__lora-qv"),
            &[readme, ("adapter_model.bin", b"not wanted")],
        ),
        FakeRepo::from_dir(
            SHARDED,
            &models.join("llama-untied"),
            &[readme, ("consolidated.safetensors", b"not wanted")],
        ),
        (gated_name, gated),
        (bin_name, bin_only),
    ]
}

/// An empty HF_HOME and the endpoint every run of this test uses.
struct Env {
    home: tempfile::TempDir,
    endpoint: String,
}

impl Env {
    fn new(hub: &FakeHub) -> Env {
        Env {
            home: tempfile::tempdir().unwrap(),
            endpoint: hub.url.clone(),
        }
    }

    fn cache(&self) -> PathBuf {
        self.home.path().join("hub")
    }

    /// `lowrank args` with this HF_HOME and endpoint plus `vars`, and nothing else of the
    /// caller's Hub settings or proxies.
    fn run(&self, vars: &[(&str, &str)], args: &[&str]) -> Output {
        self.command(vars, args).output().expect("run lowrank")
    }

    fn command(&self, vars: &[(&str, &str)], args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lowrank"));
        for var in [
            "HF_TOKEN",
            "HF_TOKEN_PATH",
            "HF_HUB_CACHE",
            "HF_HUB_OFFLINE",
            "XDG_CACHE_HOME",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("HF_HOME", self.home.path())
            .env("HF_ENDPOINT", &self.endpoint)
            .envs(vars.iter().copied())
            .args(args);
        cmd
    }
}

fn eval_args<'a>(model: &'a str, adapter: Option<&'a str>, data: &'a str) -> Vec<&'a str> {
    let mut args = vec!["eval", "--model", model, "--data", data];
    if let Some(adapter) = adapter {
        args.extend(["--adapter", adapter]);
    }
    args
}

fn reference_loss(name: &str) -> f64 {
    let text = std::fs::read_to_string(fixtures().join(format!("reference/{name}.json"))).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["loss"]
        .as_f64()
        .unwrap()
}

fn assert_loss(out: &Output, reference: &str) {
    let got = json_out(out)["loss"].as_f64().unwrap();
    let want = reference_loss(reference);
    assert!((got - want).abs() < 1e-4, "loss {got}, transformers {want}");
}

/// Every file of `repo`'s snapshot links to a blob named by its hash, holding the repo's bytes.
fn assert_cached(env: &Env, repo: &str, files: &[&str]) {
    let repo_dir = env
        .cache()
        .join(format!("models--{}", repo.replace('/', "--")));
    let commit = std::fs::read_to_string(repo_dir.join("refs/main")).unwrap();
    let snapshot = repo_dir.join("snapshots").join(commit.trim());
    let (_, fixture) = fixture_repos()
        .into_iter()
        .find(|(n, _)| n == repo)
        .unwrap();
    assert_eq!(commit.trim(), fixture.commit);
    let mut listed: Vec<String> = std::fs::read_dir(&snapshot)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    let mut want: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    want.sort();
    assert_eq!(listed, want, "{}", snapshot.display());
    for file in files {
        let bytes = &fixture.files[*file];
        let link = std::fs::read_link(snapshot.join(file)).unwrap();
        assert_eq!(
            link,
            Path::new("../../blobs").join(blob_name(file, bytes)),
            "{file}"
        );
        assert_eq!(
            &std::fs::read(snapshot.join(file)).unwrap(),
            bytes,
            "{file}"
        );
    }
    let partial: Vec<_> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(partial.is_empty(), "{partial:?}");
}

const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
];
const ADAPTER_FILES: &[&str] = &["adapter_config.json", "adapter_model.safetensors"];

#[test]
fn a_model_and_an_adapter_download_into_the_hf_cache_then_work_offline() {
    let hub = FakeHub::start(fixture_repos());
    let env = Env::new(&hub);
    let data = fx("data/eval.jsonl");
    let first = env.run(&[], &eval_args(MODEL, Some(ADAPTER), &data));
    assert_loss(&first, "llama-tied__lora-qv");
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        stderr.contains("downloading org/tiny") && stderr.contains("downloading org/tiny-lora"),
        "{stderr}"
    );
    // Only the files lowrank reads: no model card, no pickles.
    let mut fetched = hub.resolved_files();
    fetched.sort();
    let mut want: Vec<String> = MODEL_FILES
        .iter()
        .map(|f| format!("{MODEL}/{f}"))
        .chain(ADAPTER_FILES.iter().map(|f| format!("{ADAPTER}/{f}")))
        .collect();
    want.sort();
    assert_eq!(fetched, want);
    assert_cached(&env, MODEL, MODEL_FILES);
    assert_cached(&env, ADAPTER, ADAPTER_FILES);

    // Cached: no request at all, online or offline, for eval and generate alike.
    let requests = hub.log().len();
    let again = env.run(&[], &eval_args(MODEL, Some(ADAPTER), &data));
    assert_loss(&again, "llama-tied__lora-qv");
    assert!(!String::from_utf8_lossy(&again.stderr).contains("downloading"));
    let offline = [("HF_HUB_OFFLINE", "1")];
    assert_loss(
        &env.run(&offline, &eval_args(MODEL, Some(ADAPTER), &data)),
        "llama-tied__lora-qv",
    );
    let generate = |model: &str, adapter: &str, vars: &[(&str, &str)]| {
        ok(&env.run(
            vars,
            &[
                "generate",
                "--model",
                model,
                "--adapter",
                adapter,
                "--prompt",
                "The cat",
                "--max-tokens",
                "6",
                "--ignore-eos",
            ],
        ))
    };
    let from_folders = generate(
        &fx("models/llama-tied"),
        &fx("adapters/llama-tied__lora-qv"),
        &offline,
    );
    assert_eq!(generate(MODEL, ADAPTER, &offline), from_folders);
    // The revision pinned by commit resolves from the cache too.
    let (_, fixture) = fixture_repos()
        .into_iter()
        .find(|(n, _)| n == MODEL)
        .unwrap();
    let pinned = format!("{MODEL}@{}", fixture.commit);
    assert_eq!(generate(&pinned, ADAPTER, &offline), from_folders);
    assert_eq!(hub.log().len(), requests, "a cached model made requests");
    // The adapter commands take Hub ids too.
    let inspect = env.run(&offline, &["inspect", ADAPTER, "--json"]);
    let report: Value = serde_json::from_str(&ok(&inspect)).unwrap();
    assert_eq!(report["method"], "LoRA");
}

#[test]
fn a_cut_transfer_resumes_where_it_stopped() {
    let hub = FakeHub::start(fixture_repos());
    let env = Env::new(&hub);
    let data = fx("data/eval.jsonl");
    hub.cut_next_transfer(MODEL, "model.safetensors");
    assert_loss(&env.run(&[], &eval_args(MODEL, None, &data)), "llama-tied");
    let (_, fixture) = fixture_repos()
        .into_iter()
        .find(|(n, _)| n == MODEL)
        .unwrap();
    let size = fixture.files["model.safetensors"].len();
    let cdn: Vec<Option<String>> = hub
        .log()
        .into_iter()
        .filter(|l| l.path.starts_with("cdn/") && l.range.as_deref() != Some("bytes=0-0"))
        .map(|l| l.range)
        .collect();
    // The whole file, cut at half; then only the rest.
    assert_eq!(
        cdn,
        [
            Some("bytes=0-".to_string()),
            Some(format!("bytes={}-", size / 2))
        ]
    );
    assert_cached(&env, MODEL, MODEL_FILES);
}

#[test]
fn a_killed_download_is_never_used_and_continues_on_the_next_run() {
    let hub = FakeHub::start(fixture_repos());
    let env = Env::new(&hub);
    let data = fx("data/eval.jsonl");
    // What a run killed mid-transfer leaves: the first part of the weights, not under its name.
    let (_, fixture) = fixture_repos()
        .into_iter()
        .find(|(n, _)| n == MODEL)
        .unwrap();
    let weights = &fixture.files["model.safetensors"];
    let blobs = env.cache().join("models--org--tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let part = blobs.join(format!("{}.part", blob_name("model.safetensors", weights)));
    std::fs::write(&part, &weights[..1000]).unwrap();
    let offline = env.run(&[("HF_HUB_OFFLINE", "1")], &eval_args(MODEL, None, &data));
    assert_fails_with(&offline, &["HF_HUB_OFFLINE", "not in the HF cache"]);
    assert_loss(&env.run(&[], &eval_args(MODEL, None, &data)), "llama-tied");
    let ranges: Vec<Option<String>> = hub
        .log()
        .into_iter()
        .filter(|l| l.path.starts_with("cdn/") && l.range.as_deref() != Some("bytes=0-0"))
        .map(|l| l.range)
        .collect();
    assert_eq!(ranges, [Some("bytes=1000-".to_string())]);
    assert_cached(&env, MODEL, MODEL_FILES);
}

#[test]
fn a_sharded_model_fetches_its_index_and_exactly_its_shards() {
    let hub = FakeHub::start(fixture_repos());
    let env = Env::new(&hub);
    // Describing an adapter against a base reads only the base's config.json.
    let inspect = env.run(&[], &["inspect", ADAPTER, "--model", SHARDED, "--json"]);
    let report: Value = serde_json::from_str(&ok(&inspect)).unwrap();
    assert!(report["base_parameters"].as_u64().unwrap() > 0);
    assert_eq!(
        hub.resolved_files()
            .iter()
            .filter(|f| f.starts_with(SHARDED))
            .collect::<Vec<_>>(),
        [&format!("{SHARDED}/config.json")]
    );
    // The model then completes that snapshot, without fetching config.json again.
    let config_requests = || {
        hub.log()
            .iter()
            .filter(|l| l.path == format!("{SHARDED}/resolve/main/config.json"))
            .count()
    };
    let before = config_requests();
    let out = env.run(&[], &eval_args(SHARDED, None, &fx("data/eval.jsonl")));
    assert_loss(&out, "llama-untied");
    assert_eq!(config_requests(), before);
    let files = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
    ];
    let mut fetched = hub.resolved_files();
    fetched.retain(|f| f.starts_with(SHARDED));
    fetched.sort();
    let mut want: Vec<String> = files.iter().map(|f| format!("{SHARDED}/{f}")).collect();
    want.sort();
    assert_eq!(fetched, want);
    assert_cached(&env, SHARDED, &files);
}

#[test]
fn hub_errors_say_what_to_do() {
    let hub = FakeHub::start(fixture_repos());
    let env = Env::new(&hub);
    let data = fx("data/eval.jsonl");
    let eval = |vars: &[(&str, &str)], model: &str| env.run(vars, &eval_args(model, None, &data));

    assert_fails_with(
        &eval(&[], "org/nope"),
        &[
            "org/nope",
            "no repo org/nope on",
            "check the name",
            "HF_TOKEN",
        ],
    );
    assert_fails_with(&eval(&[], "org/tiny@v9"), &["no revision \"v9\""]);
    let gated = eval(&[], "org/gated");
    assert_fails_with(
        &gated,
        &["org/gated is gated or private (HTTP 401)", "set HF_TOKEN"],
    );
    assert_fails_with(
        &eval(&[("HF_TOKEN", "hf_wrong")], "org/gated"),
        &["the token given has no access"],
    );
    assert_loss(&eval(&[("HF_TOKEN", TOKEN)], "org/gated"), "llama-tied");
    assert!(hub
        .log()
        .iter()
        .any(|l| l.authorization.as_deref() == Some(&format!("Bearer {TOKEN}"))));
    assert_fails_with(
        &eval(&[], "org/bin-only"),
        &[
            "no model.safetensors or model.safetensors.index.json",
            "model.gguf, pytorch_model.bin",
        ],
    );
    // A model given as an adapter, and an adapter as a model.
    assert_fails_with(
        &env.run(&[], &["inspect", MODEL]),
        &["no adapter_config.json", "pass it with --model"],
    );
    assert_fails_with(
        &eval(&[], ADAPTER),
        &["no config.json", "pass it with --adapter"],
    );

    // Offline with nothing cached: no request.
    let requests = hub.log().len();
    assert_fails_with(
        &eval(&[("HF_HUB_OFFLINE", "1")], MODEL),
        &["HF_HUB_OFFLINE is set", "models--org--tiny"],
    );
    assert_eq!(hub.log().len(), requests);
    // No Hub at the endpoint.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    assert_fails_with(
        &eval(&[("HF_ENDPOINT", &closed)], MODEL),
        &["cannot reach", "HF_HUB_OFFLINE=1"],
    );
}

#[test]
fn the_token_file_is_read() {
    let hub = FakeHub::start(fixture_repos());
    let env = Env::new(&hub);
    std::fs::write(env.home.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let out = env.run(&[], &eval_args("org/gated", None, &fx("data/eval.jsonl")));
    assert_loss(&out, "llama-tied");
}

#[test]
#[cfg(target_os = "linux")]
fn a_full_disk_is_named() {
    let hub = FakeHub::start(fixture_repos());
    let env = Env::new(&hub);
    let data = fx("data/eval.jsonl");
    // Writing the weights' partial file hits a full disk (/dev/full answers ENOSPC).
    let (_, fixture) = fixture_repos()
        .into_iter()
        .find(|(n, _)| n == MODEL)
        .unwrap();
    let blobs = env.cache().join("models--org--tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let weights = blob_name("model.safetensors", &fixture.files["model.safetensors"]);
    std::os::unix::fs::symlink("/dev/full", blobs.join(format!("{weights}.part"))).unwrap();
    let out = env.run(&[], &eval_args(MODEL, None, &data));
    assert_fails_with(&out, &["disk full", "HF_HUB_CACHE"]);
    assert!(!blobs.join(&weights).exists());
}

#[test]
fn the_server_loads_hub_adapters_only_when_allowed() {
    let hub = FakeHub::start(fixture_repos());
    let env = Env::new(&hub);
    let adapters = tempfile::tempdir().unwrap();
    let load = |allow: bool| -> (u16, String, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let port_arg = port.to_string();
        let mut args = vec![
            "serve",
            "--model",
            MODEL,
            "--adapters",
            adapters.path().to_str().unwrap(),
            "--port",
            &port_arg,
        ];
        if allow {
            args.push("--allow-hub-adapters");
        }
        let mut server = env
            .command(&[], &args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let agent = ureq::agent();
        let mut ready = false;
        for _ in 0..600 {
            if agent.get(&format!("{base}/v1/models")).call().is_ok() {
                ready = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let answer = |r: Result<ureq::Response, ureq::Error>| match r {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
            Err(e) => (0, e.to_string()),
        };
        let (status, body) = answer(
            agent
                .post(&format!("{base}/v1/load_lora_adapter"))
                .set("content-type", "application/json")
                .send_string(&format!(
                    r#"{{"lora_name": "tiny-lora", "lora_path": "{ADAPTER}"}}"#
                )),
        );
        let (_, models) = answer(agent.get(&format!("{base}/v1/models")).call());
        server.kill().unwrap();
        server.wait().unwrap();
        assert!(ready, "the server did not start");
        (status, body, models)
    };
    let (status, body, _) = load(false);
    assert_eq!(status, 400, "{body}");
    assert!(!hub.resolved_files().iter().any(|f| f.starts_with(ADAPTER)));
    let (status, body, models) = load(true);
    assert_eq!(status, 200, "{body}");
    assert!(
        models.contains("\"tiny-lora\"") && models.contains("\"org/tiny\""),
        "{models}"
    );
    assert_cached(&env, ADAPTER, ADAPTER_FILES);
}
