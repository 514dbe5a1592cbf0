//! A stand-in for the Hugging Face Hub on 127.0.0.1, for the real client to talk to: the file
//! route `/{org}/{name}/resolve/{revision}/{file}` with the headers hf-hub and huggingface_hub
//! read (`ETag`, `X-Linked-Etag`, `X-Linked-Size`, `X-Repo-Commit`, `X-Error-Code`), a 302 for
//! LFS files to a storage route on another port (as the Hub redirects to its storage host; the
//! file's metadata is on the redirect), `Range` requests with `Content-Range`, and the repo
//! listing `/api/models/{org}/{name}/revision/{revision}`.
//! Every request is logged; one transfer can be cut midway.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha1::Digest as _;

/// The token a gated repo accepts.
pub const TOKEN: &str = "hf_test_token";

/// A repo: its files at one commit.
pub struct FakeRepo {
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
    /// Files are served only with `Authorization: Bearer TOKEN`.
    pub gated: bool,
}

impl FakeRepo {
    /// The files of a fixture folder plus `extra` ones, at a commit derived from `name`.
    pub fn from_dir(name: &str, dir: &Path, extra: &[(&str, &[u8])]) -> (String, FakeRepo) {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_str().unwrap().to_string();
            files.insert(file, std::fs::read(&path).unwrap());
        }
        for (file, bytes) in extra {
            files.insert(file.to_string(), bytes.to_vec());
        }
        let commit = hex(&sha1::Sha1::digest(format!("commit of {name}")));
        (
            name.to_string(),
            FakeRepo {
                commit,
                files,
                gated: false,
            },
        )
    }
}

/// Large files live in LFS on the Hub: their ETag is their sha256 and they are redirected.
pub fn is_lfs(file: &str) -> bool {
    [".safetensors", ".bin", ".gguf"]
        .iter()
        .any(|e| file.ends_with(e))
}

pub fn sha256(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

/// Git's id of a file (what the Hub sends as the ETag of a non-LFS file).
pub fn git_sha1(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()));
    h.update(bytes);
    hex(&h.finalize())
}

