//! What every property shares: the runner's configuration, edits of bytes, JSON documents and
//! safetensors headers (with their strategies), the JSON-type oracle, and the checks of an
//! outcome (no panic is proptest's own: a panicking case fails and is shrunk).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{Map, Value};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn read_fixture(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

pub fn fixture_json(rel: &str) -> Value {
    serde_json::from_slice(&read_fixture(rel)).unwrap()
}

/// The seed used unless `PROPTEST_RNG_SEED` is set: CI runs the same inputs every time.
const FIXED_SEED: u64 = 0x10_4a_2c_23;

/// Runs `cases` inputs of `strategy` through `test` (times `LOWRANK_FUZZ_SCALE`, default 1)
/// and prints the count, which the suite's report quotes.
pub fn run<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let scale = std::env::var("LOWRANK_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let defaults = Config::default();
    let config = Config {
        cases: cases * scale,
        failure_persistence: None,
        // Shrinking a whole-file mutation is quick; bound it all the same.
        max_shrink_iters: 4096,
        rng_seed: match defaults.rng_seed {
            RngSeed::Random => RngSeed::Fixed(FIXED_SEED),
            fixed => fixed,
        },
        ..defaults
    };
    eprintln!("fuzz {name}: {} inputs", config.cases);
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, test) {
        panic!("fuzz {name}: {e}");
    }
}

/// Fails the case unless `cond`.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            $crate::fail!($($msg)+);
        }
    };
}

/// Fails the case.
#[macro_export]
macro_rules! fail {
    ($($msg:tt)+) => {
        return Err(proptest::test_runner::TestCaseError::fail(format!($($msg)+)))
    };
}

/// With `LOWRANK_FUZZ_VERBOSE` set, prints what a case gave (to see how deep the inputs reach).
pub fn verbose(what: &str, message: &str) {
    if std::env::var_os("LOWRANK_FUZZ_VERBOSE").is_some() {
        eprintln!("{what}: {}", message.chars().take(300).collect::<String>());
    }
}

/// A clear error: a message that is not empty and names `names` (a file, a folder, a field...).
pub fn check_error(message: &str, names: &[&str]) -> Result<(), TestCaseError> {
    verbose("error", message);
    ensure!(!message.trim().is_empty(), "empty error message");
    for n in names {
        ensure!(
            message.contains(n),
            "the error does not name {n:?}: {message}"
        );
    }
    Ok(())
}

/// An error about a value of the wrong type in one of our JSON files (`files`) names its field
/// (serde alone gives a line and column), unless the document itself is not an object (`wrong`,
/// from [`wrong_types`], then holds a `<...>` entry).
pub fn check_type_error_names_field(
    message: &str,
    files: &[&str],
    wrong: &[String],
) -> Result<(), TestCaseError> {
    let about_file = files.iter().any(|f| message.contains(f));
    let not_object = wrong.iter().any(|w| w.starts_with('<'));
    let type_error = ["invalid type:", "invalid value:", "invalid length"]
        .iter()
        .any(|t| message.contains(t));
    ensure!(
        !(about_file && type_error) || not_object || message.contains("field `"),
        "a type error that does not name its field: {message}"
    );
    Ok(())
}

/// Every file under `dir` (recursively) with its bytes.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path.clone());
                out.insert(path, Vec::new());
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(path, bytes);
            }
        }
    }
    out
}

