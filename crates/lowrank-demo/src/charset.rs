//! A character-level tokenizer built without files or network, saved in Hugging Face's format
//! (`tokenizer.json` + `tokenizer_config.json`) so `lowrank`, `tokenizers` and transformers'
//! `AutoTokenizer` all load it.
//!
//! Model: WordLevel over single characters; pre-tokenizer: a regex split isolating every
//! character; decoder: Fuse (concatenate); post-processor: BOS before every sequence.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

pub const UNK: &str = "<unk>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
/// Ids 0, 1, 2, as in Llama 2 tokenizers.
pub const SPECIALS: [&str; 3] = [UNK, BOS, EOS];

/// Every character the tokenizer knows, in id order after the special tokens.
pub fn characters() -> Vec<char> {
    let mut chars = vec![' '];
    chars.extend('a'..='z');
    chars.extend('0'..='9');
    chars.extend(".,:;=+-?!'()".chars());
    chars
}

/// Number of tokens: special tokens and characters.
pub fn vocab_size() -> usize {
    SPECIALS.len() + characters().len()
}

/// The `tokenizer.json` document.
pub fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for (i, c) in characters().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(SPECIALS.len() + i));
    }
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [1], "tokens": [BOS]}}
        },
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK}
    })
}

/// The `tokenizer_config.json` document (transformers' special tokens; no chat template).
pub fn tokenizer_config_json() -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "add_bos_token": true,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1024
    })
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `dir`.
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    lowrank_core::files::write_json(&dir.join("tokenizer.json"), &tokenizer_json())?;
    lowrank_core::files::write_json(&dir.join("tokenizer_config.json"), &tokenizer_config_json())?;
    lowrank_core::files::write_json(
        &dir.join("special_tokens_map.json"),
        &json!({"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_hf_files() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer(dir.path()).unwrap();
        let tok = lowrank_models::Tokenizer::load(dir.path()).unwrap();
        assert_eq!(tok.vocab_size(), vocab_size());
        assert_eq!(tok.eos_token_id(), Some(2));
        let text = "reverse: lamp = pmal, 47+85 (ok)? yes!";
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids[0], 1, "BOS first");
        assert_eq!(
            ids.len(),
            text.chars().count() + 1,
            "one token per character"
        );
        assert!(!ids.contains(&0), "no unknown characters");
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        assert_eq!(
            tok.encode(" ab", false).unwrap(),
            vec![3, 4, 5],
            "spaces are tokens"
        );
        let with_eos: Vec<u32> = ids.iter().copied().chain([2]).collect();
        assert_eq!(
            tok.decode(&with_eos, false).unwrap(),
            format!("<s>{text}</s>")
        );
        // Special tokens in text are recognized as such.
        assert_eq!(tok.encode("a</s>", false).unwrap(), vec![4, 2]);
        assert_eq!(
            tok.encode("A", false).unwrap(),
            vec![0],
            "outside the alphabet is <unk>"
        );
    }
}
