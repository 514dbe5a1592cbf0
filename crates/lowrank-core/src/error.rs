//! The error type of the library crates: every variant names the file or field at fault.

use std::path::PathBuf;

/// Errors raised while reading, validating or applying adapters and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A configuration field holds a value we cannot use.
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// A tensor file does not fit what the configuration or the base model expects.
    #[error("{path}: {message}")]
    Tensors { path: PathBuf, message: String },
    /// A file or folder whose content cannot be used (a tokenizer, a model folder without
    /// weights, a GGUF model lowrank cannot map...).
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// 4-bit quantization (a bad block size, a malformed bitsandbytes tensor...).
    #[error(transparent)]
    Quant(#[from] lowrank_quant::Error),
    /// A GGUF file that cannot be read (truncated, corrupt, a missing key...).
    #[error(transparent)]
    Gguf(#[from] lowrank_gguf::GgufError),
    /// A command-line option (`--flag`) holds a value that cannot be used.
    #[error("--{flag}: {message}")]
    Option { flag: String, message: String },
    /// A line of a data file cannot be used.
    #[error("{}:{line}: {message}", .path.display())]
    DataLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A training run stopped before an update whose loss or gradient norm is not finite;
    /// `last_checkpoint` is the checkpoint to go back to, if one was saved.
    #[error(
        "step {step}: {what} is {value} (lr {lr:.3e}); stopping before the update; {}",
        last_good(.last_checkpoint)
    )]
    Diverged {
        step: usize,
        what: String,
        value: f64,
        lr: f64,
        last_checkpoint: Option<PathBuf>,
    },
    /// A training run's `--out` already holds a run (its log) and `--resume` was not given.
    #[error(
        "{}: already holds a training run ({}); pass --resume {} to continue it, or choose another --out",
        .out.display(),
        .log.display(),
        .out.display()
    )]
    RunExists { out: PathBuf, log: PathBuf },
    /// `--resume` refused the checkpoint: other options, model or data, or an unreadable one.
    #[error("--resume {}: {message}", .checkpoint.display())]
    Resume {
        checkpoint: PathBuf,
        message: String,
    },
    #[error("{0}")]
    Msg(String),
}

fn last_good(checkpoint: &Option<PathBuf>) -> String {
    match checkpoint {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint was saved (use --save-every N to keep one)".into(),
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn field(path: impl Into<PathBuf>, field: &str, message: impl Into<String>) -> Self {
        Error::Field {
            path: path.into(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// A command-line option (`--name`) holding a value that cannot be used; `field` is its
    /// name with underscores (`save_every` is `--save-every`).
    pub fn option(field: &str, message: impl std::fmt::Display) -> Self {
        Error::Option {
            flag: field.replace('_', "-"),
            message: message.to_string(),
        }
    }

    pub fn tensors(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Tensors {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