/// No file under `dir` was written, removed or added since `before`.
pub fn check_unchanged(
    dir: &Path,
    before: &BTreeMap<PathBuf, Vec<u8>>,
) -> Result<(), TestCaseError> {
    let after = snapshot(dir);
    if &after != before {
        let changed: Vec<_> = after
            .keys()
            .chain(before.keys())
            .filter(|k| after.get(*k) != before.get(*k))
            .collect();
        crate::fail!("files written or removed: {changed:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Byte edits

/// One edit of a file's bytes; positions are fractions of the length at the time of the edit.
#[derive(Debug, Clone)]
pub enum ByteEdit {
    Flip {
        at: Index,
        bit: u8,
    },
    Set {
        at: Index,
        byte: u8,
    },
    Truncate {
        at: Index,
    },
    Delete {
        at: Index,
        len: usize,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    /// Copies `len` bytes of donor file `donor` (from `from`) over the bytes at `at`.
    Splice {
        at: Index,
        donor: Index,
        from: Index,
        len: usize,
    },
}

fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        any::<u8>(),
        prop::sample::select(vec![
            0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'}', b'[', b']', b',', b':', b'\\', b'\n', b'0',
            b'9', b'-', b'e'
        ]),
    ]
}

pub fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| ByteEdit::Flip { at, bit }),
        3 => (any::<Index>(), interesting_byte()).prop_map(|(at, byte)| ByteEdit::Set { at, byte }),
        1 => any::<Index>().prop_map(|at| ByteEdit::Truncate { at }),
        1 => (any::<Index>(), 1usize..64).prop_map(|(at, len)| ByteEdit::Delete { at, len }),
        1 => (any::<Index>(), prop::collection::vec(interesting_byte(), 1..16))
            .prop_map(|(at, bytes)| ByteEdit::Insert { at, bytes }),
        1 => (any::<Index>(), any::<Index>(), any::<Index>(), 1usize..256)
            .prop_map(|(at, donor, from, len)| ByteEdit::Splice { at, donor, from, len }),
    ]
}

pub fn byte_edits(max: usize) -> impl Strategy<Value = Vec<ByteEdit>> {
    prop::collection::vec(byte_edit(), 1..=max)
}

/// Applies `edits` to `bytes[window]` (the rest of the file is kept around it).
pub fn apply_bytes(
    bytes: &[u8],
    window: std::ops::Range<usize>,
    edits: &[ByteEdit],
    donors: &[&[u8]],
) -> Vec<u8> {
    let mut part = bytes[window.clone()].to_vec();
    for e in edits {
        let pos = |at: &Index, len: usize| if len == 0 { 0 } else { at.index(len) };
        match e {
            ByteEdit::Flip { at, bit } if !part.is_empty() => {
                let i = pos(at, part.len());
                part[i] ^= 1 << bit;
            }
            ByteEdit::Set { at, byte } if !part.is_empty() => {
                let i = pos(at, part.len());
                part[i] = *byte;
            }
            ByteEdit::Truncate { at } => {
                let i = pos(at, part.len());
                part.truncate(i);
            }
            ByteEdit::Delete { at, len } => {
                let i = pos(at, part.len());
                let end = (i + len).min(part.len());
                part.drain(i..end);
            }
            ByteEdit::Insert { at, bytes } => {
                let i = pos(at, part.len() + 1);
                part.splice(i..i, bytes.iter().copied());
            }
            ByteEdit::Splice {
                at,
                donor,
                from,
                len,
            } if !donors.is_empty() => {
                let d = donors[donor.index(donors.len())];
                if d.is_empty() {
                    continue;
                }
                let s = pos(from, d.len());
                let piece = &d[s..(s + len).min(d.len())];
                let i = pos(at, part.len() + 1);
                let end = (i + piece.len()).min(part.len());
                part.splice(i..end, piece.iter().copied());
            }
            _ => {}
        }
    }
    let mut out = bytes[..window.start].to_vec();
    out.extend(part);
    out.extend(&bytes[window.end..]);
    out
}

// ---------------------------------------------------------------------------------------------
// JSON edits

#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    Key(String),
    Item(usize),
}

