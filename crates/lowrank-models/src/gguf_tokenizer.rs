//! The tokenizer a GGUF file describes (`tokenizer.ggml.*` metadata), built as the
//! `tokenizer.json` the original Hugging Face tokenizer had, so token ids are the HF ones.
//!
//! `tokenizer.ggml.model` "gpt2" (byte-level BPE): tokens, merges, token types (control and
//! user-defined tokens become added tokens), BOS/EOS ids and add-BOS/EOS flags, and the
//! pre-tokenizer named by `tokenizer.ggml.pre`, looked up in [`PRE_TOKENIZERS`] (adding one is
//! a row there).
//!
//! `tokenizer.ggml.model` "llama" (SentencePiece BPE with byte fallback, as Llama and Gemma
//! ship it): built as the tokenizer.json transformers converts `tokenizer.model` into — a BPE
//! with byte fallback over the pieces, whose merges transformers derives from the vocabulary
//! (`generate_merges`: every split of a piece into two pieces, ranked by the piece's id), a
//! Metaspace pre-tokenizer (`▁` for spaces, prepended to the text unless
//! `tokenizer.ggml.add_space_prefix` is false, as Gemma's). llama.cpp's own SPM tokenizer
//! merges by score instead; for BPE-trained pieces (score = -id) the two agree, and it is
//! transformers' ids that are reproduced. Unknown (type 2), control and user-defined tokens
//! are added tokens, as in the HF tokenizer; `[PADn]` fillers (unused) are left out.

use lowrank_core::{Error, Result};
use lowrank_gguf::{GgufFile, Value as GgufValue};
use serde_json::{json, Value};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: u64 = 2;
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How the HF tokenizer behind a `tokenizer.ggml.pre` value splits and normalizes text.
pub struct PreTokenizer {
    /// `tokenizer.ggml.pre`.
    pub name: &'static str,
    /// The Split regex before byte-level encoding; None for GPT-2's own (`ByteLevel(use_regex)`).
    pub regex: Option<&'static str>,
    /// Unicode NFC before splitting (Qwen2's tokenizer).
    pub nfc: bool,
    /// BPE `ignore_merges`: whole words in the vocabulary are taken as they are (Llama 3).
    pub ignore_merges: bool,
}

pub const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        name: "gpt-2",
        regex: None,
        nfc: false,
        ignore_merges: false,
    },
    PreTokenizer {
        name: "qwen2",
        regex: Some(QWEN2_REGEX),
        nfc: true,
        ignore_merges: false,
    },
    PreTokenizer {
        name: "llama-bpe",
        regex: Some(LLAMA3_REGEX),
        nfc: false,
        ignore_merges: true,
    },
];

/// What [`crate::Tokenizer`] needs from a GGUF file.
pub struct GgufTokenizer {
    pub tokenizer_json: Value,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
    pub chat_template: Option<String>,
}

