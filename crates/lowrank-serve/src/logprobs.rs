//! Log-probabilities of tokens as OpenAI's API reports them: of the model's raw distribution
//! (the log-softmax of its logits, before temperature or top-p, as vLLM's default), each token
//! shown as the text it adds to the decoded string.

use std::sync::Arc;

use lowrank_models::Tokenizer;

/// What OpenAI (and vLLM) report in place of minus infinity.
const FLOOR: f32 = -9999.0;

/// One position's log-probabilities: the token there and the most likely ones.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// The `k` most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `token` and the `k` most likely tokens under `logits`.
pub fn token_logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_norm = f64::from(max) + sum.ln();
    let logprob = |i: usize| clamp((f64::from(logits[i]) - log_norm) as f32);
    let mut top: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(top.len());
    if k > 0 {
        let by_rank = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        top.select_nth_unstable_by(k - 1, by_rank);
        top.truncate(k);
        top.sort_unstable_by(by_rank);
    } else {
        top.clear();
    }
    TokenLogprobs {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(FLOOR, |_| logprob(token as usize)),
        top: top.into_iter().map(|i| (i as u32, logprob(i))).collect(),
    }
}

fn clamp(logprob: f32) -> f32 {
    if logprob.is_nan() {
        FLOOR
    } else {
        logprob.max(FLOOR)
    }
}

/// Incremental detokenization (as transformers' streamers and vLLM do it): the text each token
/// adds to the decoded string. A token that ends inside a multi-byte character adds "" and the
/// next one the whole character, so the pieces always join to the decoded text.
pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    /// Tokens before `prefix_offset` no longer change how later ones decode.
    prefix_offset: usize,
    /// Tokens before `read_offset` have had their text handed out.
    read_offset: usize,
}

impl Detokenizer {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Detokenizer {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    pub fn tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// The text `token` would add after the tokens pushed so far, and whether it completes it.
    fn added(&self, token: u32) -> (String, bool) {
        let before = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let mut ids = self.ids[self.prefix_offset..].to_vec();
        ids.push(token);
        let after = self.decode(&ids);
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let added = match after.strip_prefix(&before) {
                Some(rest) => rest.to_string(),
                None => after[floor_boundary(&after, before.len())..].to_string(),
            };
            (added, true)
        } else {
            (String::new(), false)
        }
    }

    /// Appends `token` and returns the text it adds.
    pub fn push(&mut self, token: u32) -> String {
        let (text, complete) = self.added(token);
        self.ids.push(token);
        if complete {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        text
    }

    /// The text held back so far: a character the last tokens leave incomplete (decoded as
    /// U+FFFD), which the decoded string of the whole sequence ends with.
    pub fn remainder(&self) -> String {
        let before = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let after = self.decode(&self.ids[self.prefix_offset..]);
        match after.strip_prefix(&before) {
            Some(rest) => rest.to_string(),
            None => after[floor_boundary(&after, before.len())..].to_string(),
        }
    }

    /// The text `token` would add here (for the alternatives of a position).
    pub fn peek(&self, token: u32) -> String {
        self.added(token).0
    }
}

/// The largest char boundary ≤ i.
pub(crate) fn floor_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_tokens_in_order() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let norm = logits.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        let t = token_logprobs(&logits, 4, 3);
        assert!((f64::from(t.logprob) - (-1.0 - norm)).abs() < 1e-6);
        let ids: Vec<u32> = t.top.iter().map(|p| p.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert!((f64::from(t.top[2].1) - (2.0 - norm)).abs() < 1e-6);
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprobs(&logits, 0, 99).top.len(), 5);
        let floor = token_logprobs(&[0.0, f32::NEG_INFINITY], 1, 0);
        assert_eq!(floor.logprob, FLOOR);
    }
}