/// Every path in `v`, the root (empty) first, in document order.
pub fn paths(v: &Value) -> Vec<Vec<Seg>> {
    fn walk(v: &Value, here: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
        out.push(here.clone());
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    here.push(Seg::Key(k.clone()));
                    walk(child, here, out);
                    here.pop();
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    here.push(Seg::Item(i));
                    walk(child, here, out);
                    here.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

pub fn at_mut<'a>(v: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let mut cur = v;
    for seg in path {
        cur = match (seg, cur) {
            (Seg::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Seg::Item(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// One edit of a JSON document.
#[derive(Debug, Clone)]
pub enum JsonEdit {
    /// Replaces the value at a path (weighted to the top-level fields: the ones parsers read).
    Replace {
        at: Index,
        top: bool,
        with: Value,
    },
    Remove {
        at: Index,
    },
    /// Adds `key` to an object (or an item to an array).
    Insert {
        at: Index,
        key: String,
        value: Value,
    },
    /// Renames a key (a misspelt field).
    Rename {
        at: Index,
        suffix: String,
    },
    /// Replaces the value at a path with a piece of a donor document.
    Graft {
        at: Index,
        donor: Index,
        from: Index,
    },
}

/// Keys a hostile or sloppy file might use.
pub fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{1,12}",
        prop::sample::select(vec![
            "",
            " ",
            "__proto__",
            "r",
            "peft_type",
            "target_modules",
            "lora_E",
            ".*",
            "(",
            "model.layers.0.self_attn.q_proj",
            "base_model.model.",
            "\u{0}",
            "é",
            "text",
            "prompt",
            "completion",
            "messages",
            "role",
            "content",
            "model",
            "data_offsets",
            "dtype",
            "shape",
            "__metadata__",
        ])
        .prop_map(str::to_string),
    ]
}

pub fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "", " ", "NaN", "nan", "Infinity", "-Infinity", "inf", "-inf", "1e999", "-0", "null",
            "true", "8", "-1", "0x10", "LORA", "ADALORA", "IA3", "lora", "llama", "qwen2",
            "mistral", "silu", "gelu", "none", "all", "all-linear", "nf4", "fp4", "int4",
            "bitsandbytes", "F32", "F16", "BF16", "U8", "I64", "F64", "BOOL", "F8_E4M3",
            "float32", "(", ")", "[", "*", "\\", ".*", "q_proj", "v_proj", "lm_head",
            "embed_tokens", "../../etc/passwd", "/dev/zero", "\u{0}", "\u{feff}", "é", "🦀",
            "{{ x }}", "{% for %}", "user", "assistant", "system", "tool", "*",
        ])
        .prop_map(str::to_string),
        2 => ".{0,24}",
        1 => (1usize..20_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn nasty_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            0i64,
            -1,
            1,
            2,
            3,
            7,
            64,
            255,
            256,
            65_535,
            1 << 31,
            (1 << 32) + 2,
            1 << 53,
            (1 << 53) + 1,
            i64::MAX,
            i64::MIN,
        ])
        .prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        prop::sample::select(vec![
            0.5f64,
            -0.0,
            1e300,
            -1e300,
            1e-300,
            5e-324,
            f64::MAX,
            f64::MIN,
            1e-6,
            3.5,
            -2.5,
            1e19,
            1e20,
        ])
        .prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
    ]
}

/// Values of every JSON type, weighted to the ones parsers trip on.
pub fn nasty_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        3 => nasty_number(),
        3 => nasty_string().prop_map(Value::String),
    ];
    let tree = leaf.clone().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        // Scalars most of the time: a parser's first line of defence is the type of a field.
        8 => leaf,
        4 => tree,
        // Deeper than serde_json's recursion limit (128).
        1 => (1usize..200).prop_map(|depth| {
            (0..depth).fold(Value::Null, |v, _| Value::Array(vec![v]))
        }),
        1 => (0usize..3000).prop_map(|n| Value::Array((0..n as u64).map(Value::from).collect())),
    ]
}

pub fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        6 => (any::<Index>(), any::<bool>(), nasty_value())
            .prop_map(|(at, top, with)| JsonEdit::Replace { at, top, with }),
        2 => any::<Index>().prop_map(|at| JsonEdit::Remove { at }),
        1 => (any::<Index>(), key(), nasty_value())
            .prop_map(|(at, key, value)| JsonEdit::Insert { at, key, value }),
        1 => (any::<Index>(), prop::sample::select(vec!["_", "s", " ", "X"]).prop_map(str::to_string))
            .prop_map(|(at, suffix)| JsonEdit::Rename { at, suffix }),
        1 => (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(at, donor, from)| JsonEdit::Graft { at, donor, from }),
    ]
}

pub fn json_edits(max: usize) -> impl Strategy<Value = Vec<JsonEdit>> {
    prop::collection::vec(json_edit(), 1..=max)
}

