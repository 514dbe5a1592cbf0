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
    /// `inc: 4719 =` → ` 4720`: a four-digit number plus one, carries included.
    Increment,
    /// `caesar: lamp =` → ` odps`, every letter shifted 3 places (z wraps to c).
    Caesar,
    /// `copy: lamp =` → ` lamp`: in the pretraining corpus, so the base model knows it. Scored
    /// to show the base knows the format and what each adapter does to what it knew.
    Copy,
}

/// How far the Caesar cipher shifts each letter.
pub const CAESAR_SHIFT: u8 = 3;

/// Shortest and longest random word of the word tasks. One length keeps every answer
/// character at a fixed distance from its source, which a model this small learns in minutes.
pub const WORD_LEN: (usize, usize) = (4, 4);

/// One training or evaluation example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub completion: String,
}

impl Task {
    /// The skills adapters learn.
    pub const SKILLS: [Task; 3] = [Task::Reverse, Task::Increment, Task::Caesar];
    /// Every task scored: the skills and the pretrained `copy`.
    pub const ALL: [Task; 4] = [Task::Reverse, Task::Increment, Task::Caesar, Task::Copy];

    pub fn name(self) -> &'static str {
        match self {
            Task::Reverse => "reverse",
            Task::Increment => "inc",
            Task::Caesar => "caesar",
            Task::Copy => "copy",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Task::Reverse => "reverse a word",
            Task::Increment => "add one to a number",
            Task::Caesar => "Caesar cipher, shift 3",
            Task::Copy => "copy a word (pretrained)",
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
            Task::Copy => input.to_string(),
            Task::Caesar => input
                .bytes()
                .map(|b| caesar(b, CAESAR_SHIFT) as char)
                .collect(),
            Task::Increment => (input.parse::<u32>().expect("a number") + 1).to_string(),
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
            Task::Caesar | Task::Copy => random_word(rng, WORD_LEN),
            Task::Increment => rng.random_range(1000..10_000).to_string(),
        }
    }

    pub fn example(self, input: &str) -> Example {
        Example {
            prompt: self.prompt(input),
            completion: self.answer(input),
        }
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
    (0..n)
        .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
        .collect()
}

const NOUNS: &[&str] = &[
    "cat", "dog", "bird", "fish", "tree", "house", "river", "stone", "child", "king", "queen",
    "ship", "lamp", "door", "road", "hill", "apple", "book", "horse", "cloud", "garden", "window",
    "farmer", "teacher", "friend", "star",
];
const ADJECTIVES: &[&str] = &[
    "red", "big", "small", "old", "young", "happy", "quiet", "dark", "bright", "green", "tall",
    "slow", "quick", "cold", "warm", "blue",
];
const VERBS: &[&str] = &[
    "sees", "finds", "likes", "takes", "helps", "follows", "builds", "paints", "watches",
    "carries", "opens", "keeps",
];

