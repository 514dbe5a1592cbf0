//! Training data: JSONL formats, tokenization with loss masks, epoch order, batches (padded or
//! packed) and the eval split.
//!
//! Formats, detected per file from its first line and required of every line:
//! - `{"text": ...}`: loss on every token;
//! - `{"prompt": ..., "completion": ...}`: loss on the completion tokens (and EOS) only;
//! - `{"messages": [{"role", "content"}, ...]}`: rendered with the model's chat template, loss
//!   on the assistant turns only (their content and the template's end-of-turn marker).

use std::path::Path;

use candle_core::{Device, Tensor};
use lowrank_core::{Error, Result};
use lowrank_models::{Message, Tokenizer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

/// A JSONL data format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    PromptCompletion,
    Messages,
}

impl Format {
    pub fn as_str(&self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::PromptCompletion => "prompt/completion",
            Format::Messages => "messages",
        }
    }
}

/// One tokenized sequence. `targets[t]`: token t (t ≥ 1) is predicted and counted in the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub targets: Vec<bool>,
}

impl Example {
    /// Tokens that count in the loss.
    pub fn loss_tokens(&self) -> usize {
        self.targets.iter().skip(1).filter(|&&t| t).count()
    }

    fn truncate(&mut self, max_len: usize) {
        self.ids.truncate(max_len);
        self.targets.truncate(max_len);
    }
}

/// The format a JSON object has, from its keys.
pub fn detect(value: &Value) -> Option<Format> {
    let obj = value.as_object()?;
    if obj.contains_key("messages") {
        Some(Format::Messages)
    } else if obj.contains_key("prompt") && obj.contains_key("completion") {
        Some(Format::PromptCompletion)
    } else if obj.contains_key("text") {
        Some(Format::Text)
    } else {
        None
    }
}

fn str_field<'a>(value: &'a Value, field: &str) -> std::result::Result<&'a str, String> {
    match value.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("field \"{field}\" must be a string, found {other}")),
        None => Err(format!("missing field \"{field}\"")),
    }
}

/// Tokenizes one record of `format`; the error text is prefixed with file:line by the caller.
pub fn tokenize(
    format: Format,
    value: &Value,
    tokenizer: &Tokenizer,
) -> std::result::Result<Example, String> {
    tokenize_truncated(format, value, tokenizer, usize::MAX)
}

/// [`tokenize`] truncated to the first `max_len` tokens, tokenizing only the part of a long
/// text those need (the same ids and targets as tokenizing it whole, then truncating).
pub fn tokenize_truncated(
    format: Format,
    value: &Value,
    tokenizer: &Tokenizer,
    max_len: usize,
) -> std::result::Result<Example, String> {
    let encode = |text: &str, special: bool, max: usize| {
        tokenizer
            .encode_truncated(text, special, max)
            .map_err(|e| e.to_string())
    };
    let mut ex = match format {
        Format::Text => {
            let ids = encode(str_field(value, "text")?, true, max_len)?;
            let targets = (0..ids.len()).map(|t| t >= 1).collect();
            Example { ids, targets }
        }
        Format::PromptCompletion => {
            let prompt = str_field(value, "prompt")?;
            let completion = str_field(value, "completion")?;
            // Both cut to max_len: when the prompt alone fills it, nothing after it is kept,
            // and otherwise "full starts with p" reads the same on the cut sequences.
            let p = encode(prompt, true, max_len)?;
            let full = encode(&format!("{prompt}{completion}"), true, max_len)?;
            // As TRL: tokenize prompt and prompt+completion; if merges cross the boundary,
            // tokenize the completion on its own instead.
            let mut ids = if full.starts_with(&p) {
                full
            } else {
                let mut ids = p.clone();
                ids.extend(encode(completion, false, max_len - p.len())?);
                ids
            };
            if let Some(eos) = tokenizer.eos_token_id() {
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
            }
            let targets = (0..ids.len()).map(|t| t >= p.len().max(1)).collect();
            Example { ids, targets }
        }
        Format::Messages => {
            let messages: Vec<Message> =
                serde_json::from_value(value.get("messages").cloned().unwrap_or(Value::Null))
                    .map_err(|e| {
                        format!(
                    "field \"messages\" must be a list of {{\"role\", \"content\"}} objects: {e}"
                )
                    })?;
            if !messages.iter().any(|m| m.role == "assistant") {
                return Err(
                    "the conversation has no assistant message, so nothing to learn".into(),
                );
            }
            let full = tokenizer
                .apply_chat_template(&messages, false)
                .map_err(|e| e.to_string())?;
            // Byte spans of the assistant turns: from the end of the prompt that asks for turn
            // i (add_generation_prompt) to the end of the conversation rendered up to turn i.
            let mut spans = Vec::new();
            for (i, m) in messages.iter().enumerate() {
                if m.role != "assistant" {
                    continue;
                }
                let before = tokenizer
                    .apply_chat_template(&messages[..i], true)
                    .map_err(|e| e.to_string())?;
                let upto = tokenizer
                    .apply_chat_template(&messages[..=i], false)
                    .map_err(|e| e.to_string())?;
                if !full.starts_with(&before)
                    || !full.starts_with(&upto)
                    || before.len() > upto.len()
                {
                    return Err(format!(
                        "the chat template renders message {i} differently depending on later messages, \
                         so the assistant turns cannot be located"
                    ));
                }
                spans.push((before.len(), upto.len()));
            }
            let (ids, offsets) = tokenizer
                .encode_truncated_with_offsets(&full, false, max_len)
                .map_err(|e| e.to_string())?;
            let targets = offsets
                .iter()
                .enumerate()
                .map(|(t, &(start, end))| {
                    t >= 1 && end > start && spans.iter().any(|&(a, b)| start >= a && start < b)
                })
                .collect();
            Example { ids, targets }
        }
    };
    ex.truncate(max_len);
    Ok(ex)
}

