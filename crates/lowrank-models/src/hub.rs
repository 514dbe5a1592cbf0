//! Models and adapters by Hugging Face Hub id, `org/name` or `org/name@revision`: taken from the
//! local HF cache when it holds them, otherwise downloaded with the `hf-hub` client into that
//! cache's standard layout (`models--org--name/{blobs,refs,snapshots}`), so transformers, PEFT
//! and `huggingface_hub` find what lowrank fetched and the other way round. Only the files
//! lowrank reads are fetched: config, generation config, tokenizer files, chat template and the
//! safetensors weights (the single file, or the index and exactly the shards it lists) of a
//! model; `adapter_config.json` and `adapter_model.safetensors` of an adapter.
//!
//! The environment is read as `huggingface_hub` reads it: `HF_ENDPOINT` (a mirror), `HF_TOKEN`
//! or the token file (`HF_TOKEN_PATH`, default `$HF_HOME/token`), `HF_HUB_CACHE` or `HF_HOME`,
//! and `HF_HUB_OFFLINE=1`: never touch the network, use the cache or fail.
//!
//! hf-hub (0.4, blocking API) downloads a file into `blobs/<etag>.part`, continuing with a
//! `Range` request from whatever a cut connection or a killed run left there, renames it to
//! `blobs/<etag>` only once complete and then links `snapshots/<commit>/<file>` to it: a
//! truncated file is never visible under its name. It does not read `HF_TOKEN`, `HF_HUB_CACHE`
//! or `HF_HUB_OFFLINE`, pick files, or explain its errors; that is this module.

use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use lowrank_core::lora::{CONFIG_FILE, WEIGHTS_FILE};
use lowrank_core::{Error, Result};
use serde::Deserialize;

use crate::checkpoint::{shard_names, INDEX_FILE, SINGLE_FILE};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const MODEL_CONFIG: &str = "config.json";
/// Times a broken transfer is retried (each from where it stopped) before giving up.
const RETRIES: usize = 3;

/// What a repo must provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// A model to load: its config, tokenizer and generation files and safetensors weights.
    Model,
    /// Only a model's config.json (to describe the model without its weights).
    ModelConfig,
    /// A PEFT adapter: adapter_config.json and adapter_model.safetensors.
    Adapter,
}

impl Wanted {
    fn noun(self) -> &'static str {
        match self {
            Wanted::Model | Wanted::ModelConfig => "model",
            Wanted::Adapter => "adapter",
        }
    }

    /// Whether `dir` holds everything needed (so no request is made).
    fn is_complete(self, dir: &Path) -> bool {
        match self {
            Wanted::ModelConfig => dir.join(MODEL_CONFIG).is_file(),
            Wanted::Model => dir.join(MODEL_CONFIG).is_file() && weights_complete(dir),
            Wanted::Adapter => dir.join(CONFIG_FILE).is_file() && dir.join(WEIGHTS_FILE).is_file(),
        }
    }

    /// The files to fetch from a repo listing (a sharded model's shards come after its index).
    fn select(self, id: &HubId, listing: &Listing) -> Result<Vec<String>> {
        let has = |f: &str| listing.size_of(f).is_some();
        let mut files = Vec::new();
        match self {
            Wanted::Model | Wanted::ModelConfig => {
                if !has(MODEL_CONFIG) {
                    let hint = if has(CONFIG_FILE) {
                        ": it holds a PEFT adapter (pass it with --adapter)"
                    } else {
                        ""
                    };
                    return Err(msg(format!(
                        "{id} has no {MODEL_CONFIG}, so it is not a transformers model repo{hint}"
                    )));
                }
                if self == Wanted::ModelConfig {
                    return Ok(vec![MODEL_CONFIG.into()]);
                }
                files.extend(
                    crate::llama::COPIED_FILES
                        .iter()
                        .filter(|f| has(f))
                        .map(|f| f.to_string()),
                );
                if has(SINGLE_FILE) {
                    files.push(SINGLE_FILE.into());
                } else if has(INDEX_FILE) {
                    files.push(INDEX_FILE.into());
                } else {
                    return Err(no_safetensors(
                        id,
                        listing,
                        &format!("{SINGLE_FILE} or {INDEX_FILE}"),
                    ));
                }
            }
            Wanted::Adapter => {
                if !has(CONFIG_FILE) {
                    let hint = if has(MODEL_CONFIG) {
                        ": it holds a model (pass it with --model)"
                    } else {
                        ""
                    };
                    return Err(msg(format!(
                        "{id} has no {CONFIG_FILE}, so it is not a PEFT adapter repo{hint}"
                    )));
                }
                if !has(WEIGHTS_FILE) {
                    return Err(no_safetensors(id, listing, WEIGHTS_FILE));
                }
                files.extend([CONFIG_FILE.to_string(), WEIGHTS_FILE.to_string()]);
            }
        }
        Ok(files)
    }
}