/// Applies `edits` to `doc`; `donors` are other documents to graft from.
pub fn apply_json(doc: &Value, edits: &[JsonEdit], donors: &[&Value]) -> Value {
    let mut doc = doc.clone();
    for e in edits {
        let all = paths(&doc);
        match e {
            JsonEdit::Replace { at, top, with } => {
                let top_level: Vec<_> = all.iter().filter(|p| p.len() == 1).collect();
                let path = if *top && !top_level.is_empty() {
                    top_level[at.index(top_level.len())].clone()
                } else {
                    all[at.index(all.len())].clone()
                };
                if let Some(slot) = at_mut(&mut doc, &path) {
                    *slot = with.clone();
                }
            }
            JsonEdit::Remove { at } => {
                let inner: Vec<_> = all.iter().filter(|p| !p.is_empty()).collect();
                if inner.is_empty() {
                    continue;
                }
                let path = inner[at.index(inner.len())];
                let (last, parent) = path.split_last().unwrap();
                match (at_mut(&mut doc, parent), last) {
                    (Some(Value::Object(m)), Seg::Key(k)) => {
                        m.shift_remove(k);
                    }
                    (Some(Value::Array(a)), Seg::Item(i)) => {
                        a.remove(*i);
                    }
                    _ => {}
                }
            }
            JsonEdit::Insert { at, key, value } => {
                let containers: Vec<_> = all
                    .iter()
                    .filter(|p| {
                        matches!(
                            at_mut(&mut doc.clone(), p),
                            Some(Value::Object(_) | Value::Array(_))
                        )
                    })
                    .cloned()
                    .collect();
                if containers.is_empty() {
                    continue;
                }
                match at_mut(&mut doc, &containers[at.index(containers.len())]) {
                    Some(Value::Object(m)) => {
                        m.insert(key.clone(), value.clone());
                    }
                    Some(Value::Array(a)) => a.push(value.clone()),
                    _ => {}
                }
            }
            JsonEdit::Rename { at, suffix } => {
                let keyed: Vec<_> = all
                    .iter()
                    .filter(|p| matches!(p.last(), Some(Seg::Key(_))))
                    .collect();
                if keyed.is_empty() {
                    continue;
                }
                let path = keyed[at.index(keyed.len())];
                let (Seg::Key(k), parent) = path.split_last().unwrap() else {
                    continue;
                };
                if let Some(Value::Object(m)) = at_mut(&mut doc, parent) {
                    if let Some(v) = m.shift_remove(k) {
                        m.insert(format!("{k}{suffix}"), v);
                    }
                }
            }
            JsonEdit::Graft { at, donor, from } => {
                if donors.is_empty() {
                    continue;
                }
                let d = donors[donor.index(donors.len())];
                let dp = paths(d);
                let piece = at_mut(&mut d.clone(), &dp[from.index(dp.len())]).cloned();
                let path = all[at.index(all.len())].clone();
                if let (Some(slot), Some(piece)) = (at_mut(&mut doc, &path), piece) {
                    *slot = piece;
                }
            }
        }
    }
    doc
}

// ---------------------------------------------------------------------------------------------
// The JSON-type oracle

/// A JSON type a field may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Null,
    Bool,
    /// A non-negative integer that fits a u64.
    UInt,
    /// Any number.
    Num,
    Str,
    /// A list of strings.
    Strs,
    /// A list of non-negative integers.
    UInts,
    /// A non-negative integer that fits a u32 (a token id).
    U32,
    U32s,
    Object,
    /// Any list.
    Array,
}

fn has(ty: Ty, v: &Value) -> bool {
    match ty {
        Ty::Null => v.is_null(),
        Ty::Bool => v.is_boolean(),
        Ty::UInt => v.is_u64(),
        Ty::Num => v.is_number(),
        Ty::Str => v.is_string(),
        Ty::Strs => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        Ty::UInts => v.as_array().is_some_and(|a| a.iter().all(Value::is_u64)),
        Ty::U32 => v.as_u64().is_some_and(|x| x <= u64::from(u32::MAX)),
        Ty::U32s => v
            .as_array()
            .is_some_and(|a| a.iter().all(|x| has(Ty::U32, x))),
        Ty::Object => v.is_object(),
        Ty::Array => v.is_array(),
    }
}

/// The fields of `doc` whose value has none of the types `schema` allows them (`a.b` is field
/// `b` of object `a`): each must make the parser fail, and so must a document that is not an
/// object.
pub fn wrong_types(doc: &Value, schema: &[(&str, &[Ty])]) -> Vec<String> {
    if !doc.is_object() {
        return vec!["<document is not an object>".into()];
    }
    schema
        .iter()
        .filter_map(|(field, tys)| {
            let v = field
                .split('.')
                .try_fold(doc, |v, name| v.as_object()?.get(name))?;
            (!tys.iter().any(|t| has(*t, v))).then(|| format!("{field}: {v}"))
        })
        .collect()
}