/// Reads a JSONL file: the format of its first line, every line tokenized and truncated to
/// `max_len`. Errors name file:line. Lines with no loss token left are dropped (counted in the
/// second return value).
pub fn load(
    path: &Path,
    tokenizer: &Tokenizer,
    max_len: usize,
) -> Result<(Format, Vec<Example>, usize)> {
    let text = lowrank_core::files::read_text(path)?;
    let mut format = None;
    let mut out = Vec::new();
    let mut dropped = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |message: String| Error::DataLine {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| at(format!("invalid JSON: {e}")))?;
        let found = detect(&value).ok_or_else(|| {
            at(
                "expected an object with \"text\", \"prompt\" and \"completion\", or \"messages\""
                    .into(),
            )
        })?;
        let format = *format.get_or_insert(found);
        if found != format {
            return Err(at(format!(
                "this line is in the {} format but the file's first line is {}; use one format per file",
                found.as_str(),
                format.as_str()
            )));
        }
        let ex = tokenize_truncated(format, &value, tokenizer, max_len).map_err(at)?;
        if ex.loss_tokens() == 0 {
            dropped += 1;
        } else {
            out.push(ex);
        }
    }
    let format = format.ok_or_else(|| Error::file(path, "no data lines"))?;
    if out.is_empty() {
        return Err(Error::file(
            path,
            format!("no line has a token to learn from (after truncation to --max-len {max_len})"),
        ));
    }
    Ok((format, out, dropped))
}

/// Splits off `fraction` of the examples (at least one, seeded) for evaluation: (train, eval).
pub fn split(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::option(
            "eval_split",
            format!("expected a fraction in (0, 1), found {fraction}"),
        ));
    }
    let n = examples.len();
    let n_eval = ((n as f64 * fraction).round() as usize).max(1);
    if n_eval >= n {
        return Err(Error::Msg(format!(
            "--eval-split {fraction} of {n} lines leaves nothing to train on"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5EED_E7A1));
    let eval_set: std::collections::BTreeSet<usize> = order[..n_eval].iter().copied().collect();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, ex) in examples.into_iter().enumerate() {
        if eval_set.contains(&i) {
            eval.push(ex);
        } else {
            train.push(ex);
        }
    }
    Ok((train, eval))
}

/// The order of the examples in `epoch`: file order, or a shuffle seeded by (seed, epoch) so a
/// resumed run sees the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng =
            StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (epoch as u64 + 1));
        order.shuffle(&mut rng);
    }
    order
}

/// A micro-batch plan: rows of example indices (one example per row unless packed).
pub type Rows = Vec<Vec<usize>>;

