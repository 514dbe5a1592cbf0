//! GGUF files, llama.cpp's model format (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>):
//! a bounds-checked reader over a memory map (every length and offset is checked against the
//! file before it is used, so a corrupt or truncated file is an error naming what was being
//! read, never a panic or a huge allocation), ggml's dequantization ([`TensorType`]) and a
//! writer ([`GgufWriter`]).
//!
//! Layout (little-endian): magic `GGUF`, version (2 or 3), tensor count (u64), metadata count
//! (u64), the metadata key/values, the tensor infos (name, dims innermost first, ggml type,
//! offset into the data section), then the data section at the next multiple of
//! `general.alignment` (default 32).

mod error;
mod quants;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use error::{GgufError, Result};
pub use quants::TensorType;
pub use writer::GgufWriter;

/// The first four bytes of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// An integer of any width and sign that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A number of any type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Where a tensor's data is and how to read it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml's order: the innermost (contiguous) dimension first. The row-major shape is the reverse.
    pub dims: Vec<u64>,
    pub tensor_type: TensorType,
    /// Absolute byte range of the data in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    /// The row-major shape (`[rows, columns]` for a matrix), as PyTorch and safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        // Every dim was checked to fit the file, so it fits usize.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// An open, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Whether `path` starts with the GGUF magic (false when it cannot be read).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == MAGIC
}

