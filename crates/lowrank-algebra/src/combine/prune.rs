//! The entrywise steps of TIES and DARE on one module's dense updates: magnitude pruning,
//! seeded random pruning with rescale, and TIES' sign election with the disjoint mean.
//! Entries are visited in row-major order (PyTorch's `reshape(-1)`), which fixes both the
//! tie-break of equal magnitudes and the order DARE draws its mask in.

use nalgebra::DMatrix;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::method::MajoritySign;

/// Keeps the round(density·n) entries largest in magnitude and zeroes the rest; of equal
/// magnitudes the earlier entry (row-major) stays. PEFT keeps ⌊density·n⌋, which loses an
/// entry to floating point when density·n is just below a whole number (0.29·100 = 28.99…).
pub fn magnitude_prune(delta: &DMatrix<f64>, density: f64) -> DMatrix<f64> {
    let (rows, cols) = delta.shape();
    let n = rows * cols;
    let keep = ((density * n as f64).round() as usize).min(n);
    if keep == n {
        return delta.clone();
    }
    let at = |i: usize| delta[(i / cols, i % cols)];
    let mut order: Vec<usize> = (0..n).collect();
    // Larger magnitude first, then lower index: a total order, so the selection is unique.
    let by_rank = |&i: &usize, &j: &usize| at(j).abs().total_cmp(&at(i).abs()).then(i.cmp(&j));
    let mut pruned = DMatrix::zeros(rows, cols);
    if keep > 0 {
        order.select_nth_unstable_by(keep - 1, by_rank);
        for &i in &order[..keep] {
            pruned[(i / cols, i % cols)] = at(i);
        }
    }
    pruned
}

/// DARE's drop-and-rescale: each entry kept with probability `density` (one uniform draw per
/// entry, row-major) and divided by `density`, so the expected value is the input.
pub fn random_prune(delta: &DMatrix<f64>, density: f64, rng: &mut StdRng) -> DMatrix<f64> {
    let (rows, cols) = delta.shape();
    let mut pruned = DMatrix::zeros(rows, cols);
    for r in 0..rows {
        for c in 0..cols {
            if rng.random::<f64>() < density {
                pruned[(r, c)] = delta[(r, c)] / density;
            }
        }
    }
    pruned
}