/// One line of the pretraining corpus.
fn corpus_line(rng: &mut StdRng) -> String {
    let pick = |rng: &mut StdRng, list: &[&'static str]| list[rng.random_range(0..list.len())];
    match rng.random_range(0..10) {
        // The op format, with the one operation the base model is allowed to know.
        0..=4 => {
            let w = random_word(rng, WORD_LEN);
            format!("copy: {w} = {w}")
        }
        // Real words are copied too, so the format is not tied to random letters.
        5 => {
            let w = pick(rng, NOUNS);
            format!("copy: {w} = {w}")
        }
        // Numbers are copied, never computed: the base knows digits, not arithmetic.
        6 => {
            let n = rng.random_range(1000..10_000);
            format!("copy: {n} = {n}")
        }
        7 => {
            let n = rng.random_range(2..100);
            format!("the {} has {n} {}s.", pick(rng, NOUNS), pick(rng, NOUNS))
        }
        8 => format!(
            "is the {} {}? yes, it is {}.",
            pick(rng, NOUNS),
            pick(rng, ADJECTIVES),
            pick(rng, ADJECTIVES)
        ),
        _ => format!(
            "the {} {} {} the {}.",
            pick(rng, ADJECTIVES),
            pick(rng, NOUNS),
            pick(rng, VERBS),
            pick(rng, NOUNS)
        ),
    }
}

/// `n` lines of pretraining text, deterministic in `seed`.
pub fn corpus(n: usize, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc0_7905);
    (0..n).map(|_| corpus_line(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_correct() {
        assert_eq!(
            Task::Reverse.example("lamp"),
            Example {
                prompt: "reverse: lamp =".into(),
                completion: " pmal".into()
            }
        );
        assert_eq!(Task::Caesar.answer("abc"), " def");
        assert_eq!(Task::Caesar.answer("xyz"), " abc", "z wraps around");
        assert_eq!(
            Task::Increment.example("4719"),
            Example {
                prompt: "inc: 4719 =".into(),
                completion: " 4720".into()
            }
        );
        assert_eq!(Task::Increment.answer("1999"), " 2000");
        assert_eq!(Task::Increment.answer("9999"), " 10000");
    }

    /// Checks every generated example against an independent computation of its answer.
    #[test]
    fn generated_examples_hold_the_right_answers() {
        for task in Task::ALL {
            let (train, eval) = task.splits(300, 50, 7);
            for ex in train.iter().chain(&eval) {
                let input = ex
                    .prompt
                    .strip_prefix(&format!("{}: ", task.name()))
                    .unwrap()
                    .strip_suffix(" =")
                    .unwrap();
                let answer = ex.completion.strip_prefix(' ').unwrap();
                match task {
                    Task::Reverse => {
                        assert_eq!(answer.len(), input.len());
                        for (i, c) in answer.chars().enumerate() {
                            assert_eq!(Some(c), input.chars().nth(input.len() - 1 - i));
                        }
                        assert_ne!(answer, input, "palindromes are excluded");
                    }
                    Task::Copy => assert_eq!(answer, input),
                    Task::Caesar => {
                        for (a, b) in input.bytes().zip(answer.bytes()) {
                            assert_eq!((b as i32 - a as i32).rem_euclid(26), CAESAR_SHIFT as i32);
                        }
                    }
                    Task::Increment => {
                        let n: u32 = input.parse().unwrap();
                        assert!((1000..10_000).contains(&n), "{n}");
                        // Digit by digit, as on paper: add 1 to the last digit and carry.
                        let mut digits: Vec<u8> = input.bytes().map(|b| b - b'0').collect();
                        let mut i = digits.len();
                        loop {
                            if i == 0 {
                                digits.insert(0, 1);
                                break;
                            }
                            i -= 1;
                            if digits[i] == 9 {
                                digits[i] = 0;
                            } else {
                                digits[i] += 1;
                                break;
                            }
                        }
                        let expect: String = digits.iter().map(|d| (b'0' + d) as char).collect();
                        assert_eq!(answer, expect);
                    }
                }
                if task != Task::Increment {
                    let len = input.len();
                    assert!(
                        (WORD_LEN.0..=WORD_LEN.1).contains(&len)
                            && input.bytes().all(|b| b.is_ascii_lowercase())
                    );
                }
            }
        }
    }

    #[test]
    fn splits_are_deterministic_disjoint_and_sized() {
        for task in Task::ALL {
            let (train, eval) = task.splits(500, 100, 3);
            assert_eq!((train.len(), eval.len()), (500, 100));
            assert_eq!(task.splits(500, 100, 3), (train.clone(), eval.clone()));
            assert_ne!(
                task.splits(500, 100, 4).1,
                eval,
                "another seed gives other data"
            );
            let eval_prompts: BTreeSet<&String> = eval.iter().map(|e| &e.prompt).collect();
            let train_prompts: BTreeSet<&String> = train.iter().map(|e| &e.prompt).collect();
            assert_eq!(train_prompts.len(), train.len(), "no duplicates");
            assert!(train_prompts.is_disjoint(&eval_prompts));
        }
    }

    #[test]
    fn the_corpus_never_shows_a_skill() {
        let lines = corpus(3000, 1);
        assert_eq!(lines, corpus(3000, 1));
        assert!(
            lines.iter().any(|l| l.starts_with("copy: ")),
            "the op format is pretrained"
        );
        assert!(
            lines.iter().any(|l| l.bytes().any(|b| b.is_ascii_digit())),
            "digits are pretrained"
        );
        for l in &lines {
            for task in Task::SKILLS {
                assert!(!l.contains(&format!("{}:", task.name())), "{l}");
            }
            if let Some(rest) = l.strip_prefix("copy: ") {
                let (a, b) = rest.split_once(" = ").unwrap();
                assert_eq!(a, b, "copy lines copy");
            }
        }
        let chars = crate::charset::characters();
        for t in lines.iter().chain(
            Task::ALL
                .iter()
                .flat_map(|t| t.splits(50, 10, 0).0)
                .map(|e| e.prompt + &e.completion)
                .collect::<Vec<_>>()
                .iter(),
        ) {
            assert!(
                t.chars().all(|c| chars.contains(&c)),
                "{t:?} uses a character the tokenizer lacks"
            );
        }
    }
}