/// A model's weights are all there: the single file, or the index and every shard it lists.
fn weights_complete(dir: &Path) -> bool {
    if dir.join(SINGLE_FILE).is_file() {
        return true;
    }
    shard_names(&dir.join(INDEX_FILE))
        .is_ok_and(|names| names.iter().all(|n| dir.join(n).is_file()))
}

/// `org/name` or `org/name@revision` (a branch, tag or commit; default `main`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubId {
    /// Parses a Hub id; `None` when `spec` is not one (the Hub's own rules for names: letters,
    /// digits, `-`, `_`, `.`, starting and ending with a letter or digit, no `--` or `..`).
    pub fn parse(spec: &str) -> Option<HubId> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, revision)) => (repo, Some(revision)),
            None => (spec, None),
        };
        let name_ok = |s: &str| {
            let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
            s.len() <= 96
                && s.starts_with(word)
                && s.ends_with(word)
                && s.chars().all(|c| word(c) || c == '-' || c == '.')
                && !s.contains("--")
                && !s.contains("..")
        };
        let (org, name) = repo.split_once('/')?;
        // The revision names a file under refs/: no empty, `.` or `..` parts.
        let revision_ok = |r: &str| {
            r.split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..")
                && !r
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
        };
        if !name_ok(org) || !name_ok(name) || !revision.is_none_or(revision_ok) {
            return None;
        }
        Some(HubId {
            repo: repo.to_string(),
            revision: revision.map(str::to_string),
        })
    }

    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    fn hf_repo(&self) -> Repo {
        Repo::with_revision(
            self.repo.clone(),
            RepoType::Model,
            self.revision().to_string(),
        )
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(revision) => write!(f, "{}@{revision}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".cache")
        });
    cache.join("huggingface")
}

/// The local HF hub cache: `HF_HUB_CACHE`, else `$HF_HOME/hub` (see [`hf_home`]).
pub fn hf_cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => PathBuf::from(p),
        None => hf_home().join("hub"),
    }
}

/// Resolves a `--model` / `--adapter` argument: an existing folder as is, else a Hub id (from
/// the cache, or downloaded unless `HF_HUB_OFFLINE` is set). Returns the folder with the files.
pub fn resolve(spec: &str, wanted: Wanted) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    // A model (or its config) may be one GGUF file.
    if matches!(wanted, Wanted::Model | Wanted::ModelConfig) && crate::gguf::is_gguf(path) {
        return Ok(path.to_path_buf());
    }
    let noun = wanted.noun();
    let Some(id) = HubId::parse(spec) else {
        return Err(msg(format!(
            "{noun} {spec:?} not found: it is not a folder, nor a Hub repo id (org/name or org/name@revision)"
        )));
    };
    Hub::from_env()
        .fetch(&id, wanted)
        .map_err(|e| msg(format!("{noun} {spec}: {e}")))
}

/// Resolves `--adapter`: an existing folder as is, else a Hub id (see [`resolve`]).
pub fn resolve_adapter_dir(path: &Path) -> Result<PathBuf> {
    match path.to_str() {
        Some(spec) => resolve(spec, Wanted::Adapter),
        // Not UTF-8, so not a Hub id: the reader reports the folder missing.
        None => Ok(path.to_path_buf()),
    }
}

/// Where and how to reach the Hub.
#[derive(Debug, Clone)]
pub struct Hub {
    pub cache: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    /// Where `hf auth login` keeps the token (named in errors).
    pub token_file: PathBuf,
    pub offline: bool,
}

impl Hub {
    /// The settings from the environment (see the module docs).
    pub fn from_env() -> Hub {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let token_file = var("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home().join("token"));
        let token = var("HF_TOKEN").or_else(|| std::fs::read_to_string(&token_file).ok());
        Hub {
            cache: hf_cache_dir(),
            endpoint: var("HF_ENDPOINT").map_or(DEFAULT_ENDPOINT.into(), |e| {
                e.trim().trim_end_matches('/').to_string()
            }),
            token: token
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
            token_file,
            // As huggingface_hub: 1, ON, YES or TRUE, in any case.
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| {
                ["1", "ON", "YES", "TRUE"].contains(&v.trim().to_ascii_uppercase().as_str())
            }),
        }
    }

