//! A weight update kept in factored form, ΔW = B·A, and its SVD computed in the span of the
//! factors: with B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), ΔW = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, so the SVD of
//! the small r×r core gives ΔW's singular values and vectors without ever forming the d×k
//! matrix. Computed in f64: the core's small singular values are what rank choice looks at.

use candle_core::{DType, Device, Tensor};
use lowrank_core::lora::LoraModule;
use nalgebra::DMatrix;

use crate::{Error, Result};

/// ΔW = b·a with b: d×r and a: r×k (the LoRA scale already folded into b).
#[derive(Debug, Clone)]
pub struct Factored {
    pub b: DMatrix<f64>,
    pub a: DMatrix<f64>,
}

/// The thin SVD ΔW = U·diag(σ)·Vᵀ, σ descending; U: d×p, Vᵀ: p×k, p = min(r, d, k).
#[derive(Debug, Clone)]
pub struct LowRankSvd {
    pub u: DMatrix<f64>,
    pub singular_values: Vec<f64>,
    pub v_t: DMatrix<f64>,
}

impl Factored {
    pub fn new(b: DMatrix<f64>, a: DMatrix<f64>) -> Result<Self> {
        if b.ncols() != a.nrows() {
            return Err(Error::Invalid(format!(
                "factors do not chain: B is {}×{}, A is {}×{}",
                b.nrows(),
                b.ncols(),
                a.nrows(),
                a.ncols()
            )));
        }
        Ok(Self { b, a })
    }

    /// The update a LoRA module adds to its weight: scale·B·A (DoRA's magnitude is not part of
    /// it; callers that need DoRA's effective update must form it against the base weight).
    pub fn from_module(module: &LoraModule) -> Result<Self> {
        let b = matrix_from_tensor(&module.b)? * module.scale;
        let a = matrix_from_tensor(&module.a)?;
        Self::new(b, a)
    }

    pub fn out_features(&self) -> usize {
        self.b.nrows()
    }

    pub fn in_features(&self) -> usize {
        self.a.ncols()
    }

    pub fn rank(&self) -> usize {
        self.b.ncols()
    }

    /// Σ wᵢ·ΔWᵢ as one factored update of rank Σ rᵢ: B = [w₁B₁ … wₙBₙ], A = [A₁; …; Aₙ].
    /// Exact; every part must have the same d×k shape.
    pub fn weighted_sum(parts: &[(f64, &Factored)]) -> Result<Self> {
        let Some((_, first)) = parts.first() else {
            return Err(Error::Invalid("nothing to add: no factored updates".into()));
        };
        let (d, k) = (first.out_features(), first.in_features());
        if let Some((_, bad)) = parts
            .iter()
            .find(|(_, f)| f.out_features() != d || f.in_features() != k)
        {
            return Err(Error::Invalid(format!(
                "updates of different shapes cannot be added: {d}×{k} and {}×{}",
                bad.out_features(),
                bad.in_features()
            )));
        }
        let rank: usize = parts.iter().map(|(_, f)| f.rank()).sum();
        let mut b = DMatrix::zeros(d, rank);
        let mut a = DMatrix::zeros(rank, k);
        let mut offset = 0;
        for (weight, part) in parts {
            let r = part.rank();
            b.columns_mut(offset, r).copy_from(&(&part.b * *weight));
            a.rows_mut(offset, r).copy_from(&part.a);
            offset += r;
        }
        Self::new(b, a)
    }

    /// The d×k matrix. Only for tests and small layers.
    pub fn to_dense(&self) -> DMatrix<f64> {
        &self.b * &self.a
    }

    /// ‖ΔW‖_F computed from the factors: ‖BA‖²_F = trace((BᵀB)(AAᵀ)).
    pub fn frobenius_norm(&self) -> f64 {
        let btb = self.b.transpose() * &self.b;
        let aat = &self.a * self.a.transpose();
        btb.component_mul(&aat).sum().max(0.0).sqrt()
    }

    /// The thin SVD of ΔW through QR of B and Aᵀ and the SVD of the r×r core.
    pub fn svd(&self) -> LowRankSvd {
        let (q_b, r_b) = self.b.clone().qr().unpack();
        let (q_a, r_a) = self.a.transpose().qr().unpack();
        let core = LowRankSvd::of_dense(r_b * r_a.transpose());
        LowRankSvd {
            u: q_b * core.u,
            singular_values: core.singular_values,
            v_t: core.v_t * q_a.transpose(),
        }
    }