/// Groups `order` into micro-batches of `batch_size` rows. Packed: examples are laid greedily,
/// in order, into rows of at most `max_len` tokens.
pub fn plan_micro_batches(
    examples: &[Example],
    order: &[usize],
    batch_size: usize,
    pack: bool,
    max_len: usize,
) -> Vec<Rows> {
    let rows: Vec<Vec<usize>> = if pack {
        let mut rows: Vec<Vec<usize>> = Vec::new();
        let mut len = 0;
        for &i in order {
            let n = examples[i].ids.len();
            match rows.last_mut() {
                Some(row) if len + n <= max_len => {
                    row.push(i);
                    len += n;
                }
                _ => {
                    rows.push(vec![i]);
                    len = n;
                }
            }
        }
        rows
    } else {
        order.iter().map(|&i| vec![i]).collect()
    };
    rows.chunks(batch_size.max(1)).map(|c| c.to_vec()).collect()
}

/// Tensors of one micro-batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (batch, seq) u32, right-padded.
    pub ids: Tensor,
    /// (batch, seq) u32 positions restarting at each packed sequence; `None` = 0..seq.
    pub positions: Option<Tensor>,
    /// Additive (batch, 1, 1, seq, seq) block-diagonal causal mask for packed rows.
    pub mask: Option<Tensor>,
    /// Flat index (row·seq + position) of each hidden state whose next token is a target.
    pub predict_at: Tensor,
    /// The target token of each of those, (n) u32.
    pub labels: Tensor,
    /// Loss tokens (n).
    pub loss_tokens: usize,
    /// Real (non-pad) input tokens.
    pub input_tokens: usize,
}