    fn repo_dir(&self, id: &HubId) -> PathBuf {
        self.cache.join(id.hf_repo().folder_name())
    }

    /// The cached snapshot of `id` when it holds what `wanted` needs: the commit its revision's
    /// ref names (or the revision itself when it is a commit hash). Without a ref for the
    /// default revision, the only snapshot there is (a cache copied without its refs).
    fn cached(&self, id: &HubId, wanted: Wanted) -> Option<PathBuf> {
        let repo_dir = self.repo_dir(id);
        let snapshots = repo_dir.join("snapshots");
        let revision = id.revision();
        let commit = if is_commit_hash(revision) {
            Some(revision.to_string())
        } else {
            std::fs::read_to_string(repo_dir.join("refs").join(revision))
                .ok()
                .map(|c| c.trim().to_string())
        };
        let snapshot = match commit {
            Some(commit) => snapshots.join(commit),
            None if id.revision.is_none() => {
                let mut dirs = std::fs::read_dir(&snapshots)
                    .ok()?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_dir());
                match (dirs.next(), dirs.next()) {
                    (Some(only), None) => only,
                    _ => return None,
                }
            }
            None => return None,
        };
        wanted.is_complete(&snapshot).then_some(snapshot)
    }

    /// The snapshot folder of `id` with the files `wanted` needs: from the cache, or
    /// downloaded into it (progress bars on a terminal, one line before and after on stderr).
    pub fn fetch(&self, id: &HubId, wanted: Wanted) -> Result<PathBuf> {
        if let Some(snapshot) = self.cached(id, wanted) {
            return Ok(snapshot);
        }
        let repo_dir = self.repo_dir(id);
        if self.offline {
            return Err(msg(format!(
                "not in the HF cache ({} lacks its files) and HF_HUB_OFFLINE is set, so it is not downloaded: unset HF_HUB_OFFLINE, or fetch it into that cache where there is network",
                repo_dir.display()
            )));
        }
        let api = ApiBuilder::from_cache(Cache::new(self.cache.clone()))
            .with_endpoint(self.endpoint.clone())
            // hf-hub reads only the token file next to the cache; HF_TOKEN and HF_TOKEN_PATH win.
            .with_token(self.token.clone())
            .with_progress(false)
            .with_retries(RETRIES)
            .with_user_agent("lowrank", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| self.explain(id, None, e))?;
        let repo = api.repo(id.hf_repo());
        let listing = self.listing(&repo, id)?;
        let snapshot = repo_dir.join("snapshots").join(&listing.sha);
        let mut files = wanted.select(id, &listing)?;
        if files.iter().any(|f| f == INDEX_FILE) {
            // Small, and fetched before the total is known: no bar of its own.
            let index = self.download(&repo, id, INDEX_FILE, &snapshot, false)?;
            for shard in shard_names(&index)? {
                let plain = Path::new(&shard)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)));
                if !plain || listing.size_of(&shard).is_none() {
                    return Err(msg(format!(
                        "{id}: {INDEX_FILE} lists shard {shard:?}, which the repo does not have"
                    )));
                }
                files.push(shard);
            }
        }
        let missing: Vec<&String> = files
            .iter()
            .filter(|f| !snapshot.join(f).is_file())
            .collect();
        let bytes: u64 = missing.iter().filter_map(|f| listing.size_of(f)).sum();
        eprintln!(
            "downloading {id} (commit {}) from {}: {} file{}, {}",
            &listing.sha[..listing.sha.len().min(7)],
            self.endpoint,
            missing.len(),
            if missing.len() == 1 { "" } else { "s" },
            HumanBytes(bytes)
        );
        for file in missing {
            self.download(&repo, id, file, &snapshot, true)?;
        }
        if !is_commit_hash(id.revision()) {
            // hf-hub points the ref at each file's commit; this covers files already cached.
            Cache::new(self.cache.clone())
                .repo(id.hf_repo())
                .create_ref(&listing.sha)
                .map_err(|e| Error::io(repo_dir.join("refs"), e))?;
        }
        if !wanted.is_complete(&snapshot) {
            return Err(msg(format!(
                "{} lacks files after the download",
                snapshot.display()
            )));
        }
        eprintln!("{id}: {}", snapshot.display());
        Ok(snapshot)
    }

    /// The repo's commit and files at the revision (`/api/models/{repo}/revision/{rev}`).
    fn listing(&self, repo: &ApiRepo, id: &HubId) -> Result<Listing> {
        let response = repo
            .info_request()
            .query("blobs", "true")
            .call()
            .map_err(|e| self.explain(id, None, ApiError::RequestError(Box::new(e))))?;
        let listing: Listing = response.into_json().map_err(|e| {
            msg(format!(
                "{}: unexpected answer to the repo listing: {e}",
                self.endpoint
            ))
        })?;
        if listing.sha.is_empty() || listing.sha.contains(['/', '\\', '.']) {
            return Err(msg(format!(
                "{}: the repo listing names commit {:?}",
                self.endpoint, listing.sha
            )));
        }
        Ok(listing)
    }

    /// Downloads `file` (resuming a partial one) and checks it landed in `snapshot`; with a
    /// progress bar when `bar` and stderr is a terminal.
    fn download(
        &self,
        repo: &ApiRepo,
        id: &HubId,
        file: &str,
        snapshot: &Path,
        bar: bool,
    ) -> Result<PathBuf> {
        let bar = (bar && std::io::stderr().is_terminal()).then(|| {
            // Drawn from `init` on, once it has its length and name.
            let bar = ProgressBar::hidden();
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:32!} {bytes:>10}/{total_bytes:<10} {wide_bar} {bytes_per_sec:>12} {eta:>4}",
                )
                .expect("valid template"),
            );
            bar
        });
        let path = repo
            .download_with_progress(file, FileBar(bar))
            .map_err(|e| self.explain(id, Some(file), e))?;
        if !path.starts_with(snapshot) {
            return Err(msg(format!(
                "{} moved to another commit during the download; run the command again",
                id.revision()
            )));
        }
        Ok(path)
    }

    /// An error a user can act on, from what hf-hub reports.
    fn explain(&self, id: &HubId, file: Option<&str>, err: ApiError) -> Error {
        let what = file.map_or_else(|| "the repo listing".to_string(), |f| f.to_string());
        match err {
            ApiError::RequestError(e) => match *e {
                ureq::Error::Status(status, response) => {
                    let code = response.header("x-error-code").unwrap_or("").to_string();
                    self.explain_status(id, file, status, &code)
                }
                ureq::Error::Transport(t) => msg(format!(
                    "cannot reach {} ({t}); set HF_HUB_OFFLINE=1 to use only the cache, or HF_ENDPOINT to use a mirror",
                    self.endpoint
                )),
            },
            ApiError::IoError(e) if e.kind() == std::io::ErrorKind::StorageFull => msg(format!(
                "disk full while downloading {what} into {}: free space there, or set HF_HUB_CACHE (or HF_HOME) to a larger disk; the part already downloaded is kept and the next run continues it",
                self.cache.display()
            )),
            ApiError::TooManyRetries(inner) => self.explain(id, file, *inner),
            ApiError::LockAcquisition(lock) => msg(format!(
                "another process is downloading {what} (it holds {}); run again once it is done",
                lock.display()
            )),
            ApiError::InvalidResume => msg(format!(
                "the partial download of {what} in {} is longer than the file: delete the .part file there and run again",
                self.repo_dir(id).join("blobs").display()
            )),
            other => msg(format!(
                "downloading {what} from {} failed: {other}",
                self.endpoint
            )),
        }
    }

    fn explain_status(&self, id: &HubId, file: Option<&str>, status: u16, code: &str) -> Error {
        let page = format!("{}/{}", self.endpoint, id.repo);
        let token_hint = format!(
            "set HF_TOKEN to an access token (or log in with `hf auth login`, which writes {})",
            self.token_file.display()
        );
        match (status, code) {
            (_, "RevisionNotFound") => msg(format!(
                "{page} has no revision {:?} (a branch, tag or commit)",
                id.revision()
            )),
            (_, "EntryNotFound") => msg(format!(
                "{page} has no file {} at {}",
                file.unwrap_or("?"),
                id.revision()
            )),
            (_, "GatedRepo") | (401 | 403, "") => match &self.token {
                None => msg(format!(
                    "{page} is gated or private (HTTP {status}): accept its terms on that page, then {token_hint}"
                )),
                Some(_) => msg(format!(
                    "{page} is gated or private (HTTP {status}) and the token given has no access: accept its terms on that page with the token's account, or use another token (HF_TOKEN)"
                )),
            },
            (_, "RepoNotFound") | (404, _) => {
                let private = if self.token.is_none() {
                    format!("; if it is private, {token_hint}")
                } else {
                    String::new()
                };
                msg(format!(
                    "no such folder, and no repo {} on {}: check the name{private}",
                    id.repo, self.endpoint
                ))
            }
            _ => msg(format!(
                "{} answered HTTP {status}{} for {}",
                self.endpoint,
                if code.is_empty() {
                    String::new()
                } else {
                    format!(" ({code})")
                },
                file.unwrap_or("the repo listing")
            )),
        }
    }
}

