//! Adapters in object storage: `s3://bucket/prefix`, `gs://…`, `az://…` and `http(s)://…`
//! folders holding a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`), read
//! with the `object_store` crate and its credentials from the environment (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`, as the crate's builders read them).
//!
//! An adapter is fetched on first use into a local cache folder of bounded size: each file is
//! checked against the size the store reports, and against a `sha256` user metadata entry when
//! the object has one (`x-amz-meta-sha256`, `x-goog-meta-sha256`, `x-ms-meta-sha256`: hex);
//! the files are staged in a temporary folder that is renamed into place once complete, so a
//! cache entry is whole or absent, even when several servers share the cache folder. Entries
//! least recently used are removed when the cache holds more than its budget.
//!
//! Remote paths are refused unless they start with an allowed prefix (the `--adapters` root,
//! and each `--allow-adapter-source`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use futures_util::StreamExt;
use lowrank_core::lora::{CONFIG_FILE, WEIGHTS_FILE};
use object_store::{Attribute, ObjectStore};
use sha2::{Digest, Sha256};

/// The schemes read from object storage.
const REMOTE_SCHEMES: &[&str] = &["s3://", "gs://", "az://", "http://", "https://"];

/// The user metadata entry holding a file's sha256 (hex), when the uploader set one.
const SHA256_METADATA: &str = "sha256";

/// Written last into a cache entry; its modification time is the entry's last use.
const COMPLETE_MARKER: &str = ".complete";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StoreError {
    #[error("{url}: remote adapter sources must start with an allowed prefix ({allowed}); add one with --allow-adapter-source")]
    NotAllowed { url: String, allowed: String },
    #[error("{url}: not found")]
    NotFound { url: String },
    #[error("{url}: {message}")]
    Fetch { url: String, message: String },
    #[error("{url}: {message}")]
    Check { url: String, message: String },
    #[error("adapter cache {dir}: {message}")]
    Cache { dir: String, message: String },
}

/// Whether `source` names an object store rather than a local folder.
pub fn is_remote(source: &str) -> bool {
    REMOTE_SCHEMES.iter().any(|s| source.starts_with(s))
}

/// The local cache of remote adapters and the prefixes they may come from.
pub struct RemoteAdapters {
    allowed: Vec<String>,
    dir: PathBuf,
    max_bytes: u64,
    runtime: tokio::runtime::Runtime,
    /// The stores' configuration (credentials, endpoints): the `AWS_*`, `GOOGLE_*` and
    /// `AZURE_*` environment variables, as the crate's builders read them.
    options: Vec<(String, String)>,
    /// Serializes fetches within this process, so two requests for one adapter fetch it once.
    fetching: Mutex<()>,
}

/// `url` with exactly one trailing slash: a folder.
fn folder(url: &str) -> String {
    format!("{}/", url.trim_end_matches('/'))
}

impl RemoteAdapters {
    /// A cache in `dir` (created if needed) holding at most `max_bytes` of adapter files, of
    /// adapters under the `allowed` prefixes.
    pub fn new(allowed: Vec<String>, dir: &Path, max_bytes: u64) -> Result<Self, StoreError> {
        let cache_err = |message: String| StoreError::Cache {
            dir: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| cache_err(e.to_string()))?;
        let dir = dir.canonicalize().map_err(|e| cache_err(e.to_string()))?;
        crate::install_tls_provider();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| cache_err(e.to_string()))?;
        Ok(RemoteAdapters {
            allowed: allowed
                .iter()
                .map(|p| p.trim_end_matches('/').into())
                .collect(),
            dir,
            max_bytes,
            runtime,
            options: std::env::vars()
                .filter(|(k, _)| {
                    ["AWS_", "GOOGLE_", "AZURE_"]
                        .iter()
                        .any(|p| k.starts_with(p))
                })
                .collect(),
            fetching: Mutex::new(()),
        })
    }

    /// Adds store configuration (e.g. `aws_endpoint`), after the environment's.
    pub fn with_store_options(mut self, options: &[(&str, &str)]) -> Self {
        self.options
            .extend(options.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// The cache folder.
    pub fn cache_dir(&self) -> &Path {
        &self.dir
    }

    /// Refuses `url` unless it lies under an allowed prefix (at a `/` boundary).
    pub fn check_allowed(&self, url: &str) -> Result<(), StoreError> {
        let under = |prefix: &String| {
            url == prefix
                || url.starts_with(&format!("{prefix}/"))
                || (prefix.ends_with(':') && url.starts_with(&format!("{prefix}//")))
        };
        if self.allowed.iter().any(under) {
            return Ok(());
        }
        Err(StoreError::NotAllowed {
            url: url.to_string(),
            allowed: if self.allowed.is_empty() {
                "none allowed".into()
            } else {
                self.allowed.join(", ")
            },
        })
    }

    /// The ids of the adapter folders directly under `root`, where the store can list (an
    /// HTTP server cannot: then none, and adapters are found on first use).
    pub fn list(&self, root: &str) -> Result<Vec<String>, StoreError> {
        self.check_allowed(root)?;
        let (store, prefix) = self.open(root)?;
        let listing = self
            .runtime
            .block_on(store.list_with_delimiter(Some(&prefix)))
            .map_err(|e| fetch_error(root, e))?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(String::from))
            .collect())
    }

    /// The local folder holding the adapter at `url`, fetched into the cache unless there.
    pub fn fetch(&self, url: &str) -> Result<PathBuf, StoreError> {
        self.check_allowed(url)?;
        let url = folder(url);
        let entry = self.dir.join(cache_key(&url));
        let _one_at_a_time = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        if entry.join(COMPLETE_MARKER).is_file() {
            touch(&entry.join(COMPLETE_MARKER));
            return Ok(entry);
        }
        let (store, prefix) = self.open(&url)?;
        let cache_err = |message: String| StoreError::Cache {
            dir: self.dir.display().to_string(),
            message,
        };
        let staged = lowrank_core::files::staging_dir(&self.dir, ".fetch-")
            .map_err(|e| cache_err(e.to_string()))?;
        for file in [CONFIG_FILE, WEIGHTS_FILE] {
            let file_url = format!("{url}{file}");
            let path = prefix.clone().join(file);
            self.runtime.block_on(download(
                store.as_ref(),
                &path,
                &file_url,
                &staged.path().join(file),
                self.max_bytes,
            ))?;
        }
        std::fs::write(staged.path().join(COMPLETE_MARKER), url.as_bytes())
            .map_err(|e| cache_err(e.to_string()))?;
        let staged = staged.keep();
        match std::fs::rename(&staged, &entry) {
            Ok(()) => {}
            // Another server sharing the cache put the same entry in place first.
            Err(_) if entry.join(COMPLETE_MARKER).is_file() => {
                let _ = std::fs::remove_dir_all(&staged);
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staged);
                return Err(cache_err(format!("{}: {e}", entry.display())));
            }
        }
        self.evict(&entry);
        Ok(entry)
    }

    /// Removes the least recently used entries (other than `keep`) while the cache holds more
    /// than its budget.
    fn evict(&self, keep: &Path) {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = read
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let used = std::fs::metadata(p.join(COMPLETE_MARKER))
                    .and_then(|m| m.modified())
                    .ok()?;
                Some((used, folder_bytes(&p), p))
            })
            .collect();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort();
        for (_, bytes, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            if std::fs::remove_dir_all(&path).is_ok() {
                tracing::info!(entry = %path.display(), "adapter cache entry evicted");
                total -= bytes;
            }
        }
    }
}

