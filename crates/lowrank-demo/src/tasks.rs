//! The demo's data, all procedurally generated from a seed: a pretraining corpus and the skills
//! adapters learn.
//!
//! Every line the model sees uses the character set of [`crate::charset`]. The pretraining corpus
//! holds simple English-like sentences and `copy: x = x` lines, so the base model knows words,
//! digits and the `op: input = output` format, but it never sees a word reversed, a sum taken
//! modulo 10 or a letter shifted: those are the skills the adapters add.

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A skill an adapter learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// `reverse: lamp =` → ` pmal`
    Reverse,
    /// `mod10: 47+85 =` → ` 2`, (a+b) mod 10 of two two-digit numbers.
    Mod10,
    /// `caesar: lamp =` → ` odps`, every letter shifted 3 places (z wraps to c).
    Caesar,
}

/// How far the Caesar cipher shifts each letter.
pub const CAESAR_SHIFT: u8 = 3;

/// Shortest and longest random word of the word tasks.
pub const WORD_LEN: (usize, usize) = (3, 6);

/// One training or evaluation example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub completion: String,
}

impl Task {
    pub const ALL: [Task; 3] = [Task::Reverse, Task::Mod10, Task::Caesar];

    pub fn name(self) -> &'static str {
        match self {
            Task::Reverse => "reverse",
            Task::Mod10 => "mod10",
            Task::Caesar => "caesar",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Task::Reverse => "reverse a word",
            Task::Mod10 => "(a+b) mod 10",
            Task::Caesar => "Caesar cipher, shift 3",
        }
    }

    /// The prompt for `input` (a word, or `a+b`).
    pub fn prompt(self, input: &str) -> String {
        format!("{}: {input} =", self.name())
    }

    /// The correct completion for `input`: a space, then the answer.
    pub fn answer(self, input: &str) -> String {
        let answer = match self {
            Task::Reverse => input.chars().rev().collect(),
            Task::Caesar => input.bytes().map(|b| caesar(b, CAESAR_SHIFT) as char).collect(),
            Task::Mod10 => {
                let (a, b) = input.split_once('+').expect("mod10 input is a+b");
                let a: u32 = a.parse().expect("a number");
                let b: u32 = b.parse().expect("a number");
                ((a + b) % 10).to_string()
            }
        };
        format!(" {answer}")
    }

    /// A random input for this task.
    fn input(self, rng: &mut StdRng) -> String {
        match self {
            Task::Reverse => loop {
                // Palindromes read the same both ways: copying them would score as reversing.
                let w = random_word(rng, WORD_LEN);
                if w.chars().rev().collect::<String>() != w {
                    return w;
                }
            },
            Task::Caesar => random_word(rng, WORD_LEN),
            Task::Mod10 => format!("{}+{}", rng.random_range(10..100), rng.random_range(10..100)),
        }
    }

    pub fn example(self, input: &str) -> Example {
        Example { prompt: self.prompt(input), completion: self.answer(input) }
    }

    /// Disjoint train and eval sets (no prompt in both, none repeated), deterministic in `seed`.
    pub fn splits(self, n_train: usize, n_eval: usize, seed: u64) -> (Vec<Example>, Vec<Example>) {
        let mut rng = StdRng::seed_from_u64(seed ^ (0x5eed_0000 + self as u64));
        let mut seen = BTreeSet::new();
        let mut take = |n: usize, rng: &mut StdRng| {
            let mut out = Vec::with_capacity(n);
            // Every task has far more distinct inputs than the demo asks for; the bound only
            // keeps a too-large request from spinning forever.
            let mut tries = 0;
            while out.len() < n && tries < 100 * n + 1000 {
                tries += 1;
                let input = self.input(rng);
                if seen.insert(input.clone()) {
                    out.push(self.example(&input));
                }
            }
            out
        };
        let eval = take(n_eval, &mut rng);
        let train = take(n_train, &mut rng);
        (train, eval)
    }
}

fn caesar(b: u8, shift: u8) -> u8 {
    debug_assert!(b.is_ascii_lowercase());
    b'a' + (b - b'a' + shift) % 26
}

/// A random lowercase string with a length in `len` (inclusive).
pub fn random_word(rng: &mut StdRng, len: (usize, usize)) -> String {
    let n = rng.random_range(len.0..=len.1);
    (0..n).map(|_| (b'a' + rng.random_range(0..26u8)) as char).collect()
}

const NOUNS: &[&str] = &[
    "cat", "dog", "bird", "fish", "tree", "house", "river", "stone", "child", "king", "queen", "ship", "lamp", "door",
    "road", "hill", "apple", "book", "horse", "cloud", "garden", "window", "farmer", "teacher", "friend", "star",
];
const ADJECTIVES: &[&str] = &[
    "red", "big", "small", "old", "young", "happy", "quiet", "dark", "bright", "green", "tall", "slow", "quick", "cold",
    "warm", "blue",
];
const VERBS: &[&str] = &[
    "sees", "finds", "likes", "takes", "helps", "follows", "builds", "paints", "watches", "carries", "opens", "keeps",
];
const PLACES: &[&str] = &["in the garden", "by the river", "on the hill", "at home", "near the road", "under the tree"];

/// One line of the pretraining corpus.
fn corpus_line(rng: &mut StdRng) -> String {
    let pick = |rng: &mut StdRng, list: &[&'static str]| list[rng.random_range(0..list.len())];
    match rng.random_range(0..10) {
        // The op format, with the one operation the base model is allowed to know.
        0..=2 => {
            let w = random_word(rng, WORD_LEN);
            format!("copy: {w} = {w}")
        }
        // Real words are copied too, so the format is not tied to random letters.
        3 => {
            let w = pick(rng, NOUNS);
            format!("copy: {w} = {w}")
        }
        4 | 5 => {
            let n = rng.random_range(2..100);
            format!("the {} has {n} {}s.", pick(rng, NOUNS), pick(rng, NOUNS))
        }
        6 => format!(
            "is the {} {}? yes, it is {}.",
            pick(rng, NOUNS),
            pick(rng, ADJECTIVES),
            pick(rng, ADJECTIVES)
        ),
        _ => format!(
            "the {} {} {} the {} {} {}.",
            pick(rng, ADJECTIVES),
            pick(rng, NOUNS),
            pick(rng, VERBS),
            pick(rng, ADJECTIVES),
            pick(rng, NOUNS),
            pick(rng, PLACES)
        ),
    }
}

/// `n` lines of pretraining text, deterministic in `seed`.
pub fn corpus(n: usize, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc0_7905);
    (0..n).map(|_| corpus_line(&mut rng)).collect()
}
