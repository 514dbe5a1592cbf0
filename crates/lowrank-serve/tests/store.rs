//! Adapters from object storage against real servers on 127.0.0.1: a static HTTP file server
//! started here, and (when `LOWRANK_S3S_FS` names the `s3s-fs` binary, as `.ci/run` does) an
//! S3-compatible server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::get;
use lowrank_serve::store::{RemoteAdapters, StoreError};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

const FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

fn fixture_file(file: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("adapters/llama-tied__lora-qv").join(file)).unwrap()
}

/// A static file server: GET `/{path}` answers the file's bytes (with their length), or 404.
struct StaticFiles {
    url: String,
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    /// The paths asked for, in order.
    hits: Arc<Mutex<Vec<String>>>,
    _runtime: tokio::runtime::Runtime,
}

type Shared = (
    Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    Arc<Mutex<Vec<String>>>,
);

async fn serve_file(
    State((files, hits)): State<Shared>,
    UrlPath(path): UrlPath<String>,
) -> Result<Vec<u8>, StatusCode> {
    hits.lock().unwrap().push(path.clone());
    files
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .ok_or(StatusCode::NOT_FOUND)
}

impl StaticFiles {
    fn start() -> StaticFiles {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let files = Arc::new(Mutex::new(BTreeMap::new()));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/{*path}", get(serve_file))
            .with_state((files.clone(), hits.clone()));
        runtime.spawn(async move { axum::serve(listener, app).await });
        StaticFiles {
            url,
            files,
            hits,
            _runtime: runtime,
        }
    }

    fn put(&self, path: &str, bytes: Vec<u8>) {
        self.files.lock().unwrap().insert(path.into(), bytes);
    }

    /// An adapter folder `adapters/{name}` holding the LoRA fixture.
    fn put_adapter(&self, name: &str) {
        for f in FILES {
            self.put(&format!("adapters/{name}/{f}"), fixture_file(f));
        }
    }

    fn hits(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
}

fn remote(allowed: &[&str], cache: &Path, max_bytes: u64) -> RemoteAdapters {
    RemoteAdapters::new(
        allowed.iter().map(|s| s.to_string()).collect(),
        cache,
        max_bytes,
    )
    .unwrap()
}

#[test]
fn http_adapters_are_fetched_once_checked_and_cached() {
    let server = StaticFiles::start();
    server.put_adapter("a1");
    let cache = tempfile::tempdir().unwrap();
    let root = format!("{}/adapters", server.url);
    let store = remote(&[&root], cache.path(), 1 << 20);
    let folder = store.fetch(&format!("{root}/a1")).unwrap();
    for f in FILES {
        assert_eq!(
            std::fs::read(folder.join(f)).unwrap(),
            fixture_file(f),
            "{f}"
        );
    }
    assert_eq!(server.hits(), 2);
    // Cached: the store is not asked again, by this process or another using the folder.
    assert_eq!(store.fetch(&format!("{root}/a1/")).unwrap(), folder);
    let again = remote(&[&root], cache.path(), 1 << 20);
    assert_eq!(again.fetch(&format!("{root}/a1")).unwrap(), folder);
    assert_eq!(server.hits(), 2);
    // No staging folder is left behind.
    let entries = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(entries, 1);
    // A missing adapter, and one missing its weights, leave nothing in the cache.
    let missing = store.fetch(&format!("{root}/nope")).unwrap_err();
    assert!(matches!(missing, StoreError::NotFound { .. }), "{missing}");
    server.put(
        "adapters/half/adapter_config.json",
        fixture_file("adapter_config.json"),
    );
    let half = store.fetch(&format!("{root}/half")).unwrap_err();
    assert!(
        half.to_string().contains("half/adapter_model.safetensors"),
        "{half}"
    );
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);
}

