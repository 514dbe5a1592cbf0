//! Checkpoints and `--resume`: a checkpoint records the trainable tensors, the optimizer
//! state, the options and the identity of the model and data (see `input_identity`);
//! resuming refuses other ones, keeps the log's lines up to the checkpoint exactly as written
//! and removes what a killed run left half-written (staging folders, temporary files).

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use lowrank_core::{Error, Result};
use serde_json::{json, Value};

use crate::optim::Optimizer;
use crate::trainable::Trainable;
use crate::TrainOptions;

pub const LOG_FILE: &str = "training_log.jsonl";
pub const PLOT_FILE: &str = "loss.svg";
pub const STATE_FILE: &str = "trainer_state.json";
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Options whose change makes a resumed run a different run.
pub(crate) fn run_identity(o: &TrainOptions) -> Value {
    let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        for k in [
            "out",
            "resume",
            "quiet",
            "save_every",
            "eval_every",
            "stop_after",
            "model",
            "data",
            "eval_data",
            "init_adapter",
        ] {
            obj.remove(k);
        }
    }
    v
}

/// The model and data a run trains on, recorded in each checkpoint for `--resume` to compare:
/// the model folder (path, bytes of config.json and weights, CRC-32 of config.json) and each
/// data file (path, bytes, CRC-32 of its contents).
pub(crate) fn input_identity(o: &TrainOptions, model_dir: &Path) -> Result<Value> {
    let absolute = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let data = |path: &Path| -> Result<Value> {
        let (bytes, crc) = file_checksum(path)?;
        Ok(json!({"path": absolute(path), "bytes": bytes, "crc32": format!("{crc:08x}")}))
    };
    if model_dir.is_file() {
        // A GGUF file holds config and weights: its checksum covers both.
        let (bytes, crc) = file_checksum(model_dir)?;
        return Ok(json!({
            "model": {"path": absolute(model_dir), "bytes": bytes, "config_crc32": format!("{crc:08x}")},
            "data": data(&o.data)?,
            "eval_data": o.eval_data.as_deref().map(data).transpose()?,
        }));
    }
    let (mut bytes, config_crc) = file_checksum(&model_dir.join("config.json"))?;
    let entries = std::fs::read_dir(model_dir).map_err(|e| Error::io(model_dir, e))?;
    for entry in entries.filter_map(|e| e.ok()) {
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(".safetensors")
        {
            // Through symlinks, as the HF cache stores its blobs.
            let meta = std::fs::metadata(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            bytes += meta.len();
        }
    }
    Ok(json!({
        "model": {"path": absolute(model_dir), "bytes": bytes, "config_crc32": format!("{config_crc:08x}")},
        "data": data(&o.data)?,
        "eval_data": o.eval_data.as_deref().map(data).transpose()?,
    }))
}

/// Size and CRC-32 of a file, read in chunks.
fn file_checksum(path: &Path) -> Result<(u64, u32)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok((bytes, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
}

/// Refuses to resume on another model or other data. The model must be the same folder with
/// the same config and weight sizes (two fine-tunes of one architecture differ only there);
/// data files must hold the same bytes, wherever they now are. Checkpoints written before the
/// inputs were recorded are not checked.
pub(crate) fn check_inputs(ckpt: &Path, saved: Option<&Value>, now: &Value) -> Result<()> {
    let Some(saved) = saved else {
        return Ok(());
    };
    for (key, flag) in [
        ("model", "--model"),
        ("data", "--data"),
        ("eval_data", "--eval-data"),
    ] {
        let (was, is) = (&saved[key], &now[key]);
        let same = if key == "model" {
            was == is
        } else {
            was.get("bytes") == is.get("bytes") && was.get("crc32") == is.get("crc32")
        };
        if !same {
            return Err(Error::Resume {
                checkpoint: ckpt.to_path_buf(),
                message: format!(
                    "{flag} is not what the checkpoint was trained on: the checkpoint has {}, this run gives {}",
                    describe_input(was),
                    describe_input(is)
                ),
            });
        }
    }
    Ok(())
}

fn describe_input(v: &Value) -> String {
    if v.is_null() {
        return "none".into();
    }
    let crc = v.get("crc32").or_else(|| v.get("config_crc32"));
    format!(
        "{} ({} bytes, {}crc32 {})",
        v["path"].as_str().unwrap_or("?"),
        v["bytes"],
        if v.get("config_crc32").is_some() {
            "config.json "
        } else {
            ""
        },
        crc.and_then(Value::as_str).unwrap_or("?")
    )
}

/// Removes what a killed run left half-written in its `--out`: checkpoint staging folders
/// (`.checkpoint-XXXXXX`) and temporary files of atomic writes (`.tmpXXXXXX`).
pub(crate) fn remove_stale_staging(out: &Path) -> Result<()> {
    let random_tail =
        |rest: &str| rest.len() == 6 && rest.chars().all(|c| c.is_ascii_alphanumeric());
    let entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let removed = match (name.strip_prefix(".checkpoint-"), name.strip_prefix(".tmp")) {
            (Some(rest), _) if random_tail(rest) && path.is_dir() => std::fs::remove_dir_all(&path),
            (_, Some(rest)) if random_tail(rest) && path.is_file() => std::fs::remove_file(&path),
            _ => continue,
        };
        removed.map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// The checkpoint folder `--resume` names: a checkpoint itself, or the run folder's latest.
pub fn find_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).map_err(|e| Error::Resume {
        checkpoint: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let latest = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join(STATE_FILE)
                .exists()
                .then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s);
    latest.map(|(_, p)| p).ok_or_else(|| {
        Error::file(
            path,
            format!("no checkpoint to resume from (no checkpoint-N/{STATE_FILE}; was --save-every given?)"),
        )
    })
}

pub(crate) fn checkpoint_dir(out: &Path, step: usize) -> PathBuf {
    out.join(format!("checkpoint-{step}"))
}

pub(crate) fn save_checkpoint(
    out: &Path,
    step: usize,
    t: &Trainable,
    opt: &Optimizer,
    o: &TrainOptions,
    inputs: &Value,
) -> Result<PathBuf> {
    let dest = checkpoint_dir(out, step);
    let staging = lowrank_core::files::staging_dir(out, ".checkpoint-")?;
    let tensors: Vec<(String, Tensor)> = t
        .names
        .iter()
        .cloned()
        .zip(t.vars.iter().map(|v| v.as_tensor().detach()))
        .collect();
    lowrank_core::files::write_safetensors(&staging.path().join(TRAINABLE_FILE), &tensors)?;
    let state = opt.state_tensors(&t.names);
    if !state.is_empty() {
        lowrank_core::files::write_safetensors(&staging.path().join(OPTIMIZER_FILE), &state)?;
    }
    if let Some(ada) = &t.adalora {
        ada.export(&t.vars)?.save(staging.path())?;
        ada.save_state(staging.path())?;
    } else if let Some(adapter) = t.export_adapter()? {
        adapter.save(staging.path())?;
    }
    let info = json!({"step": step, "optimizer_steps": opt.t, "options": o, "inputs": inputs});
    lowrank_core::files::write_json(&staging.path().join(STATE_FILE), &info)?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    }
    std::fs::rename(staging.keep(), &dest).map_err(|e| Error::io(&dest, e))?;
    Ok(dest)
}

/// Refuses to resume with options other than the checkpoint's (those `run_identity` keeps).
pub(crate) fn check_options(ckpt: &Path, state: &Value, o: &TrainOptions) -> Result<()> {
    let saved = state.get("options").cloned().unwrap_or(Value::Null);
    let saved: TrainOptions = lowrank_core::files::from_json_value(saved, &ckpt.join(STATE_FILE))?;
    let (a, b) = (run_identity(&saved), run_identity(o));
    if a == b {
        return Ok(());
    }
    let diff: Vec<String> = a
        .as_object()
        .into_iter()
        .flat_map(|m| m.iter())
        .filter(|(k, v)| b.get(k.as_str()) != Some(v))
        .map(|(k, v)| {
            format!(
                "{k} (checkpoint: {v}, now: {})",
                b.get(k.as_str()).unwrap_or(&Value::Null)
            )
        })
        .collect();
    Err(Error::Resume {
        checkpoint: ckpt.to_path_buf(),
        message: format!("options differ from the checkpoint's: {}", diff.join(", ")),
    })
}

/// Cuts training_log.jsonl back to the lines of the steps up to `step`, as written (parsing
/// and printing a number again may change its last digit), less any line a kill cut short;
/// returns the kept lines.
pub(crate) fn keep_log_until(path: &Path, step: usize) -> Result<Vec<Value>> {
    let mut kept_text = String::new();
    let mut kept = Vec::new();
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if v.get("step")
                .and_then(Value::as_u64)
                .is_some_and(|s| s as usize <= step)
            {
                kept_text.push_str(line);
                kept_text.push('\n');
                kept.push(v);
            }
        }
    }
    lowrank_core::files::write_atomic(path, kept_text.as_bytes())?;
    Ok(kept)
}
