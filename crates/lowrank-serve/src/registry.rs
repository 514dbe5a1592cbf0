//! The adapters a server can serve: every PEFT adapter folder under the adapter root, plus
//! those added at run time. Loaded lazily on first use, kept under a count and a memory
//! budget with least-recently-used eviction. An adapter in use (an [`AdapterLease`] held by a
//! running request) is never evicted; the budget is enforced again as soon as the last lease
//! on an adapter ends, keeping the most recently used one. Replacing or unloading an adapter
//! leaves running requests with the version they started with.
//!
//! The adapter root's sub-folders and run-time loads follow one rule: an id the API accepts
//! (not the base model's own), a folder under the root (unless any path is allowed). An id not
//! known yet is looked up under the root on first use, so adapters added to a shared store
//! after the server started are served too.
//!
//! The root, and `load_lora_adapter`'s `lora_path`, may also be an object-store URL (see
//! [`crate::store`]): such adapters are fetched into the local cache on first use.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Device;
use lowrank_core::lora::{LinearShape, LoraAdapter, CONFIG_FILE};
use lowrank_models::hub::{Hub, HubId, Wanted};

use crate::store::{is_remote, RemoteAdapters, StoreError};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegistryError {
    #[error("adapter {0:?} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("adapter {id:?} cannot be loaded: {message}")]
    Broken { id: String, message: String },
}

/// Where an adapter's files are.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Local(PathBuf),
    /// An object-store folder URL, fetched into the cache when loaded.
    Remote(String),
}

impl Source {
    fn shown(&self) -> String {
        match self {
            Source::Local(p) => p.display().to_string(),
            Source::Remote(url) => url.clone(),
        }
    }
}

/// Memory limits of the loaded set.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_loaded: usize,
    pub max_bytes: u64,
}

struct Loaded {
    adapter: Arc<LoraAdapter>,
    bytes: u64,
    last_used: u64,
}

#[derive(Default)]
struct State {
    /// Every servable id and where its files are.
    known: BTreeMap<String, Source>,
    loaded: HashMap<String, Loaded>,
    clock: u64,
    loads: u64,
    evictions: u64,
}

/// Counters for /metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    pub known: usize,
    pub loaded: usize,
    pub loaded_bytes: u64,
    pub loads: u64,
    pub evictions: u64,
}

#[derive(Clone)]
pub struct AdapterRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    /// The local adapter root (with a remote root: the cache folder, never scanned).
    root: PathBuf,
    /// A remote adapter root: the ids are its sub-folders.
    root_url: Option<String>,
    /// Fetches remote adapters; none when no remote source is allowed.
    remote: Option<Arc<RemoteAdapters>>,
    allow_any_path: bool,
    /// The base model's id in the API, which no adapter may take.
    base_id: String,
    /// `lora_path` may be a Hub id (`--allow-hub-adapters`).
    allow_hub: bool,
    limits: Limits,
    base: Vec<LinearShape>,
    device: Device,
    state: Mutex<State>,
}

/// A loaded adapter pinned in memory for as long as the lease lives. Dropping the last lease on
/// an adapter lets the registry evict it (and does so at once if the loaded set is over budget).
pub struct AdapterLease {
    id: Arc<str>,
    adapter: Option<Arc<LoraAdapter>>,
    registry: Arc<Inner>,
}

impl AdapterLease {
    /// The adapter's id in the API.
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    pub fn adapter(&self) -> &LoraAdapter {
        self.adapter
            .as_deref()
            .expect("a lease holds its adapter until dropped")
    }
}

impl Clone for AdapterLease {
    fn clone(&self) -> Self {
        AdapterLease {
            id: self.id.clone(),
            adapter: self.adapter.clone(),
            registry: self.registry.clone(),
        }
    }
}

impl Drop for AdapterLease {
    fn drop(&mut self) {
        // Unpin first, so the adapter counts as idle when the budget is checked.
        self.adapter.take();
        let mut s = self.registry.lock();
        let most_recent = s
            .loaded
            .iter()
            .max_by_key(|(_, l)| l.last_used)
            .map(|(id, _)| id.clone());
        self.registry.evict(&mut s, most_recent.as_deref());
    }
}