#[test]
fn sources_outside_the_allowed_prefixes_are_refused_before_any_request() {
    let server = StaticFiles::start();
    server.put_adapter("a1");
    let cache = tempfile::tempdir().unwrap();
    let store = remote(
        &[&format!("{}/adapters/a", server.url)],
        cache.path(),
        1 << 20,
    );
    // `adapters/a` allows `adapters/a/…`, not `adapters/a1`.
    let refused = store
        .fetch(&format!("{}/adapters/a1", server.url))
        .unwrap_err();
    assert!(
        matches!(refused, StoreError::NotAllowed { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("--allow-adapter-source"));
    assert_eq!(server.hits(), 0);
}

#[test]
fn the_least_recently_used_adapters_leave_a_full_cache() {
    let server = StaticFiles::start();
    for name in ["a1", "a2", "a3"] {
        server.put_adapter(name);
    }
    let one: u64 = FILES.iter().map(|f| fixture_file(f).len() as u64).sum();
    let cache = tempfile::tempdir().unwrap();
    let root = format!("{}/adapters", server.url);
    // Room for two adapters (and their completion markers), not three.
    let store = remote(&[&root], cache.path(), 2 * one + 1024);
    let a1 = store.fetch(&format!("{root}/a1")).unwrap();
    let a2 = store.fetch(&format!("{root}/a2")).unwrap();
    // a1 is used again (from the cache), so a2 is the least recently used when a3 comes.
    std::thread::sleep(std::time::Duration::from_millis(20));
    store.fetch(&format!("{root}/a1")).unwrap();
    let a3 = store.fetch(&format!("{root}/a3")).unwrap();
    assert!(a1.is_dir() && a3.is_dir());
    assert!(!a2.exists());
    // A file larger than the whole cache is refused.
    let small_cache = tempfile::tempdir().unwrap();
    let small = remote(&[&root], small_cache.path(), 100);
    let big = small.fetch(&format!("{root}/a1")).unwrap_err();
    assert!(big.to_string().contains("--adapter-cache-mb"), "{big}");
}

/// An `s3s-fs` server on a free loopback port over a fresh folder, killed when dropped.
struct S3Server {
    child: std::process::Child,
    endpoint: String,
    _root: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const S3_KEY: &str = "lowrank-test";
const S3_SECRET: &str = "lowrank-test-secret";

impl S3Server {
    fn start(binary: &str) -> S3Server {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("bucket")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_KEY, "--secret-key", S3_SECRET])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run s3s-fs");
        let addr = format!("127.0.0.1:{port}");
        // Killed when dropped, the panic below included.
        let server = S3Server {
            child,
            endpoint: format!("http://{addr}"),
            _root: root,
        };
        for _ in 0..600 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("s3s-fs did not listen on {addr}");
    }

    fn options(&self) -> [(&str, &str); 5] {
        [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_access_key_id", S3_KEY),
            ("aws_secret_access_key", S3_SECRET),
            ("aws_region", "us-east-1"),
        ]
    }

    /// Uploads `bytes` to `s3://bucket/{key}` with `sha256` user metadata when given.
    fn put(&self, key: &str, bytes: Vec<u8>, sha256: Option<String>) {
        use object_store::{Attribute, Attributes, ObjectStore, PutOptions};
        let mut builder = object_store::aws::AmazonS3Builder::new().with_bucket_name("bucket");
        for (k, v) in self.options() {
            builder = builder.with_config(k.parse().unwrap(), v);
        }
        let store = builder.build().unwrap();
        let mut attributes = Attributes::new();
        if let Some(sha) = sha256 {
            attributes.insert(Attribute::Metadata("sha256".into()), sha.into());
        }
        let options = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime
            .block_on(store.put_opts(&key.into(), bytes.into(), options))
            .unwrap();
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn s3_adapters_are_listed_fetched_and_checked_against_their_sha256() {
    let Ok(binary) = std::env::var("LOWRANK_S3S_FS") else {
        eprintln!("LOWRANK_S3S_FS is not set (the s3s-fs binary): S3 test skipped");
        return;
    };
    lowrank_serve::install_tls_provider();
    let s3 = S3Server::start(&binary);
    for name in ["good", "corrupt"] {
        for f in FILES {
            let bytes = fixture_file(f);
            let sha = sha256_hex(&bytes);
            let mut stored = bytes;
            if name == "corrupt" && f == "adapter_model.safetensors" {
                // Same size, one byte changed after the uploader recorded its sha256.
                stored[100] ^= 1;
            }
            s3.put(&format!("adapters/{name}/{f}"), stored, Some(sha));
        }
    }
    let cache = tempfile::tempdir().unwrap();
    let store =
        remote(&["s3://bucket/adapters"], cache.path(), 1 << 20).with_store_options(&s3.options());
    let mut ids = store.list("s3://bucket/adapters").unwrap();
    ids.sort();
    assert_eq!(ids, ["corrupt", "good"]);
    let folder = store.fetch("s3://bucket/adapters/good").unwrap();
    for f in FILES {
        assert_eq!(std::fs::read(folder.join(f)).unwrap(), fixture_file(f));
    }
    let corrupt = store.fetch("s3://bucket/adapters/corrupt").unwrap_err();
    assert!(matches!(corrupt, StoreError::Check { .. }), "{corrupt}");
    assert!(corrupt.to_string().contains("sha256"), "{corrupt}");
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);
    let other = store.fetch("s3://other-bucket/adapters/good").unwrap_err();
    assert!(matches!(other, StoreError::NotAllowed { .. }), "{other}");
}
