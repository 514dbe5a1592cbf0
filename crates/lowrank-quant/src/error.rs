//! The error type of the crate: every variant names the tensor or field at fault.

/// Errors raised while quantizing, validating or (de)serializing 4-bit weights.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--block-size` / `blocksize` outside 32..=4096 or not a power of two.
    #[error("block size {block_size}: must be a power of two in 32..=4096")]
    BlockSize { block_size: usize },
    /// A 4-bit type other than nf4 and fp4 (`--quantize`).
    #[error("unknown quant type {name:?}; expected one of: nf4, fp4")]
    UnknownQuantType { name: String },
    /// A tensor is missing or has the wrong dtype, shape or length.
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    /// A field of a `quant_state` blob or of `quantization_config` is missing or invalid.
    #[error("`{name}`: field `{field}`: {message}")]
    Field {
        name: String,
        field: String,
        message: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name}: invalid JSON: {source}")]
    Json {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn tensor(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            message: message.into(),
        }
    }

    pub fn field(name: impl Into<String>, field: &str, message: impl Into<String>) -> Self {
        Error::Field {
            name: name.into(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