/// The name of a file's blob in the HF cache.
pub fn blob_name(file: &str, bytes: &[u8]) -> String {
    if is_lfs(file) {
        sha256(bytes)
    } else {
        git_sha1(bytes)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

struct Shared {
    /// The storage host LFS files are redirected to.
    storage: String,
    repos: BTreeMap<String, FakeRepo>,
    log: Mutex<Vec<Logged>>,
    /// The sha256 of a blob whose next transfer stops halfway.
    cut_next: Mutex<Option<String>>,
}

pub struct FakeHub {
    pub url: String,
    shared: Arc<Shared>,
    // Dropping the runtime stops the server.
    _runtime: tokio::runtime::Runtime,
}

impl FakeHub {
    pub fn start(repos: Vec<(String, FakeRepo)>) -> FakeHub {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let bind = || {
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            (listener, url)
        };
        let (listener, url) = bind();
        let (storage_listener, storage) = bind();
        let shared = Arc::new(Shared {
            storage,
            repos: repos.into_iter().collect(),
            log: Mutex::new(Vec::new()),
            cut_next: Mutex::new(None),
        });
        let app = Router::new()
            .route(
                "/api/models/{org}/{name}/revision/{*revision}",
                get(listing),
            )
            .route("/{org}/{name}/resolve/{revision}/{*file}", get(resolve))
            .with_state(shared.clone());
        let storage_app = Router::new()
            .route("/cdn/{sha}", get(cdn))
            .with_state(shared.clone());
        runtime.spawn(async move { axum::serve(listener, app).await });
        runtime.spawn(async move { axum::serve(storage_listener, storage_app).await });
        FakeHub {
            url,
            shared,
            _runtime: runtime,
        }
    }

    pub fn log(&self) -> Vec<Logged> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The files requested through the resolve route (`org/name/file`), in order, once each.
    pub fn resolved_files(&self) -> Vec<String> {
        let mut files: Vec<String> = Vec::new();
        for l in self.log() {
            let parts: Vec<&str> = l.path.splitn(5, '/').collect();
            if let [org, name, "resolve", _revision, file] = parts[..] {
                let f = format!("{org}/{name}/{file}");
                if !files.contains(&f) {
                    files.push(f);
                }
            }
        }
        files
    }

    /// The next transfer of this file's blob sends half of it, then drops the connection.
    pub fn cut_next_transfer(&self, repo: &str, file: &str) {
        let bytes = &self.shared.repos[repo].files[file];
        *self.shared.cut_next.lock().unwrap() = Some(sha256(bytes));
    }
}

impl Shared {
    fn record(&self, uri: &Uri, headers: &HeaderMap) {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        self.log.lock().unwrap().push(Logged {
            path: uri.path().trim_start_matches('/').to_string(),
            range: header("range"),
            authorization: header("authorization"),
        });
    }

    /// The repo, or the Hub's 404 for a missing repo or revision: its error code and the
    /// commit to name.
    fn repo(
        &self,
        org: &str,
        name: &str,
        revision: &str,
    ) -> Result<&FakeRepo, (&'static str, Option<&str>)> {
        let Some(repo) = self.repos.get(&format!("{org}/{name}")) else {
            return Err(("RepoNotFound", None));
        };
        if revision != "main" && revision != repo.commit {
            return Err(("RevisionNotFound", Some(&repo.commit)));
        }
        Ok(repo)
    }
}

fn hub_error(status: StatusCode, code: &'static str, commit: Option<&str>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("x-error-code", HeaderValue::from_static(code));
    if let Some(commit) = commit {
        headers.insert("x-repo-commit", commit.parse().unwrap());
    }
    (status, headers, format!("{{\"error\": \"{code}\"}}")).into_response()
}

async fn listing(
    State(hub): State<Arc<Shared>>,
    UrlPath((org, name, revision)): UrlPath<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    hub.record(&uri, &headers);
    let repo = match hub.repo(&org, &name, &revision) {
        Ok(repo) => repo,
        Err((code, commit)) => return hub_error(StatusCode::NOT_FOUND, code, commit),
    };
    let siblings: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|(f, bytes)| serde_json::json!({"rfilename": f, "size": bytes.len()}))
        .collect();
    axum::Json(serde_json::json!({
        "id": format!("{org}/{name}"),
        "sha": repo.commit,
        "gated": if repo.gated { serde_json::json!("auto") } else { serde_json::json!(false) },
        "siblings": siblings,
    }))
    .into_response()
}

async fn resolve(
    State(hub): State<Arc<Shared>>,
    UrlPath((org, name, revision, file)): UrlPath<(String, String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    hub.record(&uri, &headers);
    let repo = match hub.repo(&org, &name, &revision) {
        Ok(repo) => repo,
        Err((code, commit)) => return hub_error(StatusCode::NOT_FOUND, code, commit),
    };
    let authorized = headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if repo.gated && !authorized {
        return hub_error(StatusCode::UNAUTHORIZED, "GatedRepo", None);
    }
    let Some(bytes) = repo.files.get(&file) else {
        return hub_error(StatusCode::NOT_FOUND, "EntryNotFound", Some(&repo.commit));
    };
    let mut out = HeaderMap::new();
    out.insert("x-repo-commit", repo.commit.parse().unwrap());
    out.insert("etag", format!("\"{}\"", git_sha1(bytes)).parse().unwrap());
    if is_lfs(&file) {
        let sha = sha256(bytes);
        out.insert("x-linked-etag", format!("\"{sha}\"").parse().unwrap());
        out.insert("x-linked-size", bytes.len().into());
        out.insert(
            "location",
            format!("{}/cdn/{sha}", hub.storage).parse().unwrap(),
        );
        return (StatusCode::FOUND, out).into_response();
    }
    ranged(bytes.clone(), &headers, out, false)
}

async fn cdn(
    State(hub): State<Arc<Shared>>,
    UrlPath(sha): UrlPath<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    hub.record(&uri, &headers);
    let Some(bytes) = hub
        .repos
        .values()
        .flat_map(|r| r.files.values())
        .find(|b| sha256(b) == sha)
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // Not the one-byte probe hf-hub sends for the size.
    let transfer = headers.get("range").and_then(|v| v.to_str().ok()) != Some("bytes=0-0");
    let cut = transfer && {
        let mut next = hub.cut_next.lock().unwrap();
        let hit = next.as_deref() == Some(sha.as_str());
        if hit {
            *next = None;
        }
        hit
    };
    let mut out = HeaderMap::new();
    out.insert("etag", format!("\"{sha}\"").parse().unwrap());
    ranged(bytes.clone(), &headers, out, cut)
}

/// The file, or the part a `Range: bytes=a-[b]` asks for (206), with its length; `cut` sends
/// half of it and then drops the connection.
fn ranged(bytes: Vec<u8>, request: &HeaderMap, mut out: HeaderMap, cut: bool) -> Response {
    let total = bytes.len();
    out.insert("accept-ranges", HeaderValue::from_static("bytes"));
    let range = request
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| {
            let start: usize = a.parse().unwrap();
            let end: usize = if b.is_empty() {
                total.saturating_sub(1)
            } else {
                b.parse::<usize>().unwrap().min(total.saturating_sub(1))
            };
            (start, end)
        });
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, total),
        Some((start, _)) if start >= total => {
            out.insert("content-range", format!("bytes */{total}").parse().unwrap());
            return (StatusCode::RANGE_NOT_SATISFIABLE, out).into_response();
        }
        Some((start, end)) => {
            out.insert(
                "content-range",
                format!("bytes {start}-{end}/{total}").parse().unwrap(),
            );
            (StatusCode::PARTIAL_CONTENT, start, end + 1)
        }
    };
    out.insert("content-length", (end - start).into());
    let body = Bytes::from(bytes).slice(start..end);
    if !cut {
        return (status, out, body).into_response();
    }
    let half = body.slice(..body.len() / 2);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::spawn(async move {
        let _ = tx.send(Ok(half)).await;
        // Let the first half reach the client before the connection drops.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let _ = tx
            .send(Err(std::io::Error::other("connection cut by the test")))
            .await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    (status, out, Body::from_stream(stream)).into_response()
}