/// The random stream of one adapter's mask at one module: a function of the seed, the
/// adapter's position and the module name only, so a module's mask does not depend on which
/// other modules or adapters are combined.
pub fn mask_rng(seed: u64, adapter_index: usize, module: &str) -> StdRng {
    // FNV-1a: a fixed, documented hash (std's hasher may change between Rust releases).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = seed
        .to_le_bytes()
        .into_iter()
        .chain((adapter_index as u64).to_le_bytes())
        .chain(module.bytes());
    for byte in bytes {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    StdRng::seed_from_u64(hash)
}

/// TIES' merge of weighted contributions cᵢ (already pruned): per entry, elect the sign of the
/// vote (Σ cᵢ or Σ sign(cᵢ); ≥ 0 elects +), then average the non-zero contributions of the
/// elected sign. An entry no contribution agrees with is 0.
pub fn elect_and_average(contributions: &[DMatrix<f64>], rule: MajoritySign) -> DMatrix<f64> {
    let Some(first) = contributions.first() else {
        return DMatrix::zeros(0, 0);
    };
    DMatrix::from_fn(first.nrows(), first.ncols(), |r, c| {
        let values = contributions.iter().map(|m| m[(r, c)]);
        let vote: f64 = match rule {
            MajoritySign::Total => values.clone().sum(),
            MajoritySign::Frequency => values.clone().map(sign).sum(),
        };
        let elected = if vote >= 0.0 { 1.0 } else { -1.0 };
        let (sum, count) = values
            .filter(|&v| sign(v) == elected)
            .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
        sum / count.max(1) as f64
    })
}

/// −1, 0 or +1 (`f64::signum` gives ±1 for ±0).
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rows: usize, cols: usize, row_major: &[f64]) -> DMatrix<f64> {
        DMatrix::from_row_slice(rows, cols, row_major)
    }

    #[test]
    fn magnitude_prune_keeps_the_largest_entries() {
        let delta = m(2, 2, &[3.0, -1.0, 2.0, 5.0]);
        assert_eq!(magnitude_prune(&delta, 0.5), m(2, 2, &[3.0, 0.0, 0.0, 5.0]));
        assert_eq!(
            magnitude_prune(&delta, 0.75),
            m(2, 2, &[3.0, 0.0, 2.0, 5.0])
        );
        assert_eq!(magnitude_prune(&delta, 1.0), delta);
        // round(0.1·4) = 0: nothing survives.
        assert_eq!(magnitude_prune(&delta, 0.1), DMatrix::zeros(2, 2));
        // Negative entries compete by magnitude; equal magnitudes keep the earlier entry.
        let delta = m(2, 3, &[1.0, -4.0, 2.0, 4.0, -2.0, 0.5]);
        assert_eq!(
            magnitude_prune(&delta, 0.5),
            m(2, 3, &[0.0, -4.0, 2.0, 4.0, 0.0, 0.0])
        );
        // 0.29·100 is 28.999…: 29 entries survive, not 28.
        let delta = DMatrix::from_fn(10, 10, |r, c| (r * 10 + c + 1) as f64);
        let kept = magnitude_prune(&delta, 0.29);
        assert_eq!(kept.iter().filter(|v| **v != 0.0).count(), 29);
        assert_eq!(kept[(7, 1)], 72.0);
        assert_eq!(kept[(7, 0)], 0.0);
    }

    #[test]
    fn random_prune_keeps_about_density_and_rescales() {
        let delta = DMatrix::from_fn(100, 100, |r, c| 1.0 + (r + c) as f64);
        let density = 0.3;
        let pruned = random_prune(&delta, density, &mut mask_rng(7, 0, "q"));
        let kept: Vec<(f64, f64)> = pruned
            .iter()
            .zip(delta.iter())
            .filter(|(p, _)| **p != 0.0)
            .map(|(p, d)| (*p, *d))
            .collect();
        // Binomial(10000, 0.3): standard deviation ≈ 46; 5σ either way.
        let rate = kept.len() as f64 / 10_000.0;
        assert!((rate - density).abs() < 0.023, "keep rate {rate}");
        for (p, d) in kept {
            assert!((p - d / density).abs() < 1e-12, "{p} vs {d}/{density}");
        }
    }

    #[test]
    fn random_masks_are_reproducible_and_differ_by_seed_adapter_and_module() {
        let delta = DMatrix::from_element(8, 8, 1.0);
        let mask =
            |seed, index, module| random_prune(&delta, 0.5, &mut mask_rng(seed, index, module));
        assert_eq!(mask(1, 0, "a"), mask(1, 0, "a"));
        assert_ne!(mask(1, 0, "a"), mask(2, 0, "a"));
        assert_ne!(mask(1, 0, "a"), mask(1, 1, "a"));
        assert_ne!(mask(1, 0, "a"), mask(1, 0, "b"));
        // density 1 keeps everything unchanged.
        assert_eq!(random_prune(&delta, 1.0, &mut mask_rng(3, 0, "a")), delta);
    }

    #[test]
    fn sign_election_by_total_and_by_frequency() {
        // Worked by hand: entry (0,0) has 3, −4, 1: the total 0 elects +, the mean of
        // the agreeing 3 and 1 is 2; (0,1) only 2 is non-zero; (1,0) nothing; (1,1) 5 and 3.
        let c1 = m(2, 2, &[3.0, 0.0, 0.0, 5.0]);
        let c2 = m(2, 2, &[-4.0, 2.0, 0.0, 0.0]);
        let c3 = m(2, 2, &[1.0, 0.0, 0.0, 3.0]);
        let three = [c1.clone(), c2.clone(), c3];
        assert_eq!(
            elect_and_average(&three, MajoritySign::Total),
            m(2, 2, &[2.0, 2.0, 0.0, 4.0])
        );
        assert_eq!(
            elect_and_average(&three, MajoritySign::Frequency),
            m(2, 2, &[2.0, 2.0, 0.0, 4.0])
        );
        // Two adapters at (0,0): the total 3 − 4 < 0 elects −; one vote each ties at 0 → +.
        let two = [c1, c2];
        assert_eq!(
            elect_and_average(&two, MajoritySign::Total),
            m(2, 2, &[-4.0, 2.0, 0.0, 5.0])
        );
        assert_eq!(
            elect_and_average(&two, MajoritySign::Frequency),
            m(2, 2, &[3.0, 2.0, 0.0, 5.0])
        );
    }
}