/// Builds the tokenizer described by `file`'s metadata.
pub fn from_gguf(file: &GgufFile) -> Result<GgufTokenizer> {
    let path = file.path();
    let model = file.str("tokenizer.ggml.model")?;
    if model != "gpt2" && model != "llama" {
        return Err(Error::field(
            path,
            "tokenizer.ggml.model",
            format!("tokenizer model {model:?} is not supported from GGUF; supported: gpt2 (byte-level BPE), llama (SentencePiece BPE)"),
        ));
    }
    let sentencepiece = model == "llama";
    // SentencePiece has no pre-tokenizer name (the converter writes "default").
    let pre = if sentencepiece {
        &PRE_TOKENIZERS[0]
    } else {
        pre_tokenizer_of(file)?
    };
    let tokens = file
        .strings_opt("tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::field(path, "tokenizer.ggml.tokens", "missing"))?;
    let merges = match file.strings_opt("tokenizer.ggml.merges")? {
        Some(merges) => merges.into_iter().map(str::to_string).collect(),
        None if sentencepiece => Vec::new(),
        None => return Err(Error::field(path, "tokenizer.ggml.merges", "missing")),
    };
    let types = token_types(file, tokens.len())?;
    let special = SpecialTokens::read(file, &tokens)?;
    let added_tokens = added_tokens(&tokens, &types, sentencepiece);
    let (single, pair, special_tokens) = special.template();
    let tokenizer_json = if sentencepiece {
        let add_space_prefix = file
            .bool_opt("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true);
        let template = json!({"type": "TemplateProcessing", "single": single, "pair": pair,
                              "special_tokens": special_tokens});
        sentencepiece_json(&tokens, &types, added_tokens, template, add_space_prefix)
    } else {
        let byte_level_post = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
        // A template only when it adds a token (as the HF tokenizers have it: a template is
        // what tells gguf-py to write `add_sep_token` when the file is written back).
        let post_processor = if special_tokens.is_empty() {
            byte_level_post
        } else {
            json!({"type": "Sequence", "processors": [
                byte_level_post,
                {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens},
            ]})
        };
        byte_level_json(pre, &tokens, merges, added_tokens, post_processor)
    };
    Ok(GgufTokenizer {
        tokenizer_json,
        bos_token: special.bos.map(|(_, t)| t),
        eos_token: special.eos.map(|(_, t)| t),
        unk_token: special.unk.map(|(_, t)| t),
        pad_token: special.pad.map(|(_, t)| t),
        chat_template: file.str_opt("tokenizer.chat_template")?.map(str::to_string),
    })
}

/// The byte-level BPE's pre-tokenizer, named by `tokenizer.ggml.pre`.
fn pre_tokenizer_of(file: &GgufFile) -> Result<&'static PreTokenizer> {
    let pre_name = file.str_opt("tokenizer.ggml.pre")?.unwrap_or("gpt-2");
    PRE_TOKENIZERS
        .iter()
        .find(|p| p.name == pre_name)
        .ok_or_else(|| {
            Error::field(
                file.path(),
                "tokenizer.ggml.pre",
                format!(
                    "pre-tokenizer {pre_name:?} is not supported; supported: {}",
                    PRE_TOKENIZERS
                        .iter()
                        .map(|p| p.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
}

/// `tokenizer.ggml.token_type`, one per token (all normal when missing).
fn token_types(file: &GgufFile, count: usize) -> Result<Vec<u64>> {
    match file.array_opt("tokenizer.ggml.token_type")? {
        None => Ok(vec![1; count]),
        Some(items) => items
            .iter()
            .map(GgufValue::as_u64)
            .collect::<Option<Vec<_>>>()
            .filter(|t| t.len() == count)
            .ok_or_else(|| {
                Error::field(
                    file.path(),
                    "tokenizer.ggml.token_type",
                    format!("expected {count} integers, one per token"),
                )
            }),
    }
}

/// The special tokens (id and text) and whether BOS/EOS are added to each encoding.
struct SpecialTokens {
    bos: Option<(u64, String)>,
    eos: Option<(u64, String)>,
    unk: Option<(u64, String)>,
    pad: Option<(u64, String)>,
    add_bos: bool,
    add_eos: bool,
}

impl SpecialTokens {
    fn read(file: &GgufFile, tokens: &[&str]) -> Result<Self> {
        let token_of = |key: &str| -> Result<Option<(u64, String)>> {
            match file.u64_opt(key)? {
                None => Ok(None),
                Some(id) => tokens
                    .get(id as usize)
                    .map(|t| Some((id, t.to_string())))
                    .ok_or_else(|| {
                        Error::field(
                            file.path(),
                            key,
                            format!("token id {id} is past the {} tokens", tokens.len()),
                        )
                    }),
            }
        };
        let flag = |key: &str| -> Result<bool> { Ok(file.bool_opt(key)?.unwrap_or(false)) };
        Ok(SpecialTokens {
            bos: token_of("tokenizer.ggml.bos_token_id")?,
            eos: token_of("tokenizer.ggml.eos_token_id")?,
            unk: token_of("tokenizer.ggml.unknown_token_id")?,
            pad: token_of("tokenizer.ggml.padding_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token")?,
            add_eos: flag("tokenizer.ggml.add_eos_token")?,
        })
    }

    /// The `TemplateProcessing` parts that add BOS/EOS: single, pair and special tokens.
    fn template(&self) -> (Vec<Value>, Vec<Value>, serde_json::Map<String, Value>) {
        let mut single = Vec::new();
        let mut special_tokens = serde_json::Map::new();
        for (add, token) in [
            (self.add_bos, &self.bos),
            (true, &None),
            (self.add_eos, &self.eos),
        ] {
            match token {
                None if add => single.push(json!({"Sequence": {"id": "A", "type_id": 0}})),
                Some((id, text)) if add => {
                    single.push(json!({"SpecialToken": {"id": text, "type_id": 0}}));
                    special_tokens.insert(
                        text.clone(),
                        json!({"id": text, "ids": [id], "tokens": [text]}),
                    );
                }
                _ => {}
            }
        }
        let mut pair = single.clone();
        pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
        (single, pair, special_tokens)
    }
}

/// Control and user-defined tokens (and SentencePiece's unknown token) as HF added tokens.
fn added_tokens(tokens: &[&str], types: &[u64], sentencepiece: bool) -> Vec<Value> {
    let added_types: &[u64] = if sentencepiece {
        &[
            TOKEN_TYPE_UNKNOWN,
            TOKEN_TYPE_CONTROL,
            TOKEN_TYPE_USER_DEFINED,
        ]
    } else {
        &[TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED]
    };
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, t))| added_types.contains(t))
        .map(|(id, (content, &t))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t != TOKEN_TYPE_USER_DEFINED})
        })
        .collect()
}