fn msg(text: String) -> Error {
    Error::Msg(text)
}

/// No safetensors weights where lowrank reads them: say which weight files the repo has.
fn no_safetensors(id: &HubId, listing: &Listing, expected: &str) -> Error {
    const WEIGHT_EXTENSIONS: &[&str] = &[
        "safetensors",
        "bin",
        "pt",
        "pth",
        "ckpt",
        "gguf",
        "h5",
        "msgpack",
        "onnx",
        "pkl",
        "npz",
    ];
    let weights: Vec<&str> = listing
        .siblings
        .iter()
        .map(|s| s.rfilename.as_str())
        .filter(|f| {
            Path::new(f)
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e))
        })
        .collect();
    let has = if weights.is_empty() {
        "no weight files at all".to_string()
    } else {
        format!("only {}", weights.join(", "))
    };
    msg(format!(
        "{id} has no {expected} (lowrank reads safetensors only); it has {has}. Convert the weights to safetensors (transformers/PEFT save_pretrained) or use a repo that has them"
    ))
}

/// The Hub's repo listing at a revision (`?blobs=true` adds the sizes).
#[derive(Debug, Deserialize)]
struct Listing {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
}

impl Listing {
    /// The file's size; `Some(0)` when the repo has it but the listing gives no size.
    fn size_of(&self, file: &str) -> Option<u64> {
        self.siblings
            .iter()
            .find(|s| s.rfilename == file)
            .map(|s| s.size.unwrap_or(0))
    }
}