/// Builds the tensors of a micro-batch; a row holding several examples gets restarting
/// positions and a block-diagonal mask, so neither attention nor loss crosses sequences.
pub fn make_batch(examples: &[Example], rows: &[Vec<usize>], device: &Device) -> Result<Batch> {
    let seq = rows
        .iter()
        .map(|r| r.iter().map(|&i| examples[i].ids.len()).sum::<usize>())
        .max()
        .unwrap_or(0)
        .max(1);
    let batch = rows.len();
    let packed = rows.iter().any(|r| r.len() > 1);
    let mut ids = vec![0u32; batch * seq];
    let mut positions = vec![0u32; batch * seq];
    // Segment of each position; padding gets its own segment so its rows stay finite.
    let mut segment = vec![u32::MAX; batch * seq];
    let (mut predict_at, mut labels) = (Vec::new(), Vec::new());
    let mut input_tokens = 0;
    for (r, row) in rows.iter().enumerate() {
        let mut p = 0;
        for (s, &i) in row.iter().enumerate() {
            let ex = &examples[i];
            for (t, &id) in ex.ids.iter().enumerate() {
                let at = r * seq + p + t;
                ids[at] = id;
                positions[at] = t as u32;
                segment[at] = s as u32;
                if t >= 1 && ex.targets[t] {
                    predict_at.push((at - 1) as u32);
                    labels.push(id);
                }
            }
            p += ex.ids.len();
            input_tokens += ex.ids.len();
        }
        for (k, at) in (r * seq + p..(r + 1) * seq).enumerate() {
            positions[at] = k as u32;
        }
    }
    let mask = if packed {
        let mut m = vec![0f32; batch * seq * seq];
        for r in 0..batch {
            for i in 0..seq {
                for j in 0..seq {
                    let visible = j <= i && segment[r * seq + i] == segment[r * seq + j];
                    if !visible {
                        m[(r * seq + i) * seq + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Some(Tensor::from_vec(m, (batch, 1, 1, seq, seq), device)?)
    } else {
        None
    };
    let loss_tokens = labels.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (batch, seq), device)?,
        positions: if packed {
            Some(Tensor::from_vec(positions, (batch, seq), device)?)
        } else {
            None
        },
        mask,
        predict_at: Tensor::from_vec(predict_at, loss_tokens, device)?,
        labels: Tensor::from_vec(labels, loss_tokens, device)?,
        loss_tokens,
        input_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
    }

    fn tok(style: &str) -> Tokenizer {
        Tokenizer::load(&fixtures().join("tokenizers").join(style)).unwrap()
    }

    #[test]
    fn formats_are_detected_from_keys() {
        assert_eq!(detect(&json!({"text": "a"})), Some(Format::Text));
        assert_eq!(
            detect(&json!({"prompt": "a", "completion": "b"})),
            Some(Format::PromptCompletion)
        );
        assert_eq!(detect(&json!({"messages": []})), Some(Format::Messages));
        assert_eq!(detect(&json!({"prompt": "a"})), None);
        assert_eq!(detect(&json!([1])), None);
    }

    #[test]
    fn text_trains_on_every_token() {
        let t = tok("llama-style");
        let ex = tokenize(
            Format::Text,
            &json!({"text": "The small dog finds the ball."}),
            &t,
        )
        .unwrap();
        assert_eq!(
            ex.ids,
            t.encode("The small dog finds the ball.", true).unwrap()
        );
        assert!(!ex.targets[0] && ex.targets[1..].iter().all(|&x| x));
    }

    #[test]
    fn prompt_completion_masks_the_prompt() {
        let t = tok("llama-style");
        let ex = tokenize(
            Format::PromptCompletion,
            &json!({"prompt": "The small dog", "completion": " finds the ball."}),
            &t,
        )
        .unwrap();
        let p = t.encode("The small dog", true).unwrap();
        assert_eq!(&ex.ids[..p.len()], &p[..]);
        assert_eq!(*ex.ids.last().unwrap(), t.eos_token_id().unwrap());
        assert!(ex.targets[..p.len()].iter().all(|&x| !x));
        assert!(ex.targets[p.len()..].iter().all(|&x| x));
        let completion: Vec<u32> = ex.ids[p.len()..ex.ids.len() - 1].to_vec();
        assert_eq!(t.decode(&completion, false).unwrap(), " finds the ball.");
    }

    #[test]
    fn messages_train_on_assistant_turns_only() {
        for style in ["qwen-style", "llama-style"] {
            let t = tok(style);
            let v = json!({"messages": [
                {"role": "user", "content": "Where is the dog?"},
                {"role": "assistant", "content": "Under the tree."},
                {"role": "user", "content": "And the cat?"},
                {"role": "assistant", "content": "Inside the house."}
            ]});
            let ex = tokenize(Format::Messages, &v, &t).unwrap();
            let learned: Vec<u32> = ex
                .ids
                .iter()
                .zip(&ex.targets)
                .filter(|(_, &m)| m)
                .map(|(&i, _)| i)
                .collect();
            let text = t.decode(&learned, false).unwrap();
            assert!(
                text.contains("Under the tree.") && text.contains("Inside the house."),
                "{style}: {text:?}"
            );
            assert!(
                !text.contains("dog?") && !text.contains("cat?") && !text.contains("user"),
                "{style}: {text:?}"
            );
            if style == "qwen-style" {
                // The end-of-turn marker is learned so the model learns to stop.
                assert_eq!(text.matches("<|im_end|>").count(), 2, "{text:?}");
                assert!(!text.contains("assistant"), "{text:?}");
            }
        }
    }

    /// Long records cut to `max_len` while tokenizing give what tokenizing them whole and
    /// truncating gives, in every format, for both tokenizer styles and cuts that fall in the
    /// prompt, at the prompt's end, in the completion and past the end.
    #[test]
    fn truncated_tokenizing_equals_whole_tokenizing_then_truncating() {
        let sentence = "The small dog finds the red ball under the tree, café 🤔 12 trains. ";
        let long = sentence.repeat(400);
        let records = [
            (Format::Text, json!({ "text": long })),
            (Format::Text, json!({"text": "a b".repeat(5000)})),
            (Format::Text, json!({"text": "x".repeat(30000)})),
            (
                Format::PromptCompletion,
                json!({"prompt": long, "completion": " and it ends."}),
            ),
            (
                Format::PromptCompletion,
                json!({"prompt": "Where is the dog?", "completion": long}),
            ),
            (
                Format::Messages,
                json!({"messages": [
                    {"role": "user", "content": long},
                    {"role": "assistant", "content": long},
                ]}),
            ),
        ];
        for style in ["llama-style", "qwen-style"] {
            let t = tok(style);
            for (format, value) in &records {
                let whole = tokenize(*format, value, &t).unwrap();
                let p = t
                    .encode(
                        value.get("prompt").and_then(Value::as_str).unwrap_or(""),
                        true,
                    )
                    .unwrap()
                    .len();
                for max_len in [
                    2,
                    7,
                    64,
                    512,
                    p.saturating_sub(1).max(2),
                    p,
                    p + 1,
                    p + 3,
                    whole.ids.len(),
                    whole.ids.len() + 5,
                ] {
                    let mut want = whole.clone();
                    want.truncate(max_len);
                    let got = tokenize_truncated(*format, value, &t, max_len).unwrap();
                    assert_eq!(got, want, "{style} {} max_len {max_len}", format.as_str());
                }
            }
        }
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let t = tok("llama-style");
        let cases = [
            (
                "{\"text\": \"a b c\"}\n{\"text\": 3}\n",
                ":2:",
                "must be a string",
            ),
            (
                "{\"text\": \"a b c\"}\n\n{not json\n",
                ":3:",
                "invalid JSON",
            ),
            (
                "{\"text\": \"a b c\"}\n{\"prompt\": \"a\", \"completion\": \"b\"}\n",
                ":2:",
                "one format per file",
            ),
            ("{\"foo\": 1}\n", ":1:", "expected an object"),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
                ":1:",
                "no assistant",
            ),
        ];
        for (i, (text, line, what)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("bad{i}.jsonl"));
            std::fs::write(&path, text).unwrap();
            let err = load(&path, &t, 64).unwrap_err().to_string();
            assert!(
                err.contains(&format!("bad{i}.jsonl{line}")) && err.contains(what),
                "{err}"
            );
        }
    }

    #[test]
    fn split_and_order_are_seeded() {
        let ex: Vec<Example> = (0..20)
            .map(|i| Example {
                ids: vec![1, i],
                targets: vec![false, true],
            })
            .collect();
        let (a, b) = split(ex.clone(), 0.1, 3).unwrap();
        let (c, d) = split(ex, 0.1, 3).unwrap();
        assert_eq!((a.len(), b.len()), (18, 2));
        assert_eq!((a, b), (c, d));
        assert_eq!(epoch_order(5, 0, 0, false), vec![0, 1, 2, 3, 4]);
        assert_eq!(epoch_order(50, 7, 1, true), epoch_order(50, 7, 1, true));
        assert_ne!(epoch_order(50, 7, 1, true), epoch_order(50, 7, 2, true));
    }

    #[test]
    fn padded_and_packed_batches_keep_sequences_apart() {
        let ex = vec![
            Example {
                ids: vec![1, 5, 6],
                targets: vec![false, true, true],
            },
            Example {
                ids: vec![1, 7],
                targets: vec![false, true],
            },
        ];
        let padded = make_batch(&ex, &[vec![0], vec![1]], &Device::Cpu).unwrap();
        assert_eq!(
            padded.ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 5, 6], vec![1, 7, 0]]
        );
        assert_eq!(padded.predict_at.to_vec1::<u32>().unwrap(), vec![0, 1, 3]);
        assert_eq!(padded.labels.to_vec1::<u32>().unwrap(), vec![5, 6, 7]);
        assert!(padded.mask.is_none());
        let plan = plan_micro_batches(&ex, &[0, 1], 4, true, 8);
        assert_eq!(plan, vec![vec![vec![0, 1]]]);
        let packed = make_batch(&ex, &plan[0], &Device::Cpu).unwrap();
        assert_eq!(
            packed.positions.unwrap().to_vec2::<u32>().unwrap(),
            vec![vec![0, 1, 2, 0, 1]]
        );
        // No prediction from the last token of the first sequence to the first of the second.
        assert_eq!(packed.predict_at.to_vec1::<u32>().unwrap(), vec![0, 1, 3]);
        let mask = packed
            .mask
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let visible = |i: usize, j: usize| mask[i * 5 + j] == 0.0;
        assert!(
            visible(2, 0) && visible(4, 3) && !visible(3, 2) && !visible(4, 0) && !visible(0, 1)
        );
        assert_eq!(
            plan_micro_batches(&ex, &[0, 1], 4, true, 4),
            vec![vec![vec![0], vec![1]]]
        );
    }
}
