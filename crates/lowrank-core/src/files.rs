//! File helpers shared by every reader and writer: JSON with the path in its errors, and atomic
//! writes (temp file in the same folder, then rename) so an interrupted run never leaves a
//! half-written file behind.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::Tensor;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads and parses a JSON file; errors name the file, and the field when a value has the
/// wrong type ([`from_json_value`]).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut de = serde_json::Deserializer::from_str(&text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| json_error(path, e))?;
    de.end().map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(value)
}

/// Deserializes a parsed JSON document read from `path`: a value of the wrong type (or out of
/// range) is an error on its field, e.g. `` field `rank_pattern.q_proj`: invalid type ``.
pub fn from_json_value<T: DeserializeOwned>(value: serde_json::Value, path: &Path) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| json_error(path, e))
}

fn json_error(path: &Path, e: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let field = e.path().to_string();
    let source = e.into_inner();
    // "." is the document itself, "?" a place serde could not track (flattened fields).
    if source.is_data() && field != "." && field != "?" {
        Error::field(path, &field, source.to_string())
    } else {
        Error::Json {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reads a text file that must be UTF-8; otherwise the error names the line (1-based) and the
/// byte within it where the encoding breaks, as a JSONL reader names its lines.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line_start = valid
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |at| at + 1);
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        Error::DataLine {
            path: path.to_path_buf(),
            line,
            message: format!(
                "not valid UTF-8 (at byte {} of the line); the file must be UTF-8 text",
                valid.len() - line_start + 1
            ),
        }
    })
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = builder(".tmp", 0o644)
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// A temporary folder in `parent` to stage a multi-file output before renaming it into place.
/// Made with the usual folder permissions (tempfile's default is owner-only), so the renamed
/// output is readable like any other.
pub fn staging_dir(parent: &Path, prefix: &str) -> Result<tempfile::TempDir> {
    builder(prefix, 0o755)
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))
}

/// A tempfile builder whose files/folders get `mode` on Unix (tempfile's own default is
/// owner-only, which would make every output unreadable to other users).
fn builder(prefix: &str, mode: u32) -> tempfile::Builder<'_, 'static> {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = mode;
    b
}

/// Pretty-printed JSON, written atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Writes tensors as safetensors with the `{"format": "pt"}` metadata that transformers and PEFT
/// check for, atomically. Tensors keep their dtype.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let contiguous = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), t.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(
        contiguous.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
    )?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn safetensors_round_trip_keeps_dtype_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let bf = t.to_dtype(DType::BF16).unwrap();
        write_safetensors(&path, &[("a".into(), t.clone()), ("b".into(), bf)]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded["b"].dtype(), DType::BF16);
        let back: Vec<Vec<f32>> = loaded["a"].to_vec2().unwrap();
        assert_eq!(back, vec![vec![0., 1., 2.], vec![3., 4., 5.]]);
    }

    #[cfg(unix)]
    #[test]
    fn written_files_and_staged_folders_are_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_json(&path, &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let staged = staging_dir(dir.path(), ".s-").unwrap();
        assert_eq!(
            std::fs::metadata(staged.path())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
    }

    /// Found by the fuzz suite: a value of the wrong type was reported as "invalid JSON" with
    /// a line and column, without the field.
    #[test]
    fn json_values_of_the_wrong_type_name_their_field() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Config {
            r: usize,
            patterns: std::collections::BTreeMap<String, Vec<bool>>,
            #[serde(flatten)]
            other: serde_json::Map<String, serde_json::Value>,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        for (text, field) in [
            (r#"{"r": "8", "patterns": {}}"#, "field `r`"),
            (
                r#"{"r": 8, "patterns": {"q": [true, 1]}}"#,
                "field `patterns.q[1]`",
            ),
            (r#"{"r": -1, "patterns": {}}"#, "field `r`"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = read_json::<Config>(&path).unwrap_err().to_string();
            assert!(
                err.contains("c.json") && err.contains(field),
                "{text}: {err}"
            );
            let value: serde_json::Value = serde_json::from_str(text).unwrap();
            let err = from_json_value::<Config>(value, &path)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("c.json") && err.contains(field),
                "{text}: {err}"
            );
        }
        std::fs::write(&path, r#"{"r": 8, "patterns": {}} x"#).unwrap();
        let err = read_json::<Config>(&path).unwrap_err().to_string();
        assert!(err.contains("invalid JSON"), "{err}");
    }

    #[test]
    fn non_utf8_text_names_line_and_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
        let err = read_text(&path).unwrap_err().to_string();
        assert!(
            err.contains("data.jsonl:2:") && err.contains("UTF-8") && err.contains("byte 14"),
            "{err}"
        );
        assert!(matches!(
            read_text(&path),
            Err(Error::DataLine { line: 2, .. })
        ));
        std::fs::write(&path, "{\"text\": \"café\"}\n").unwrap();
        assert_eq!(read_text(&path).unwrap(), "{\"text\": \"café\"}\n");
    }

    #[test]
    fn json_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = read_json::<serde_json::Value>(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.json") && err.contains("invalid JSON"),
            "{err}"
        );
    }
}