/// `faults` of a JSON file's bytes, or `<not JSON>` when they do not parse as a JSON value
/// (bad syntax, or nested deeper than serde_json allows), which our config readers refuse too.
pub fn json_faults(bytes: &[u8], faults: impl Fn(&Value) -> Vec<String>) -> Vec<String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => faults(&v),
        Err(_) => vec!["<not JSON>".into()],
    }
}

// ---------------------------------------------------------------------------------------------
// safetensors

/// (header JSON, data) of a safetensors file.
pub fn split_safetensors(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// The length of the header with its 8-byte prefix.
pub fn header_end(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// A safetensors file of `header` (with a correct length prefix) and `data`.
pub fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut text = serde_json::to_vec(header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    out
}

/// How a safetensors file is broken: its bytes, or its header as JSON.
#[derive(Debug, Clone)]
pub enum SafetensorsEdit {
    /// Byte edits within the header (length prefix included).
    HeaderBytes(Vec<ByteEdit>),
    /// Byte edits anywhere in the file.
    Bytes(Vec<ByteEdit>),
    /// JSON edits of the header, written back with a correct length prefix.
    HeaderJson(Vec<JsonEdit>),
}

pub fn safetensors_edit() -> impl Strategy<Value = SafetensorsEdit> {
    prop_oneof![
        2 => byte_edits(4).prop_map(SafetensorsEdit::HeaderBytes),
        1 => byte_edits(4).prop_map(SafetensorsEdit::Bytes),
        4 => json_edits(3).prop_map(SafetensorsEdit::HeaderJson),
    ]
}

pub fn apply_safetensors(bytes: &[u8], edit: &SafetensorsEdit, donors: &[&[u8]]) -> Vec<u8> {
    match edit {
        SafetensorsEdit::HeaderBytes(e) => apply_bytes(bytes, 0..header_end(bytes), e, donors),
        SafetensorsEdit::Bytes(e) => apply_bytes(bytes, 0..bytes.len(), e, donors),
        SafetensorsEdit::HeaderJson(e) => {
            let (header, data) = split_safetensors(bytes);
            let donor_headers: Vec<Value> = donors
                .iter()
                .filter(|d| d.len() >= 8)
                .filter_map(|d| {
                    let n = u64::from_le_bytes(d[..8].try_into().ok()?) as usize;
                    serde_json::from_slice(d.get(8..8 + n)?).ok()
                })
                .collect();
            let refs: Vec<&Value> = donor_headers.iter().collect();
            join_safetensors(&apply_json(&header, e, &refs), &data)
        }
    }
}

/// A safetensors file made from scratch: a header of random entries (any dtype, shape and
/// offsets, some consistent) over `data_len` random bytes.
pub fn generated_safetensors(names: Vec<String>) -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop::sample::select(vec![
        "F32", "F16", "BF16", "F64", "U8", "I8", "I16", "I32", "I64", "U16", "U32", "U64", "BOOL",
        "F8_E4M3", "F8_E5M2", "F4", "E8M0", "X",
    ]);
    let shape = prop::collection::vec(
        prop_oneof![4 => 0usize..12, 1 => Just(usize::MAX / 2), 1 => Just(1usize << 40)],
        0..4,
    );
    let entry = (
        prop::sample::select(names),
        dtype,
        shape,
        any::<bool>(),
        (0usize..4096, 0usize..4096),
    );
    (
        prop::collection::vec(entry, 0..6),
        0usize..4096,
        any::<bool>(),
    )
        .prop_map(|(entries, data_len, metadata)| {
            let mut header = Map::new();
            let mut offset = 0usize;
            for (name, dtype, shape, consistent, (a, b)) in entries {
                let size = dtype_size(dtype);
                let bytes = shape
                    .iter()
                    .try_fold(size, |acc: usize, d| acc.checked_mul(*d))
                    .unwrap_or(usize::MAX);
                let offsets = if consistent && bytes < 4096 {
                    let o = [offset, offset + bytes];
                    offset += bytes;
                    o
                } else {
                    [a, b]
                };
                header.insert(
                    name,
                    serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets}),
                );
            }
            if metadata {
                header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
            }
            let data: Vec<u8> = (0..data_len.max(offset))
                .map(|i| (i * 131 % 251) as u8)
                .collect();
            join_safetensors(&Value::Object(header), &data)
        })
}