/// A file's progress bar (on a terminal only).
struct FileBar(Option<ProgressBar>);

impl hf_hub::api::Progress for FileBar {
    // Called again with the resumed offset when a transfer is retried: start from zero then.
    fn init(&mut self, size: usize, filename: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(filename.to_string());
            bar.set_length(size as u64);
            bar.set_position(0);
            if bar.is_hidden() {
                bar.set_draw_target(ProgressDrawTarget::stderr());
            }
        }
    }

    fn update(&mut self, size: usize) {
        if let Some(bar) = &self.0 {
            bar.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish();
            // The finished bar stays as the file's line; what follows starts below it.
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse_with_an_optional_revision() {
        let id = HubId::parse("HuggingFaceTB/SmolLM2-135M").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision()),
            ("HuggingFaceTB/SmolLM2-135M", "main")
        );
        let id = HubId::parse("org/name@refs/pr/1").unwrap();
        assert_eq!((id.repo.as_str(), id.revision()), ("org/name", "refs/pr/1"));
        assert_eq!(id.to_string(), "org/name@refs/pr/1");
        for not_an_id in [
            "name",
            "./org/name",
            "/abs/path",
            "a/b/c",
            "org/-name",
            "org/na--me",
            "org/name@",
            "org/name@../../x",
            "org/name@a b",
        ] {
            assert_eq!(HubId::parse(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn a_spec_that_is_neither_a_folder_nor_a_hub_id_says_so() {
        let err = resolve("./no-such-dir", Wanted::Model)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a folder, nor a Hub repo id"), "{err}");
    }

    fn offline_hub(cache: &Path) -> Hub {
        Hub {
            cache: cache.to_path_buf(),
            endpoint: "http://127.0.0.1:9".into(),
            token: None,
            token_file: cache.join("token"),
            offline: true,
        }
    }

    #[test]
    fn the_cache_is_used_when_it_holds_the_files_and_offline_says_what_is_missing() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny");
        let snapshot = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(snapshot.join("config.json"), "{}").unwrap();
        let hub = offline_hub(cache.path());
        let id = HubId::parse("org/tiny").unwrap();
        // config.json alone: enough to describe the model, not to load it.
        assert_eq!(hub.fetch(&id, Wanted::ModelConfig).unwrap(), snapshot);
        let err = hub.fetch(&id, Wanted::Model).unwrap_err().to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") && err.contains("models--org--tiny"),
            "{err}"
        );
        // An index whose shards are not all there is incomplete too.
        std::fs::write(
            snapshot.join(INDEX_FILE),
            r#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(snapshot.join("s1.safetensors"), "").unwrap();
        assert!(hub.fetch(&id, Wanted::Model).is_err());
        std::fs::write(snapshot.join("s2.safetensors"), "").unwrap();
        assert_eq!(hub.fetch(&id, Wanted::Model).unwrap(), snapshot);
        // Another revision has no ref here.
        let other = HubId::parse("org/tiny@v2").unwrap();
        assert!(hub.fetch(&other, Wanted::Model).is_err());
    }
}
