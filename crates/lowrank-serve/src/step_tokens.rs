//! Engine steps tallied by the tokens each fed (prompt chunks and decoding tokens), exactly up
//! to [`EXACT`] tokens, for the load benchmark's roofline.
//!
//! A step's bound is the larger of the time to read the weights and the time for its tokens'
//! FLOPs, so a run's bound is the sum of its steps' bounds, not the bound of its average step:
//! a prefill step of 300 tokens is bound by compute and the 64 decoding steps of eight rows
//! after it by memory, and averaging the two hides part of both.

use std::sync::atomic::{AtomicU64, Ordering};

/// Steps of up to this many tokens are tallied by their exact count.
pub const EXACT: usize = 64;

/// Running tallies, updated by the engine after each step.
pub struct StepTokens {
    /// Steps by tokens fed, 0..=EXACT.
    exact: [AtomicU64; EXACT + 1],
    /// Steps of more than EXACT tokens, and their tokens.
    over_steps: AtomicU64,
    over_tokens: AtomicU64,
}

/// A copy of the tallies at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTally {
    exact: Vec<u64>,
    over_steps: u64,
    over_tokens: u64,
}

impl Default for StepTokens {
    fn default() -> Self {
        StepTokens {
            exact: std::array::from_fn(|_| AtomicU64::new(0)),
            over_steps: AtomicU64::new(0),
            over_tokens: AtomicU64::new(0),
        }
    }
}

impl StepTokens {
    /// One step that fed `tokens` tokens.
    pub fn record(&self, tokens: usize) {
        match self.exact.get(tokens) {
            Some(count) => count.fetch_add(1, Ordering::Relaxed),
            None => {
                self.over_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
                self.over_steps.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    pub fn tally(&self) -> StepTally {
        StepTally {
            exact: self
                .exact
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            over_steps: self.over_steps.load(Ordering::Relaxed),
            over_tokens: self.over_tokens.load(Ordering::Relaxed),
        }
    }
}

impl StepTally {
    /// The steps recorded since `before` (an earlier tally of the same tallies).
    pub fn since(&self, before: &StepTally) -> StepTally {
        StepTally {
            exact: self
                .exact
                .iter()
                .zip(&before.exact)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            over_steps: self.over_steps.saturating_sub(before.over_steps),
            over_tokens: self.over_tokens.saturating_sub(before.over_tokens),
        }
    }

    pub fn steps(&self) -> u64 {
        self.exact.iter().sum::<u64>() + self.over_steps
    }

    pub fn tokens(&self) -> u64 {
        self.exact
            .iter()
            .enumerate()
            .map(|(t, n)| t as u64 * n)
            .sum::<u64>()
            + self.over_tokens
    }

    /// The sum over steps of max(`memory_s`, `per_token_s` × tokens), in seconds, as (the part
    /// from steps bound by memory, the part from steps bound by compute). Steps of more than
    /// [`EXACT`] tokens are summed together: exactly where each of them is bound by compute
    /// (`per_token_s` × (EXACT + 1) ≥ `memory_s`), else as the lower bound
    /// max(steps × `memory_s`, `per_token_s` × their tokens).
    pub fn bound_seconds(&self, memory_s: f64, per_token_s: f64) -> (f64, f64) {
        let (mut memory, mut compute) = (0.0, 0.0);
        for (t, &n) in self.exact.iter().enumerate() {
            let step = per_token_s * t as f64;
            if step > memory_s {
                compute += n as f64 * step;
            } else {
                memory += n as f64 * memory_s;
            }
        }
        let over_memory = self.over_steps as f64 * memory_s;
        let over_compute = self.over_tokens as f64 * per_token_s;
        if over_compute > over_memory {
            compute += over_compute;
        } else {
            memory += over_memory;
        }
        (memory, compute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps of 5, 20 and 100 tokens with 1 s to read the weights and 0.1 s a token: the first
    /// is bound by memory (1 s), the others by compute (2 s and 10 s); earlier steps drop out.
    #[test]
    fn each_step_takes_its_own_bound() {
        let tallies = StepTokens::default();
        tallies.record(7);
        let before = tallies.tally();
        for t in [5, 20, 100] {
            tallies.record(t);
        }
        let run = tallies.tally().since(&before);
        assert_eq!((run.steps(), run.tokens()), (3, 125));
        let (memory, compute) = run.bound_seconds(1.0, 0.1);
        assert!((memory - 1.0).abs() < 1e-12, "{memory}");
        assert!((compute - 12.0).abs() < 1e-12, "{compute}");
        // The bound of the average step (41.7 tokens, 4.17 s) × 3 is 12.5 s, not 13.
        let average = 3.0 * (0.1 * 125.0 / 3.0f64).max(1.0);
        assert!(average < memory + compute);
    }

    /// Steps past EXACT tokens with memory the larger: counted as bound by memory.
    #[test]
    fn long_steps_under_slow_memory_take_the_memory_bound() {
        let tallies = StepTokens::default();
        tallies.record(EXACT + 1);
        tallies.record(EXACT + 3);
        let (memory, compute) = tallies.tally().bound_seconds(100.0, 0.1);
        assert_eq!((memory, compute), (200.0, 0.0));
    }
}