    /// A dense d×k update as exact factors without a decomposition: B = ΔW, A = I (or B = I,
    /// A = ΔW when d < k), rank min(d, k). For updates that are not low rank by construction
    /// (DoRA's effective update), so they can enter the factored algebra unchanged.
    pub fn from_dense(delta: DMatrix<f64>) -> Self {
        let (d, k) = delta.shape();
        if k <= d {
            Factored {
                b: delta,
                a: DMatrix::identity(k, k),
            }
        } else {
            Factored {
                b: DMatrix::identity(d, d),
                a: delta,
            }
        }
    }

    /// The same factors rounded to f32, the precision adapters are saved in.
    pub fn rounded_to_f32(&self) -> Self {
        let round = |m: &DMatrix<f64>| m.map(|x| x as f32 as f64);
        Factored {
            b: round(&self.b),
            a: round(&self.a),
        }
    }

    /// ‖self − other‖_F from the singular values of the stacked difference (never d×k, and
    /// without the cancellation of a trace formula, so tiny distances stay accurate).
    pub fn frobenius_distance(&self, other: &Factored) -> Result<f64> {
        let difference = Factored::weighted_sum(&[(1.0, self), (-1.0, other)])?;
        Ok(difference.svd().frobenius_norm())
    }
}

impl LowRankSvd {
    /// The thin SVD of a dense matrix, σ descending (the core of [`Factored::svd`], and updates
    /// that only exist densely, such as an entrywise-pruned merge; O(d·k·min(d, k))). By
    /// Jacobi rotations, not nalgebra's `SVD` (wrong for some inputs, see [`crate::jacobi`]).
    pub fn of_dense(matrix: DMatrix<f64>) -> Self {
        let (u, singular_values, v_t) = crate::jacobi::thin_svd(&matrix);
        LowRankSvd {
            u,
            singular_values,
            v_t,
        }
    }

    /// How many singular values exceed `tolerance`: the numerical rank.
    pub fn rank_above(&self, tolerance: f64) -> usize {
        self.singular_values
            .iter()
            .take_while(|&&s| s > tolerance)
            .count()
    }

    /// ‖ΔW‖_F = √Σσ².
    pub fn frobenius_norm(&self) -> f64 {
        self.singular_values
            .iter()
            .map(|s| s * s)
            .sum::<f64>()
            .sqrt()
    }

    /// The best rank-`rank` approximation (Eckart–Young) as factors, with √σ on each side so
    /// B and A have balanced norms (what training would continue from).
    pub fn truncate(&self, rank: usize) -> Factored {
        let rank = rank.min(self.singular_values.len());
        let roots: Vec<f64> = self.singular_values[..rank]
            .iter()
            .map(|s| s.sqrt())
            .collect();
        let b = DMatrix::from_fn(self.u.nrows(), rank, |r, c| self.u[(r, c)] * roots[c]);
        let a = DMatrix::from_fn(rank, self.v_t.ncols(), |r, c| self.v_t[(r, c)] * roots[r]);
        Factored { b, a }
    }

    /// ‖ΔW − ΔW_rank‖_F / ‖ΔW‖_F: the relative error of keeping the top `rank` directions.
    pub fn relative_truncation_error(&self, rank: usize) -> f64 {
        let total: f64 = self.singular_values.iter().map(|s| s * s).sum();
        if total == 0.0 {
            return 0.0;
        }
        let dropped: f64 = self.singular_values.iter().skip(rank).map(|s| s * s).sum();
        (dropped / total).sqrt()
    }
}

/// A 2-D tensor (any float dtype) as an f64 matrix.
pub fn matrix_from_tensor(tensor: &Tensor) -> Result<DMatrix<f64>> {
    let (rows, cols) = tensor.dims2()?;
    let data = tensor
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(rows, cols, &data))
}

