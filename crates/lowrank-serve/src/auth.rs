//! API keys: a JSON or TOML file mapping each key to the model ids (adapters, or the base's
//! name) it may use, or to "*" for all of them. Only "*" keys may load and unload adapters.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
enum Allowed {
    /// "*"
    All(String),
    Ids(Vec<String>),
}

/// What a key may do.
#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    All,
    Ids(Vec<String>),
}

impl Grant {
    pub fn allows(&self, id: &str) -> bool {
        match self {
            Grant::All => true,
            Grant::Ids(ids) => ids.iter().any(|i| i == id),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Grant::All)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: HashMap<String, Grant>,
}

impl ApiKeys {
    /// Reads `{"key": ["adapter", ...] | "*"}` as JSON (`.json`) or TOML (any other name).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let raw: HashMap<String, Allowed> = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        } else {
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        };
        let mut keys = HashMap::new();
        for (key, allowed) in raw {
            // A client sends the key as `Authorization: Bearer <key>`, read back trimmed and as
            // visible ASCII: any other key could never be presented.
            let sendable = !key.is_empty()
                && key.trim() == key
                && key.bytes().all(|b| (b' '..=b'~').contains(&b));
            if !sendable {
                return Err(format!(
                    "{}: key {:?}: keys must be non-empty printable ASCII without surrounding spaces (sent as `Authorization: Bearer <key>`)",
                    path.display(),
                    key.chars().take(4).collect::<String>()
                ));
            }
            let grant = match allowed {
                Allowed::All(s) if s == "*" => Grant::All,
                Allowed::All(s) => {
                    return Err(format!(
                        "{}: key {}…: expected \"*\" or a list of model ids, found {s:?}",
                        path.display(),
                        key.chars().take(4).collect::<String>()
                    ))
                }
                Allowed::Ids(ids) => Grant::Ids(ids),
            };
            keys.insert(key, grant);
        }
        if keys.is_empty() {
            return Err(format!("{}: no keys", path.display()));
        }
        Ok(ApiKeys { keys })
    }

    /// The grant of an `Authorization: Bearer <key>` header value, if the key is known. The
    /// scheme's name is case-insensitive (RFC 9110, section 11.1).
    pub fn check(&self, authorization: Option<&str>) -> Option<&Grant> {
        let (scheme, key) = authorization?.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.keys.get(key.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_json_and_toml() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("keys.json");
        std::fs::write(&json, r#"{"sk-a": ["tenant-a"], "sk-root": "*"}"#).unwrap();
        let keys = ApiKeys::load(&json).unwrap();
        let a = keys.check(Some("Bearer sk-a")).unwrap();
        assert!(a.allows("tenant-a") && !a.allows("tenant-b") && !a.is_admin());
        assert!(keys.check(Some("Bearer sk-root")).unwrap().is_admin());
        assert!(keys.check(Some("Bearer nope")).is_none());
        assert!(keys.check(Some("bearer sk-a")).unwrap().allows("tenant-a"));
        assert!(keys.check(Some("BEARER  sk-root")).unwrap().is_admin());
        assert!(keys.check(Some("Basic sk-a")).is_none());
        assert!(keys.check(Some("sk-a")).is_none());
        assert!(keys.check(None).is_none());

        let toml_path = dir.path().join("keys.toml");
        std::fs::write(&toml_path, "\"sk-b\" = [\"tenant-b\", \"base\"]\n").unwrap();
        let keys = ApiKeys::load(&toml_path).unwrap();
        assert!(keys.check(Some("Bearer sk-b")).unwrap().allows("base"));
    }

    #[test]
    fn bad_files_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        std::fs::write(&p, r#"{"sk-a": "everything"}"#).unwrap();
        assert!(ApiKeys::load(&p).unwrap_err().contains("expected \"*\""));
        std::fs::write(&p, "{}").unwrap();
        assert!(ApiKeys::load(&p).unwrap_err().contains("no keys"));
        std::fs::write(&p, "{").unwrap();
        assert!(ApiKeys::load(&p).unwrap_err().contains("keys.json"));
    }

    /// Found by the fuzz suite: these keys loaded but no client could ever present them.
    #[test]
    fn keys_that_cannot_be_sent_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        for key in ["", " ", " sk-a", "sk-a\t", "sk\u{0}x", "sk-é"] {
            let file = serde_json::json!({key: "*", "sk-ok": "*"});
            std::fs::write(&p, file.to_string()).unwrap();
            let err = ApiKeys::load(&p).unwrap_err();
            assert!(
                err.contains("keys.json") && err.contains("printable ASCII"),
                "{key:?}: {err}"
            );
        }
        std::fs::write(&p, r#"{"sk a!~": ["base"]}"#).unwrap();
        let keys = ApiKeys::load(&p).unwrap();
        assert!(keys.check(Some("Bearer sk a!~")).unwrap().allows("base"));
    }
}