impl GgufFile {
    /// Memory-maps and parses `path`, checking every tensor's data lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: read-only map; as with every mmap (and safetensors'), the file must not be
        // truncated while it is in use.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let mut r = Reader {
            path,
            bytes: &map,
            pos: 0,
        };
        let magic = r.take(4, "the magic number")?;
        if magic != MAGIC {
            return Err(r.corrupt(format!(
                "the file does not start with \"GGUF\" (found {magic:02x?}); not a GGUF file"
            )));
        }
        let version = r.u32("the version")?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            return Err(r.corrupt("big-endian GGUF files are not supported".into()));
        }
        if !(2..=3).contains(&version) {
            return Err(r.corrupt(format!("GGUF version {version}; supported: 2 and 3")));
        }
        let tensor_count = r.u64("the tensor count")?;
        let kv_count = r.u64("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("the key of metadata entry {i}"))?;
            let type_id = r.u32(&format!("the type of metadata key `{key}`"))?;
            let value = r.value(type_id, &key, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => (*a).into(),
            Some(other) => {
                return Err(r.corrupt(format!(
                "metadata key `general.alignment` must be a power-of-two uint32, found {other:?}"
            )))
            }
        };
        // Each tensor info takes at least 8 + 4 + 4 + 8 bytes: refuse counts the file cannot hold
        // before allocating for them.
        if tensor_count > (r.remaining() / 24) as u64 {
            return Err(GgufError::Truncated {
                path: path.to_path_buf(),
                what: format!("the infos of {tensor_count} tensors"),
                offset: r.pos as u64,
                needed: tensor_count.saturating_mul(24),
                len: map.len() as u64,
            });
        }
        let mut raw = Vec::new();
        for i in 0..tensor_count {
            let name = r.string(&format!("the name of tensor {i}"))?;
            let n_dims = r.u32(&format!("the dimension count of tensor {name:?}"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.corrupt(format!(
                    "tensor {name:?} has {n_dims} dimensions; ggml allows 1 to {MAX_DIMS}"
                )));
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("the dimensions of tensor {name:?}"))?);
            }
            let type_id = r.u32(&format!("the type of tensor {name:?}"))?;
            let offset = r.u64(&format!("the data offset of tensor {name:?}"))?;
            raw.push((name, dims, type_id, offset));
        }
        let data_start = r.pos.next_multiple_of(alignment as usize);
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, type_id, offset) in raw {
            let Some(tensor_type) = TensorType::from_id(type_id) else {
                return Err(GgufError::UnsupportedTensorType {
                    path: path.to_path_buf(),
                    tensor: name,
                    type_id,
                    type_name: TensorType::name_of_id(type_id).to_string(),
                    supported: TensorType::supported_names(),
                });
            };
            let numel = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    r.corrupt(format!("tensor {name:?}: dimensions {dims:?} overflow"))
                })?;
            if dims[0] % tensor_type.block_size() as u64 != 0 {
                return Err(r.corrupt(format!(
                    "tensor {name:?}: row length {} is not a multiple of the {}-value blocks of {}",
                    dims[0],
                    tensor_type.block_size(),
                    tensor_type.name()
                )));
            }
            if offset % alignment != 0 {
                return Err(r.corrupt(format!(
                    "tensor {name:?}: data offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            let len = tensor_type
                .bytes_for(numel)
                .ok_or_else(|| r.corrupt(format!("tensor {name:?}: size overflows")))?;
            let start = (data_start as u64).checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= map.len() as u64 => tensors.push(TensorInfo {
                    name,
                    dims,
                    tensor_type,
                    start: start as usize,
                    len: len as usize,
                }),
                _ => {
                    return Err(GgufError::Truncated {
                        path: path.to_path_buf(),
                        what: format!("the data of tensor {name:?}"),
                        offset: start.unwrap_or(u64::MAX),
                        needed: len,
                        len: map.len() as u64,
                    })
                }
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (checked to lie inside the file at open).
    pub fn data(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.start..info.start + info.len]
    }

    /// Tensor `name` dequantized to f32, in row-major order of [`TensorInfo::shape`].
    pub fn dequantize(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let mut out = vec![0f32; info.numel()];
        info.tensor_type.dequantize(self.data(info), &mut out);
        Ok((info.shape(), out))
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            expected: expected.to_string(),
            found: match found {
                Value::String(s) => format!("string {s:?}"),
                Value::Array(_) => "an array".to_string(),
                v => format!("{} {v:?}", v.type_name()),
            },
        }
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    /// A non-negative integer under `key`; None when absent.
    pub fn u64_opt(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        let v = self.required(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// A number under `key`; None when absent.
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.wrong_type(key, "a number", v))
            })
            .transpose()
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        let v = self.required(key)?;
        v.as_f64()
            .ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "a bool", v)),
        }
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "a string", v))
            })
            .transpose()
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.required(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    /// An array under `key`; None when absent.
    pub fn array_opt(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong_type(key, "an array", v)),
        }
    }

    /// An array of strings under `key`; None when absent.
    pub fn strings_opt(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(items) = self.array_opt(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "an array of strings", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An error about metadata key `key` (a value out of range, an unknown name).
    pub fn key_error(&self, key: &str, expected: &str, found: &Value) -> GgufError {
        self.wrong_type(key, expected, found)
    }
}

/// A cursor over the mapped bytes whose every read is bounds-checked.
struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

/// Arrays nest at most this deep (llama.cpp writes none nested; this bounds recursion).
const MAX_ARRAY_NESTING: usize = 2;

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn corrupt(&self, what: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            what,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n as u64,
                len: self.bytes.len() as u64,
            });
        }
        let bytes: &'a [u8] = self.bytes;
        let out = &bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.corrupt(format!("{what} is not UTF-8: {e}")))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<Value> {
        let what = format!("the value of metadata key `{key}`");
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(self.u32(&what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.corrupt(format!("{what}: bool byte {b}, expected 0 or 1"))),
            },
            8 => Value::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(self.corrupt(format!("{what}: arrays nested too deep")));
                }
                let item_type = self.u32(&what)?;
                let len = self.u64(&what)?;
                // Every item takes at least one byte: refuse lengths the file cannot hold
                // before allocating for them.
                if len > self.remaining() as u64 {
                    return Err(GgufError::Truncated {
                        path: self.path.to_path_buf(),
                        what: format!("{what} (an array of {len} items)"),
                        offset: self.pos as u64,
                        needed: len,
                        len: self.bytes.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(&what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            other => {
                return Err(self.corrupt(format!(
                    "metadata key `{key}` has value type {other}; GGUF defines 0 to 12"
                )))
            }
        })
    }
}