/// Adapter ids are folder-name-like: letters, digits, `.`, `_`, `-`; not `.` or `..`.
pub fn validate_id(id: &str) -> Result<(), RegistryError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "invalid adapter id {id:?}: use letters, digits, '.', '_' and '-' (at most 128)"
        )))
    }
}

fn adapter_bytes(adapter: &LoraAdapter) -> u64 {
    adapter
        .modules
        .values()
        .map(|m| m.num_parameters() as u64 * 4)
        .sum()
}

impl AdapterRegistry {
    /// Scans `root` for adapter folders (those holding adapter_config.json). `base` is the
    /// served model's linear layers, which every adapter is checked against when loaded;
    /// `base_id` the base model's id in the API. Folders that break the rules of
    /// [`AdapterRegistry::register`] are skipped with a warning.
    pub fn new(
        root: &Path,
        base_id: &str,
        base: Vec<LinearShape>,
        device: Device,
        limits: Limits,
        allow_any_path: bool,
    ) -> std::io::Result<Self> {
        let inner = Inner {
            root: root.canonicalize()?,
            root_url: None,
            remote: None,
            allow_any_path,
            base_id: base_id.to_string(),
            allow_hub: false,
            limits,
            base,
            device,
            state: Mutex::new(State::default()),
        };
        let mut known = BTreeMap::new();
        for entry in std::fs::read_dir(&inner.root)? {
            let path = entry?.path();
            if !path.join(CONFIG_FILE).is_file() {
                continue;
            }
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let checked = inner.check_id(&name).and_then(|()| {
                let shown = path.display().to_string();
                inner.resolve(&path, &shown)
            });
            match checked {
                Ok(resolved) => {
                    known.insert(name.into_owned(), Source::Local(resolved));
                }
                Err(e) => tracing::warn!("{}: adapter folder skipped: {e}", path.display()),
            }
        }
        inner.lock().known = known;
        Ok(AdapterRegistry {
            inner: Arc::new(inner),
        })
    }

