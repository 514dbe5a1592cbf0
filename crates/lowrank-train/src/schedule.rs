//! Learning-rate schedules with linear warmup, as transformers' `get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` (half a cosine).

use crate::Schedule;

/// The learning rate of optimizer step `step` (1-based) out of `total`. As in transformers the
/// schedule's multiplier is taken at `step − 1` (so with warmup the first step has lr 0).
pub fn lr_at(schedule: Schedule, base_lr: f64, warmup: usize, total: usize, step: usize) -> f64 {
    let current = step.saturating_sub(1) as f64;
    let warmup_f = warmup as f64;
    if current < warmup_f {
        return base_lr * current / warmup_f.max(1.0);
    }
    let span = (total as f64 - warmup_f).max(1.0);
    let progress = (current - warmup_f) / span;
    let factor = match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => ((total as f64 - current) / span).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    };
    base_lr * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn values_match_transformers() {
        // warmup 2, total 10, base 1: steps 1, 2 are warmup (0, 0.5), step 3 is the peak.
        let lr = |s, step| lr_at(s, 1.0, 2, 10, step);
        for s in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
            assert!(
                close(lr(s, 1), 0.0) && close(lr(s, 2), 0.5) && close(lr(s, 3), 1.0),
                "{s}"
            );
        }
        assert!(close(lr(Schedule::Constant, 10), 1.0));
        // linear: (total − current)/(total − warmup) at current = step − 1.
        assert!(close(lr(Schedule::Linear, 4), 7.0 / 8.0));
        assert!(close(lr(Schedule::Linear, 10), 1.0 / 8.0));
        // cosine: 0.5·(1 + cos(π·(current − warmup)/(total − warmup))).
        assert!(close(lr(Schedule::Cosine, 7), 0.5));
        assert!(close(
            lr(Schedule::Cosine, 4),
            0.5 * (1.0 + (std::f64::consts::PI / 8.0).cos())
        ));
        // No warmup: the first step runs at the full rate.
        assert!(close(lr_at(Schedule::Cosine, 3e-4, 0, 5, 1), 3e-4));
    }
}
