use std::path::PathBuf;

/// What went wrong reading a GGUF file; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file ends inside a header field or a tensor's data.
    #[error("{path}: truncated GGUF file: {what} at byte {offset} needs {needed} bytes, the file has {len}", path = .path.display())]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        len: u64,
    },
    /// A header field holds a value the format does not allow.
    #[error("{path}: corrupt GGUF file: {what}", path = .path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: tensor {tensor:?} has ggml type {type_name} (id {type_id}), which is not supported; supported: {supported}", path = .path.display())]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
        type_name: String,
        supported: String,
    },
    #[error("{path}: metadata key `{key}` is missing", path = .path.display())]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key `{key}`: expected {expected}, found {found}", path = .path.display())]
    WrongType {
        path: PathBuf,
        key: String,
        expected: String,
        found: String,
    },
    #[error("{path}: no tensor {tensor:?}", path = .path.display())]
    MissingTensor { path: PathBuf, tensor: String },
}

pub type Result<T> = std::result::Result<T, GgufError>;