/// An f64 matrix as a 2-D f32 tensor (the dtype adapters are trained and saved in).
pub fn tensor_from_matrix(matrix: &DMatrix<f64>, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = matrix.transpose().iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(
        data,
        (matrix.nrows(), matrix.ncols()),
        device,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        DMatrix::from_fn(rows, cols, |_, _| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        })
    }

    fn max_abs_diff(x: &DMatrix<f64>, y: &DMatrix<f64>) -> f64 {
        (x - y).abs().max()
    }

    #[test]
    fn svd_reconstructs_and_matches_the_dense_singular_values() {
        let f = Factored::new(pseudo_random(12, 3, 1), pseudo_random(3, 9, 2)).unwrap();
        let svd = f.svd();
        let dense = f.to_dense();
        let mut expected: Vec<f64> = dense.clone().singular_values().iter().copied().collect();
        expected.sort_by(|x, y| y.total_cmp(x));
        for (got, want) in svd.singular_values.iter().zip(&expected) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        // Beyond the rank the dense matrix has only round-off.
        assert!(expected[3..].iter().all(|s| *s < 1e-12));
        let rebuilt =
            &svd.u * DMatrix::from_diagonal(&svd.singular_values.clone().into()) * &svd.v_t;
        assert!(max_abs_diff(&rebuilt, &dense) < 1e-12);
        assert!((f.frobenius_norm() - dense.norm()).abs() < 1e-12);
    }

    #[test]
    fn weighted_sum_is_exact_and_truncation_error_is_the_dropped_energy() {
        let f1 = Factored::new(pseudo_random(8, 2, 3), pseudo_random(2, 5, 4)).unwrap();
        let f2 = Factored::new(pseudo_random(8, 3, 5), pseudo_random(3, 5, 6)).unwrap();
        let sum = Factored::weighted_sum(&[(0.7, &f1), (-0.3, &f2)]).unwrap();
        assert_eq!(sum.rank(), 5);
        let expected = f1.to_dense() * 0.7 - f2.to_dense() * 0.3;
        assert!(max_abs_diff(&sum.to_dense(), &expected) < 1e-12);

        let svd = sum.svd();
        let rank2 = svd.truncate(2);
        let error = (expected.clone() - rank2.to_dense()).norm() / expected.norm();
        assert!((svd.relative_truncation_error(2) - error).abs() < 1e-12);
        assert!(max_abs_diff(&svd.truncate(5).to_dense(), &expected) < 1e-12);
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        assert!(Factored::new(pseudo_random(4, 2, 1), pseudo_random(3, 4, 1)).is_err());
        let f1 = Factored::new(pseudo_random(4, 2, 1), pseudo_random(2, 4, 1)).unwrap();
        let f2 = Factored::new(pseudo_random(5, 2, 1), pseudo_random(2, 4, 1)).unwrap();
        assert!(Factored::weighted_sum(&[(1.0, &f1), (1.0, &f2)]).is_err());
        assert!(Factored::weighted_sum(&[]).is_err());
    }

    #[test]
    fn dense_updates_enter_the_algebra_exactly() {
        for (d, k) in [(6, 4), (3, 7)] {
            let dense = pseudo_random(d, k, 11);
            let f = Factored::from_dense(dense.clone());
            assert_eq!(f.rank(), d.min(k));
            assert_eq!(f.to_dense(), dense);
            let svd = LowRankSvd::of_dense(dense.clone());
            assert!(svd.singular_values.windows(2).all(|w| w[0] >= w[1]));
            assert_eq!(svd.rank_above(1e-12), d.min(k));
            assert!((svd.frobenius_norm() - dense.norm()).abs() < 1e-12);
            assert!(max_abs_diff(&svd.truncate(d.min(k)).to_dense(), &dense) < 1e-12);
        }
        // A rank-2 product has two singular values above round-off.
        let low = Factored::new(pseudo_random(6, 2, 12), pseudo_random(2, 5, 13)).unwrap();
        assert_eq!(LowRankSvd::of_dense(low.to_dense()).rank_above(1e-10), 2);
    }

    #[test]
    fn frobenius_distance_resolves_tiny_differences() {
        let f = Factored::new(pseudo_random(9, 3, 14), pseudo_random(3, 7, 15)).unwrap();
        let mut g = f.clone();
        g.b[(0, 0)] += 1e-12;
        let want = (f.to_dense() - g.to_dense()).norm();
        let got = f.frobenius_distance(&g).unwrap();
        assert!((got - want).abs() < 1e-3 * want, "{got} vs {want}");
        let rounded = f.rounded_to_f32();
        assert!(f.frobenius_distance(&rounded).unwrap() < 1e-7 * f.frobenius_norm());
        assert!(rounded.b.iter().all(|x| *x == (*x as f32) as f64));
    }

    #[test]
    fn tensors_round_trip() {
        let m = pseudo_random(3, 4, 9);
        let t = tensor_from_matrix(&m, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 4]);
        let back = matrix_from_tensor(&t).unwrap();
        assert!(max_abs_diff(&m, &back) < 1e-7);
    }
}
