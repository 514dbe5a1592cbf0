//! The top singular values and vectors of a dense matrix by randomized SVD (Halko, Martinsson &
//! Tropp 2011, "Finding structure with randomness", Algorithms 4.1/4.4 and 5.1): a Gaussian
//! sketch Y = M·Ω with `top + oversampling` columns, a few power iterations
//! Y ← M·(Mᵀ·Y), re-orthonormalised by QR after every product (so small singular values are not
//! lost to round-off), then the exact SVD of the small matrix Qᵀ·M. Cost O(d·k·l) per pass
//! instead of a full O(d·k·min(d, k)) decomposition; seeded, so reruns give the same numbers.
//! When the sketch would be as wide as the matrix, the exact SVD is taken instead.

use nalgebra::DMatrix;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::LowRankSvd;

/// The knobs of the sketch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomizedOptions {
    /// Extra sketch columns beyond the singular values wanted (HMT suggest 5–10).
    pub oversampling: usize,
    /// Passes of M·Mᵀ over the sketch; each sharpens the decay the sketch sees by a power.
    pub power_iterations: usize,
    pub seed: u64,
}

impl Default for RandomizedOptions {
    fn default() -> Self {
        RandomizedOptions {
            oversampling: 10,
            power_iterations: 2,
            seed: 0,
        }
    }
}

/// The top `top` singular triplets of `matrix` (fewer when the matrix is smaller), σ descending.
pub fn randomized_svd(matrix: &DMatrix<f64>, top: usize, options: RandomizedOptions) -> LowRankSvd {
    let (rows, cols) = matrix.shape();
    let full = rows.min(cols);
    let width = top.saturating_add(options.oversampling).min(full);
    let keep = top.min(full);
    if width >= full {
        return sorted_svd(matrix.clone(), keep);
    }
    let omega = gaussian(cols, width, options.seed);
    let mut q = orthonormal_columns(matrix * omega);
    for _ in 0..options.power_iterations {
        let z = orthonormal_columns(matrix.tr_mul(&q));
        q = orthonormal_columns(matrix * z);
    }
    // M ≈ Q·(QᵀM): the SVD of the width×cols matrix QᵀM gives M's top triplets.
    let small = q.tr_mul(matrix);
    let svd = sorted_svd(small, keep);
    LowRankSvd {
        u: q * svd.u,
        singular_values: svd.singular_values,
        v_t: svd.v_t,
    }
}

/// The exact thin SVD with only the top `keep` triplets.
fn sorted_svd(matrix: DMatrix<f64>, keep: usize) -> LowRankSvd {
    let svd = LowRankSvd::of_dense(matrix);
    let keep = keep.min(svd.singular_values.len());
    LowRankSvd {
        u: svd.u.columns(0, keep).into_owned(),
        singular_values: svd.singular_values[..keep].to_vec(),
        v_t: svd.v_t.rows(0, keep).into_owned(),
    }
}

fn orthonormal_columns(m: DMatrix<f64>) -> DMatrix<f64> {
    m.qr().q()
}

/// A rows×cols matrix of independent standard normals (Box–Muller), seeded.
fn gaussian(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    DMatrix::from_fn(rows, cols, |_, _| {
        // 1 − u lies in (0, 1], so the logarithm is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 60×40 matrix with singular values 2^-i·10 (i = 0..40) and random singular vectors.
    fn decaying(seed: u64) -> (DMatrix<f64>, Vec<f64>) {
        let u = gaussian(60, 40, seed).qr().q();
        let v = gaussian(40, 40, seed + 1).qr().q();
        let sigma: Vec<f64> = (0..40).map(|i| 10.0 * 0.5f64.powi(i)).collect();
        let m = &u * DMatrix::from_diagonal(&sigma.clone().into()) * v.transpose();
        (m, sigma)
    }

    #[test]
    fn top_k_matches_the_exact_svd_on_a_decaying_spectrum() {
        let (m, sigma) = decaying(7);
        let opts = RandomizedOptions::default();
        let got = randomized_svd(&m, 5, opts);
        assert_eq!(got.singular_values.len(), 5);
        for (g, want) in got.singular_values.iter().zip(&sigma) {
            assert!((g - want).abs() < 1e-9 * want, "{g} vs {want}");
        }
        // The triplets are real: M·v = σ·u for each.
        for i in 0..5 {
            let mv = &m * got.v_t.row(i).transpose();
            let su = got.u.column(i) * got.singular_values[i];
            assert!((mv - su).norm() < 1e-8);
        }
        // Seeded: the same call gives the same numbers; another seed agrees to tolerance.
        assert_eq!(
            randomized_svd(&m, 5, opts).singular_values,
            got.singular_values
        );
        let other = randomized_svd(&m, 5, RandomizedOptions { seed: 9, ..opts });
        for (a, b) in other.singular_values.iter().zip(&got.singular_values) {
            assert!((a - b).abs() < 1e-9 * b);
        }
    }

    #[test]
    fn power_iterations_matter_on_a_slow_decay() {
        // σᵢ = 1/(i+1): without power iterations the sketch's tail leaks into the top values.
        let u = gaussian(80, 80, 3).qr().q();
        let v = gaussian(80, 80, 4).qr().q();
        let sigma: Vec<f64> = (0..80).map(|i| 1.0 / (i + 1) as f64).collect();
        let m = &u * DMatrix::from_diagonal(&sigma.clone().into()) * v.transpose();
        let err = |power_iterations: usize| {
            let opts = RandomizedOptions {
                oversampling: 4,
                power_iterations,
                seed: 1,
            };
            let got = randomized_svd(&m, 8, opts);
            got.singular_values
                .iter()
                .zip(&sigma)
                .map(|(g, s)| (g - s).abs() / s)
                .fold(0.0, f64::max)
        };
        let (plain, powered) = (err(0), err(3));
        assert!(powered < 0.01, "{powered}");
        assert!(powered < plain, "{powered} vs {plain}");
    }

    #[test]
    fn a_sketch_as_wide_as_the_matrix_is_the_exact_svd() {
        let (m, sigma) = decaying(2);
        let got = randomized_svd(&m, 40, RandomizedOptions::default());
        assert_eq!(got.singular_values.len(), 40);
        assert!((got.singular_values[39] - sigma[39]).abs() < 1e-12);
        let got = randomized_svd(&m, 100, RandomizedOptions::default());
        assert_eq!(got.singular_values.len(), 40);
    }
}
