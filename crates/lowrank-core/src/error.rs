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
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// 4-bit quantization (a bad block size, a malformed bitsandbytes tensor...).
    #[error(transparent)]
    Quant(#[from] lowrank_quant::Error),
    #[error("{0}")]
    Msg(String),
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
        Error::Msg(format!("--{}: {message}", field.replace('_', "-")))
    }

    pub fn tensors(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Tensors {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