/// The tokenizer.json of a byte-level BPE (GPT-2, Qwen2, Llama 3 style).
fn byte_level_json(
    pre: &PreTokenizer,
    tokens: &[&str],
    merges: Vec<String>,
    added_tokens: Vec<Value>,
    post_processor: Value,
) -> Value {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.to_string(), id.into()))
        .collect();
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": use_regex, "use_regex": use_regex});
    let pre_tokenizer = match pre.regex {
        None => byte_level(true),
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]}),
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": if pre.nfc { json!({"type": "NFC"}) } else { Value::Null },
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": pre.ignore_merges, "vocab": vocab, "merges": merges,
        },
    })
}

/// The tokenizer.json transformers makes of a SentencePiece BPE model (its `LlamaConverter`
/// output in transformers 5): the pieces (not the `[PADn]` fillers) as a byte-fallback BPE
/// whose merges `generate_merges` derives from them, a Metaspace pre-tokenizer and the
/// matching decoder.
fn sentencepiece_json(
    tokens: &[&str],
    types: &[u64],
    added_tokens: Vec<Value>,
    post_processor: Value,
    add_space_prefix: bool,
) -> Value {
    let pieces: Vec<(usize, &str)> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &t))| t != TOKEN_TYPE_UNUSED)
        .map(|(id, (&piece, _))| (id, piece))
        .collect();
    // Python's dict: a piece seen twice keeps its last id.
    let ids: std::collections::HashMap<&str, usize> =
        pieces.iter().map(|&(id, piece)| (piece, id)).collect();
    // generate_merges without scores: pieces in id order; within a piece, its splits by the
    // left part's length (its sort key after the piece's rank).
    let mut merges = Vec::new();
    for &(id, piece) in &pieces {
        if ids.get(piece) != Some(&id) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if ids.contains_key(left) && ids.contains_key(right) {
                merges.push(json!([left, right]));
            }
        }
    }
    let vocab: serde_json::Map<String, Value> = ids
        .iter()
        .map(|(&piece, &id)| (piece.to_string(), id.into()))
        .collect();
    let prepend_scheme = if add_space_prefix { "first" } else { "never" };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}",
                          "prepend_scheme": prepend_scheme, "split": false},
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    })
}

/// `tokenizer.ggml.token_type` of tokens the vocabulary lacks (ids past the tokenizer's own).
const TOKEN_TYPE_NORMAL: u64 = 1;
const TOKEN_TYPE_UNUSED: u64 = 5;

