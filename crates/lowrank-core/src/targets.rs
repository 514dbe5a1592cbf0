//! Which modules an adapter applies to, matched exactly as PEFT's `check_target_module_exists`
//! and `get_pattern_key` do, so an adapter config means the same thing in both tools.
//!
//! Module keys are the base model's module names, e.g. `model.layers.0.self_attn.q_proj`.

use regex::Regex;
use serde::{Deserialize, Serialize};

/// PEFT's `target_modules` / `exclude_modules`: a list of names (exact name or `.`-suffix match)
/// or one regular expression that must match the whole key.
#[derive(Debug, Clone)]
pub enum ModuleSelector {
    Names(Vec<String>),
    /// Kept with its source text for writing back.
    Regex(String, Regex),
}

/// The JSON form: a list of strings or a single string.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ModuleSelectorWire {
    Names(Vec<String>),
    Pattern(String),
}

impl ModuleSelector {
    /// A full-match regex; `Err` carries the regex error text.
    pub fn regex(pattern: &str) -> Result<Self, String> {
        let anchored = format!("^(?:{pattern})$");
        Regex::new(&anchored)
            .map(|re| ModuleSelector::Regex(pattern.to_string(), re))
            .map_err(|e| e.to_string())
    }

    pub fn from_wire(wire: &ModuleSelectorWire) -> Result<Self, String> {
        match wire {
            ModuleSelectorWire::Names(names) => Ok(ModuleSelector::Names(names.clone())),
            ModuleSelectorWire::Pattern(p) => Self::regex(p),
        }
    }

    pub fn to_wire(&self) -> ModuleSelectorWire {
        match self {
            ModuleSelector::Names(names) => ModuleSelectorWire::Names(names.clone()),
            ModuleSelector::Regex(src, _) => ModuleSelectorWire::Pattern(src.clone()),
        }
    }

    /// Whether `key` is selected, without the layer filter (which PEFT applies to lists only).
    pub fn selects(&self, key: &str) -> bool {
        match self {
            ModuleSelector::Names(names) => names
                .iter()
                .any(|n| key == n || key.ends_with(&format!(".{n}"))),
            ModuleSelector::Regex(_, re) => re.is_match(key),
        }
    }
}

/// The layer index of a key as PEFT finds it: the first `.<name>.<digits>.` segment, or the one
/// after one of `layers_pattern` when given.
pub fn layer_index(key: &str, layers_pattern: &[String]) -> Option<usize> {
    let parts: Vec<&str> = key.split('.').collect();
    // A number followed by at least one more segment, after a named segment (PEFT: `.*?\.[^.]*\.(\d+)\.`).
    (2..parts.len()).find_map(|i| {
        let is_index = i + 1 < parts.len()
            && !parts[i].is_empty()
            && parts[i].bytes().all(|b| b.is_ascii_digit());
        let named_ok =
            layers_pattern.is_empty() || layers_pattern.iter().any(|p| p == parts[i - 1]);
        (is_index && named_ok)
            .then(|| parts[i].parse().ok())
            .flatten()
    })
}

/// PEFT's `get_pattern_key`: the first pattern key `k` (in file order) with `(.*\.)?(k)$`
/// matching `key` from its start.
pub fn pattern_value<'a, T>(patterns: &'a [(String, T)], key: &str) -> Option<&'a T> {
    patterns.iter().find_map(|(pattern, value)| {
        let re = Regex::new(&format!("^(?:.*\\.)?(?:{pattern})$")).ok()?;
        re.is_match(key).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q0: &str = "model.layers.0.self_attn.q_proj";
    const Q1: &str = "model.layers.1.self_attn.q_proj";

    #[test]
    fn names_match_exactly_or_by_dotted_suffix() {
        let s = ModuleSelector::Names(vec!["q_proj".into(), "mlp.down_proj".into()]);
        assert!(s.selects(Q0));
        assert!(s.selects("model.layers.3.mlp.down_proj"));
        assert!(!s.selects("model.layers.0.self_attn.xq_proj"));
        assert!(!s.selects("model.layers.0.mlp.up_proj"));
        let exact = ModuleSelector::Names(vec![Q0.into()]);
        assert!(exact.selects(Q0) && !exact.selects(Q1));
    }

    #[test]
    fn a_string_is_a_full_match_regex() {
        let s = ModuleSelector::regex(r".*\.layers\.1\.self_attn\.(q|k)_proj").unwrap();
        assert!(s.selects(Q1));
        assert!(!s.selects(Q0));
        // Full match: a prefix match is not enough.
        assert!(!ModuleSelector::regex("model").unwrap().selects(Q0));
        assert!(ModuleSelector::regex("(").is_err());
    }

    #[test]
    fn layer_index_is_the_first_numbered_segment() {
        assert_eq!(layer_index(Q1, &[]), Some(1));
        assert_eq!(
            layer_index("model.layers.12.block_sparse_moe.experts.3.w1", &[]),
            Some(12)
        );
        assert_eq!(layer_index("lm_head", &[]), None);
        assert_eq!(
            layer_index("model.h.4.attn.c_attn", &["layers".into()]),
            None
        );
        assert_eq!(layer_index("model.h.4.attn.c_attn", &["h".into()]), Some(4));
    }

    #[test]
    fn pattern_keys_match_like_peft_in_order() {
        let patterns = vec![
            ("model.layers.1.mlp.down_proj".to_string(), 6usize),
            ("q_proj".to_string(), 2),
            (r"layers\.\d+\.mlp\..*".to_string(), 9),
        ];
        assert_eq!(pattern_value(&patterns, Q0), Some(&2));
        assert_eq!(
            pattern_value(&patterns, "model.layers.1.mlp.down_proj"),
            Some(&6)
        );
        assert_eq!(
            pattern_value(&patterns, "model.layers.0.mlp.down_proj"),
            Some(&9)
        );
        assert_eq!(
            pattern_value(&patterns, "model.layers.0.self_attn.v_proj"),
            None
        );
        // `(.*\.)?` means a pattern never matches in the middle of a segment.
        assert_eq!(
            pattern_value(&patterns, "model.layers.0.self_attn.xq_proj"),
            None
        );
    }
}