    /// A registry whose adapters are the sub-folders of the object-store folder `url`, fetched
    /// through `remote`. They are listed where the store can list (HTTP servers cannot), and
    /// found on first use in any case.
    pub fn new_remote(
        url: &str,
        remote: RemoteAdapters,
        base_id: &str,
        base: Vec<LinearShape>,
        device: Device,
        limits: Limits,
    ) -> Result<Self, RegistryError> {
        let url = url.trim_end_matches('/').to_string();
        remote
            .check_allowed(&url)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let listed = match remote.list(&url) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::info!("{url}: adapters not listed ({e}); each is fetched on first use");
                Vec::new()
            }
        };
        let inner = Inner {
            root: remote.cache_dir().to_path_buf(),
            root_url: Some(url.clone()),
            remote: Some(Arc::new(remote)),
            allow_any_path: false,
            base_id: base_id.to_string(),
            allow_hub: false,
            limits,
            base,
            device,
            state: Mutex::new(State::default()),
        };
        let known = listed
            .into_iter()
            .filter(|id| inner.check_id(id).is_ok())
            .map(|id| {
                let source = Source::Remote(format!("{url}/{id}"));
                (id, source)
            })
            .collect();
        inner.lock().known = known;
        Ok(AdapterRegistry {
            inner: Arc::new(inner),
        })
    }

    /// Lets `load_lora_adapter` take object-store URLs under the allowed prefixes.
    pub fn with_remote(mut self, remote: RemoteAdapters) -> Self {
        // Called right after `new`, before the registry is shared.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.remote = Some(Arc::new(remote));
        }
        self
    }

    /// Lets `load_lora_adapter` take a Hub id (`org/name[@revision]`) as `lora_path`: fetched
    /// into the HF cache (or found there) like `--adapter org/name`.
    pub fn with_hub_adapters(mut self, allow: bool) -> Self {
        // Called right after `new`, before the registry is shared.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.allow_hub = allow;
        }
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// Every servable adapter id.
    pub fn ids(&self) -> Vec<String> {
        self.lock().known.keys().cloned().collect()
    }

    /// Every servable adapter id with where its files are (a folder or a URL).
    pub fn sources(&self) -> Vec<(String, String)> {
        let s = self.lock();
        s.known
            .iter()
            .map(|(id, src)| (id.clone(), src.shown()))
            .collect()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().known.contains_key(id)
    }

    pub fn stats(&self) -> RegistryStats {
        let s = self.lock();
        RegistryStats {
            known: s.known.len(),
            loaded: s.loaded.len(),
            loaded_bytes: s.loaded.values().map(|l| l.bytes).sum(),
            loads: s.loads,
            evictions: s.evictions,
        }
    }

    /// The adapter `id`, loading it if needed, pinned in memory while the lease lives.
    pub fn get(&self, id: &str) -> Result<AdapterLease, RegistryError> {
        let inner = &self.inner;
        let lease = |adapter: &Arc<LoraAdapter>| AdapterLease {
            id: id.into(),
            adapter: Some(adapter.clone()),
            registry: inner.clone(),
        };
        let known = {
            let mut s = self.lock();
            s.clock += 1;
            let now = s.clock;
            if let Some(l) = s.loaded.get_mut(id) {
                l.last_used = now;
                return Ok(lease(&l.adapter));
            }
            s.known.get(id).cloned()
        };
        // Fetch, read and check the files outside the lock: other tenants keep being served
        // meanwhile.
        let source = match known {
            Some(source) => source,
            None => inner.discover(id)?,
        };
        let path = inner.local_folder(id, &source)?;
        let adapter = inner.load_from(id, &path)?;
        let mut s = self.lock();
        s.known.entry(id.to_string()).or_insert(source);
        if let Some(l) = s.loaded.get(id) {
            // Another request loaded it first.
            return Ok(lease(&l.adapter));
        }
        // The lease exists before the budget is enforced, so this adapter counts as in use.
        let leased = lease(&adapter);
        inner.insert(&mut s, id, adapter);
        Ok(leased)
    }

    /// Adds or replaces adapter `id` from `path` (vLLM's load_lora_adapter). The path must lie
    /// under the adapter root unless the operator allowed any path. Loaded at once, so a
    /// broken adapter is reported to the caller.
    pub fn register(&self, id: &str, path: &str) -> Result<(), RegistryError> {
        let inner = &self.inner;
        inner.check_id(id)?;
        if let Some(url) = inner.remote_path(path) {
            let source = Source::Remote(url);
            let folder = inner.local_folder(id, &source)?;
            let adapter = inner.load_from(id, &folder)?;
            let mut s = self.lock();
            s.known.insert(id.to_string(), source);
            s.loaded.remove(id);
            inner.insert(&mut s, id, adapter);
            return Ok(());
        }
        let requested = Path::new(path);
        let joined = if requested.is_absolute() {
            requested.to_path_buf()
        } else {
            inner.root.join(requested)
        };
        // A folder under the root wins over a Hub id of the same name; a Hub id is fetched into
        // (or found in) the HF cache, never looked up as a folder elsewhere.
        let hub_id = HubId::parse(path).filter(|_| inner.allow_hub && !joined.exists());
        let resolved = match &hub_id {
            Some(hub_id) => Hub::from_env()
                .fetch(hub_id, Wanted::Adapter)
                .map_err(|e| RegistryError::Invalid(format!("lora_path {path:?}: {e}")))?
                .canonicalize()
                .map_err(|e| RegistryError::Invalid(format!("lora_path {path:?}: {e}")))?,
            None => inner.resolve(&joined, &format!("lora_path {path:?}"))?,
        };
        let adapter = inner.load_from(id, &resolved)?;
        let mut s = self.lock();
        s.known.insert(id.to_string(), Source::Local(resolved));
        s.loaded.remove(id);
        inner.insert(&mut s, id, adapter);
        Ok(())
    }

    /// Removes adapter `id`; requests already holding it finish with it.
    pub fn unregister(&self, id: &str) -> Result<(), RegistryError> {
        let mut s = self.lock();
        if s.known.remove(id).is_none() {
            return Err(RegistryError::NotFound(id.to_string()));
        }
        s.loaded.remove(id);
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than refusing service, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where an id not known yet is: a sub-folder of the root holding an adapter.
    fn discover(&self, id: &str) -> Result<Source, RegistryError> {
        validate_id(id)?;
        if id == self.base_id {
            return Err(RegistryError::NotFound(id.to_string()));
        }
        if let Some(url) = &self.root_url {
            return Ok(Source::Remote(format!("{url}/{id}")));
        }
        let folder = self.root.join(id);
        if !folder.join(CONFIG_FILE).is_file() {
            return Err(RegistryError::NotFound(id.to_string()));
        }
        let resolved = self
            .resolve(&folder, &folder.display().to_string())
            .map_err(|_| RegistryError::NotFound(id.to_string()))?;
        Ok(Source::Local(resolved))
    }

    /// The object-store URL `lora_path` names: a URL, or a path relative to a remote root.
    fn remote_path(&self, path: &str) -> Option<String> {
        if is_remote(path) {
            return Some(path.trim_end_matches('/').to_string());
        }
        let relative = !Path::new(path).is_absolute();
        self.root_url
            .as_ref()
            .filter(|_| relative)
            .map(|root| format!("{root}/{}", path.trim_end_matches('/')))
    }

    /// The local folder of `source`, fetched into the cache if remote.
    fn local_folder(&self, id: &str, source: &Source) -> Result<PathBuf, RegistryError> {
        let url = match source {
            Source::Local(path) => return Ok(path.clone()),
            Source::Remote(url) => url,
        };
        let Some(remote) = &self.remote else {
            return Err(RegistryError::Invalid(format!(
                "{url}: remote adapter sources are refused; allow them with --allow-adapter-source"
            )));
        };
        remote.fetch(url).map_err(|e| match e {
            StoreError::NotAllowed { .. } => RegistryError::Invalid(e.to_string()),
            StoreError::NotFound { .. } if self.root_url.is_some() => {
                RegistryError::NotFound(id.to_string())
            }
            StoreError::NotFound { .. } => RegistryError::Invalid(e.to_string()),
            e => RegistryError::Broken {
                id: id.to_string(),
                message: e.to_string(),
            },
        })
    }

    /// A valid adapter id that is not the base model's.
    fn check_id(&self, id: &str) -> Result<(), RegistryError> {
        validate_id(id)?;
        if id == self.base_id {
            return Err(RegistryError::Invalid(format!(
                "adapter id {id:?} is the base model's id; choose another name"
            )));
        }
        Ok(())
    }

    /// `path` resolved (symbolic links followed), which must lie under the adapter root
    /// unless the operator allowed any path. `shown` names it in errors.
    fn resolve(&self, path: &Path, shown: &str) -> Result<PathBuf, RegistryError> {
        let resolved = path
            .canonicalize()
            .map_err(|e| RegistryError::Invalid(format!("{shown}: {e}")))?;
        if !self.allow_any_path && !resolved.starts_with(&self.root) {
            return Err(RegistryError::Invalid(format!(
                "{shown} is outside the adapter root {} (it resolves to {})",
                self.root.display(),
                resolved.display()
            )));
        }
        Ok(resolved)
    }

    fn load_from(&self, id: &str, path: &Path) -> Result<Arc<LoraAdapter>, RegistryError> {
        LoraAdapter::load(path, &self.base, &self.device)
            .map(|adapter| {
                // Served unmerged: its factors are read at every decoding step.
                adapter.back_with_huge_pages();
                Arc::new(adapter)
            })
            .map_err(|e| RegistryError::Broken {
                id: id.to_string(),
                message: e.to_string(),
            })
    }

    fn insert(&self, s: &mut State, id: &str, adapter: Arc<LoraAdapter>) {
        s.clock += 1;
        let bytes = adapter_bytes(&adapter);
        s.loaded.insert(
            id.to_string(),
            Loaded {
                adapter,
                bytes,
                last_used: s.clock,
            },
        );
        s.loads += 1;
        self.evict(s, Some(id));
    }

    /// Drops least-recently-used adapters that no request holds (other than `keep`) until the
    /// limits hold again.
    fn evict(&self, s: &mut State, keep: Option<&str>) {
        loop {
            let bytes: u64 = s.loaded.values().map(|l| l.bytes).sum();
            if s.loaded.len() <= self.limits.max_loaded && bytes <= self.limits.max_bytes {
                return;
            }
            let victim = s
                .loaded
                .iter()
                .filter(|(id, l)| Some(id.as_str()) != keep && Arc::strong_count(&l.adapter) == 1)
                .min_by_key(|(_, l)| l.last_used)
                .map(|(id, _)| id.clone());
            match victim {
                Some(id) => {
                    s.loaded.remove(&id);
                    s.evictions += 1;
                    tracing::info!(adapter = %id, "evicted");
                }
                // Everything else is in use: stay over budget until their last lease ends.
                None => return,
            }
        }
    }
}