/// One tensor of a safetensors file, as stored.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// The tensors of a well-formed safetensors file (in file order) and its metadata.
pub fn parse_tensors(bytes: &[u8]) -> (Vec<StoredTensor>, Option<Value>) {
    let (header, data) = split_safetensors(bytes);
    let mut metadata = None;
    let mut tensors = Vec::new();
    for (name, entry) in header.as_object().unwrap() {
        if name == "__metadata__" {
            metadata = Some(entry.clone());
            continue;
        }
        let [start, end] = [0, 1].map(|i| entry["data_offsets"][i].as_u64().unwrap() as usize);
        tensors.push(StoredTensor {
            name: name.clone(),
            dtype: entry["dtype"].as_str().unwrap().to_string(),
            shape: serde_json::from_value(entry["shape"].clone()).unwrap(),
            data: data[start..end].to_vec(),
        });
    }
    (tensors, metadata)
}

/// A safetensors file of `tensors`, laid out in order.
pub fn build_tensors(tensors: &[StoredTensor], metadata: Option<&Value>) -> Vec<u8> {
    let mut header = Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), m.clone());
    }
    let mut data = Vec::new();
    for t in tensors {
        let start = data.len();
        data.extend(&t.data);
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, data.len()]}),
        );
    }
    join_safetensors(&Value::Object(header), &data)
}

/// Bytes per element (one for the sub-byte and unknown dtypes, which is all the fuzz needs).
fn dtype_size(dtype: &str) -> usize {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

/// `shape` with its first dimension set so it holds `elements` values (trailing dimensions
/// kept when they divide), and the element count it then holds.
fn fit_shape(shape: &[usize], elements: usize) -> (Vec<usize>, usize) {
    let rest: usize = shape.iter().skip(1).product();
    if shape.len() > 1 && rest > 0 {
        let first = elements / rest;
        let mut s = shape.to_vec();
        s[0] = first;
        (s, first * rest)
    } else {
        (vec![elements], elements)
    }
}

/// A structure-aware edit of a safetensors file: its tensors stay well-formed for the
/// safetensors reader, so the checks behind it (names, dtypes, shapes, 4-bit metadata) are hit.
#[derive(Debug, Clone)]
pub enum TensorEdit {
    Drop {
        at: Index,
    },
    /// Renames a tensor after another one (a duplicate) or with a suffix.
    Rename {
        at: Index,
        like: Option<Index>,
        suffix: String,
    },
    /// Keeps `keep` (a fraction of up to twice its elements) values, fixing the shape.
    Resize {
        at: Index,
        keep: Index,
    },
    /// Reinterprets the bytes as another dtype.
    Retype {
        at: Index,
        dtype: String,
    },
    /// Transposes or flattens the shape.
    Reshape {
        at: Index,
        flatten: bool,
    },
    /// Takes another tensor's dtype, shape and data.
    CopyFrom {
        at: Index,
        from: Index,
    },
    /// Byte edits within the data (the shape follows the length).
    DataBytes {
        at: Index,
        edits: Vec<ByteEdit>,
    },
    /// JSON edits of a tensor that holds JSON (bitsandbytes' `quant_state` blobs); any tensor
    /// when none does.
    JsonBlob {
        at: Index,
        edits: Vec<JsonEdit>,
    },
}

pub fn tensor_edit() -> impl Strategy<Value = TensorEdit> {
    let dtype = prop::sample::select(vec![
        "F32", "F16", "BF16", "U8", "I64", "F64", "BOOL", "I8", "F8_E4M3", "U32",
    ])
    .prop_map(str::to_string);
    prop_oneof![
        1 => any::<Index>().prop_map(|at| TensorEdit::Drop { at }),
        1 => (any::<Index>(), prop::option::of(any::<Index>()), prop::sample::select(vec![".x", "_", ".weight", ".absmax"]))
            .prop_map(|(at, like, s)| TensorEdit::Rename { at, like, suffix: s.to_string() }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(at, keep)| TensorEdit::Resize { at, keep }),
        1 => (any::<Index>(), dtype).prop_map(|(at, dtype)| TensorEdit::Retype { at, dtype }),
        1 => (any::<Index>(), any::<bool>()).prop_map(|(at, flatten)| TensorEdit::Reshape { at, flatten }),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(at, from)| TensorEdit::CopyFrom { at, from }),
        1 => (any::<Index>(), byte_edits(3)).prop_map(|(at, edits)| TensorEdit::DataBytes { at, edits }),
        3 => (any::<Index>(), json_edits(3)).prop_map(|(at, edits)| TensorEdit::JsonBlob { at, edits }),
    ]
}