impl RemoteAdapters {
    /// The store holding `url` and the path of `url` in it.
    fn open(
        &self,
        url: &str,
    ) -> Result<(Box<dyn ObjectStore>, object_store::path::Path), StoreError> {
        let parsed = url::Url::parse(url).map_err(|e| StoreError::Fetch {
            url: url.to_string(),
            message: format!("not a URL: {e}"),
        })?;
        let mut options = self.options.clone();
        if parsed.scheme() == "http" {
            // The operator named a plain-HTTP source and allowed it.
            options.push(("allow_http".into(), "true".into()));
        }
        object_store::parse_url_opts(&parsed, options).map_err(|e| fetch_error(url, e))
    }
}

fn fetch_error(url: &str, e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound {
            url: url.to_string(),
        },
        e => StoreError::Fetch {
            url: url.to_string(),
            message: e.to_string(),
        },
    }
}

/// Streams the object at `path` into `dest`, checking its size and sha256 metadata.
async fn download(
    store: &dyn ObjectStore,
    path: &object_store::path::Path,
    url: &str,
    dest: &Path,
    max_bytes: u64,
) -> Result<(), StoreError> {
    let got = store
        .get_opts(path, object_store::GetOptions::default())
        .await
        .map_err(|e| fetch_error(url, e))?;
    let check = |message: String| StoreError::Check {
        url: url.to_string(),
        message,
    };
    let expected = got.meta.size;
    if expected > max_bytes {
        return Err(check(format!(
            "{expected} bytes, more than the adapter cache's {max_bytes} (--adapter-cache-mb)"
        )));
    }
    let sha256 = got
        .attributes
        .get(&Attribute::Metadata(SHA256_METADATA.into()))
        .map(|v| v.to_string().to_ascii_lowercase());
    let io = |e: std::io::Error| check(format!("writing {}: {e}", dest.display()));
    let mut file = std::fs::File::create(dest).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut stream = got.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| fetch_error(url, e))?;
        received += chunk.len() as u64;
        if received > expected {
            break;
        }
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(io)?;
    }
    if received != expected {
        return Err(check(format!(
            "received {received} bytes, the store says {expected}"
        )));
    }
    if let Some(want) = sha256 {
        let got: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != want {
            return Err(check(format!(
                "sha256 {got} differs from the object's sha256 metadata {want}"
            )));
        }
    }
    file.sync_all().map_err(io)
}

/// The cache folder name of an adapter URL.
fn cache_key(url: &str) -> String {
    Sha256::digest(url.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_prefixes_pass_at_a_path_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let r = RemoteAdapters::new(
            vec!["s3://bucket/adapters/".into(), "https://".into()],
            dir.path(),
            1 << 20,
        )
        .unwrap();
        assert!(r.check_allowed("s3://bucket/adapters/a").is_ok());
        assert!(r.check_allowed("https://example.org/a").is_ok());
        let refused = r.check_allowed("s3://bucket/adapters-evil/a").unwrap_err();
        assert!(
            refused.to_string().contains("--allow-adapter-source"),
            "{refused}"
        );
        assert!(r.check_allowed("http://example.org/a").is_err());
        assert!(is_remote("gs://b/x") && is_remote("az://c/x") && !is_remote("/local/x"));
    }
}