/// Added tokens convert_hf_to_gguf.py marks as control tokens although the tokenizer does not
/// call them special (its `does_token_look_special`).
fn looks_special(token: &str) -> bool {
    ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&token)
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// The `tokenizer.*` metadata convert_hf_to_gguf.py writes for a byte-level BPE tokenizer
/// (`vocab_size` tokens, as the model's embedding has), the inverse of [`from_gguf`].
pub fn to_gguf_metadata(
    tokenizer: &crate::Tokenizer,
    vocab_size: usize,
    config: &crate::ModelConfig,
) -> Result<Vec<(String, GgufValue)>> {
    let json = tokenizer.hf_json()?;
    let unsupported = |what: String| {
        Error::Msg(format!(
            "the tokenizer cannot be written to GGUF: {what}; supported: byte-level BPE with the pre-tokenizers {}",
            PRE_TOKENIZERS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
        ))
    };
    let model = &json["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        return Err(unsupported(format!("model type {}", model["type"])));
    }
    let pre = &json["pre_tokenizer"];
    let byte_level = |v: &Value, regex: bool| v["type"] == "ByteLevel" && v["use_regex"] == regex;
    let pre_name = if byte_level(pre, true) {
        "gpt-2"
    } else {
        let steps = pre["pretokenizers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let regex = match steps {
            [split, bl] if split["type"] == "Split" && byte_level(bl, false) => {
                split["pattern"]["Regex"].as_str()
            }
            _ => None,
        };
        PRE_TOKENIZERS
            .iter()
            .find(|p| p.regex.is_some() && p.regex == regex)
            .ok_or_else(|| unsupported(format!("pre-tokenizer {pre}")))?
            .name
    };
    let mut tokens: Vec<Option<(String, u64)>> = vec![None; vocab_size];
    for (token, id) in model["vocab"].as_object().into_iter().flatten() {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = Some((token.clone(), TOKEN_TYPE_NORMAL));
        }
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        if let Some(slot) = tokens.get_mut(id as usize) {
            let special = added["special"] == true || looks_special(content);
            let kind = if special {
                TOKEN_TYPE_CONTROL
            } else {
                TOKEN_TYPE_USER_DEFINED
            };
            *slot = Some((content.to_string(), kind));
        }
    }
    let (names, types): (Vec<GgufValue>, Vec<GgufValue>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let (name, kind) = t.unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_TYPE_UNUSED));
            (GgufValue::String(name), GgufValue::I32(kind as i32))
        })
        .unzip();
    let merges: Vec<GgufValue> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::Array(pair) => pair
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
            other => other.as_str().unwrap_or_default().to_string(),
        })
        .map(GgufValue::String)
        .collect();
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            GgufValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            GgufValue::String(pre_name.into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), GgufValue::Array(names)),
        (
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array(types),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            GgufValue::Array(merges),
        ),
    ];
    // Special tokens of tokenizer_config.json, else config.json's ids (gguf-py's SpecialVocab).
    let [bos, eos, unk, pad] = tokenizer
        .special_tokens()
        .map(|t| t.and_then(|t| tokenizer.token_id(t)));
    let ids = [
        ("bos_token_id", bos.or(config.bos_token_id)),
        (
            "eos_token_id",
            eos.or(config.eos_token_ids.first().copied()),
        ),
        ("unknown_token_id", unk),
        ("padding_token_id", pad),
    ];
    for (key, id) in ids {
        if let Some(id) = id {
            out.push((format!("tokenizer.ggml.{key}"), GgufValue::U32(id)));
        }
    }
    // Whether encoding adds BOS / EOS around the text.
    let with = tokenizer.encode("a", true)?;
    let without = tokenizer.encode("a", false)?;
    let at = with
        .windows(without.len())
        .position(|w| w == without)
        .unwrap_or(0);
    let add_bos = bos.is_some_and(|b| with[..at].contains(&b));
    let add_eos = eos.is_some_and(|e| with[at + without.len()..].contains(&e));
    out.push((
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(add_bos),
    ));
    out.push((
        "tokenizer.ggml.add_eos_token".into(),
        GgufValue::Bool(add_eos),
    ));
    // gguf-py's SpecialVocab writes add_sep_token whenever the post-processor has a template;
    // these tokenizers have no separator.
    let post = &json["post_processor"];
    let templated = post["type"] == "TemplateProcessing"
        || post["processors"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["type"] == "TemplateProcessing");
    if templated {
        out.push((
            "tokenizer.ggml.add_sep_token".into(),
            GgufValue::Bool(false),
        ));
    }
    if let Some(template) = tokenizer.chat_template() {
        out.push((
            "tokenizer.chat_template".into(),
            GgufValue::String(template.into()),
        ));
    }
    Ok(out)
}