pub fn apply_tensor_edits(tensors: &mut Vec<StoredTensor>, edits: &[TensorEdit]) {
    for e in edits {
        if tensors.is_empty() {
            return;
        }
        let n = tensors.len();
        match e {
            TensorEdit::Drop { at } => {
                tensors.remove(at.index(n));
            }
            TensorEdit::Rename { at, like, suffix } => {
                let name = match like {
                    Some(l) => tensors[l.index(n)].name.clone(),
                    None => format!("{}{suffix}", tensors[at.index(n)].name),
                };
                tensors[at.index(n)].name = name;
                // A file holds each name once: the renamed tensor replaces the other.
                let keep = at.index(n);
                dedup_names(tensors, keep);
            }
            TensorEdit::Resize { at, keep } => {
                let t = &mut tensors[at.index(n)];
                let size = dtype_size(&t.dtype);
                let elements = t.data.len() / size;
                let (shape, fitted) = fit_shape(&t.shape, keep.index(2 * elements + 2));
                let mut data: Vec<u8> =
                    t.data.iter().copied().cycle().take(fitted * size).collect();
                if t.data.is_empty() {
                    data = vec![0; fitted * size];
                }
                t.shape = shape;
                t.data = data;
            }
            TensorEdit::Retype { at, dtype } => {
                let t = &mut tensors[at.index(n)];
                let size = dtype_size(dtype);
                let (shape, fitted) = fit_shape(&t.shape, t.data.len() / size);
                t.data.truncate(fitted * size);
                t.shape = shape;
                t.dtype = dtype.clone();
            }
            TensorEdit::Reshape { at, flatten } => {
                let t = &mut tensors[at.index(n)];
                if *flatten {
                    t.shape = vec![t.shape.iter().product()];
                } else {
                    t.shape.reverse();
                }
            }
            TensorEdit::CopyFrom { at, from } => {
                let src = tensors[from.index(n)].clone();
                let t = &mut tensors[at.index(n)];
                t.dtype = src.dtype;
                t.shape = src.shape;
                t.data = src.data;
            }
            TensorEdit::DataBytes { at, edits } => {
                let t = &mut tensors[at.index(n)];
                let data = apply_bytes(&t.data, 0..t.data.len(), edits, &[]);
                let size = dtype_size(&t.dtype);
                let (shape, fitted) = fit_shape(&t.shape, data.len() / size);
                t.data = data[..fitted * size].to_vec();
                t.shape = shape;
            }
            TensorEdit::JsonBlob { at, edits } => {
                let blobs: Vec<usize> = (0..n)
                    .filter(|&i| serde_json::from_slice::<Value>(&tensors[i].data).is_ok())
                    .collect();
                let i = if blobs.is_empty() {
                    at.index(n)
                } else {
                    blobs[at.index(blobs.len())]
                };
                let t = &mut tensors[i];
                let doc = serde_json::from_slice(&t.data).unwrap_or(Value::Null);
                t.data = serde_json::to_vec(&apply_json(&doc, edits, &[])).unwrap();
                t.dtype = "U8".into();
                t.shape = vec![t.data.len()];
            }
        }
    }
}

/// Removes the tensors other than `keep` that share its name.
fn dedup_names(tensors: &mut Vec<StoredTensor>, keep: usize) {
    let name = tensors[keep].name.clone();
    let mut i = 0;
    tensors.retain(|t| {
        i += 1;
        i - 1 == keep || t.name != name
    });
}
