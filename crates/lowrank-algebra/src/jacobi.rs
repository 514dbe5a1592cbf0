//! The thin SVD by one-sided Jacobi rotations (Hestenes), after a QR that shrinks a tall matrix
//! to its n×n triangle. Used instead of nalgebra's `SVD`, whose results are wrong for some
//! inputs (dimforge/nalgebra#1172, open in 0.33–0.35: Σσ² ≠ ‖M‖²_F and UΣVᵀ ≠ M with
//! vectors requested — it broke a 32×32 rank-4 update here). Jacobi is simple, converges
//! quadratically and gets even small singular values to high relative accuracy; its cost is
//! O(rows·n² + n³) per decomposition with n = min(rows, cols).

use nalgebra::DMatrix;

/// Rotate while two columns' cosine exceeds this: converged to round-off.
const ORTHOGONALITY: f64 = 1e-15;
/// Sweeps allowed; Jacobi converges in well under 20 for any matrix of practical size.
const MAX_SWEEPS: usize = 60;

/// M = U·diag(σ)·Vᵀ with σ descending; U: rows×p, Vᵀ: p×cols, p = min(rows, cols). The
/// singular vectors of σ = 0 may be zero (only the span of M's non-zero part is needed here).
pub fn thin_svd(m: &DMatrix<f64>) -> (DMatrix<f64>, Vec<f64>, DMatrix<f64>) {
    if m.nrows() < m.ncols() {
        let (u, sigma, v_t) = thin_svd(&m.transpose());
        return (v_t.transpose(), sigma, u.transpose());
    }
    let n = m.ncols();
    if n == 0 {
        return (DMatrix::zeros(m.nrows(), 0), vec![], DMatrix::zeros(0, 0));
    }
    // M = Q·R; the SVD of the n×n R gives M's with U = Q·U_R.
    let (q, r) = m.clone().qr().unpack();
    let mut w = r;
    let mut v = DMatrix::<f64>::identity(n, n);
    for _ in 0..MAX_SWEEPS {
        let mut rotated = false;
        for p in 0..n {
            for k in p + 1..n {
                let (alpha, beta, gamma) = {
                    let (cp, ck) = (w.column(p), w.column(k));
                    (cp.norm_squared(), ck.norm_squared(), cp.dot(&ck))
                };
                if gamma == 0.0 || gamma.abs() <= ORTHOGONALITY * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                // The rotation that zeroes the (p, k) entry of the 2×2 Gram matrix.
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate_columns(&mut w, p, k, c, s);
                rotate_columns(&mut v, p, k, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = (0..n).map(|j| w.column(j).norm()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| norms[j].total_cmp(&norms[i]));
    let u_r = DMatrix::from_fn(n, n, |row, col| {
        let j = order[col];
        if norms[j] > 0.0 {
            w[(row, j)] / norms[j]
        } else {
            0.0
        }
    });
    let v_t = DMatrix::from_fn(n, n, |row, col| v[(col, order[row])]);
    let sigma = order.iter().map(|&j| norms[j]).collect();
    (q * u_r, sigma, v_t)
}

/// Columns (p, k) ← (c·p − s·k, s·p + c·k).
fn rotate_columns(m: &mut DMatrix<f64>, p: usize, k: usize, c: f64, s: f64) {
    for row in 0..m.nrows() {
        let (x, y) = (m[(row, p)], m[(row, k)]);
        m[(row, p)] = c * x - s * y;
        m[(row, k)] = s * x + c * y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(m: &DMatrix<f64>) -> Vec<f64> {
        let (u, sigma, v_t) = thin_svd(m);
        let p = m.nrows().min(m.ncols());
        assert_eq!(
            (u.shape(), sigma.len(), v_t.shape()),
            ((m.nrows(), p), p, (p, m.ncols()))
        );
        assert!(sigma.windows(2).all(|w| w[0] >= w[1]), "{sigma:?}");
        let rebuilt = &u * DMatrix::from_diagonal(&sigma.clone().into()) * &v_t;
        let scale = m.norm().max(1.0);
        assert!((rebuilt - m).norm() < 1e-13 * scale, "UΣVᵀ ≠ M for {m}");
        let energy: f64 = sigma.iter().map(|s| s * s).sum();
        assert!((energy - m.norm_squared()).abs() < 1e-12 * scale * scale);
        // The singular vectors of the non-zero singular values are orthonormal.
        let r = sigma.iter().filter(|s| **s > 1e-12 * scale).count();
        let (u_r, v_r) = (u.columns(0, r), v_t.rows(0, r));
        assert!((u_r.transpose() * u_r - DMatrix::identity(r, r)).norm() < 1e-12);
        assert!((v_r * v_r.transpose() - DMatrix::identity(r, r)).norm() < 1e-12);
        sigma
    }

    #[test]
    fn inputs_that_break_nalgebra_svd_decompose_exactly() {
        // All-ones L×K is 1·1ᵀ: one singular value √(L·K) (nalgebra#1172 fails 231 of these
        // shapes up to 30×30).
        for rows in 1..=12 {
            for cols in 1..=12 {
                let sigma = check(&DMatrix::from_element(rows, cols, 1.0));
                assert!((sigma[0] - ((rows * cols) as f64).sqrt()).abs() < 1e-12);
                assert!(sigma[1..].iter().all(|s| *s < 1e-12));
            }
        }
        // Full rank, condition ≈ 3.16, Σσ² = ‖M‖² = 21.
        check(&DMatrix::from_row_slice(
            3,
            3,
            &[1.0, 2.0, 2.0, 2.0, -1.0, -1.0, 2.0, 1.0, -1.0],
        ));
    }

    #[test]
    fn hand_computed_and_degenerate_cases() {
        // [[3, 0], [4, 5]]: MᵀM = [[25, 20], [20, 25]], σ² = 45 and 5.
        let sigma = check(&DMatrix::from_row_slice(2, 2, &[3.0, 0.0, 4.0, 5.0]));
        assert!((sigma[0] - 45f64.sqrt()).abs() < 1e-14 && (sigma[1] - 5f64.sqrt()).abs() < 1e-14);
        check(&DMatrix::zeros(3, 2));
        check(&DMatrix::from_row_slice(1, 3, &[0.0, -2.0, 0.0]));
        // A wide rank-2 product with tiny and huge scales.
        let b = DMatrix::from_fn(4, 2, |r, c| ((r + 2 * c) as f64).sin());
        let a = DMatrix::from_fn(2, 9, |r, c| ((3 * r + c) as f64).cos());
        for scale in [1e-8, 1.0, 1e8] {
            let sigma = check(&(&b * &a * scale));
            assert!(sigma[2] < 1e-13 * sigma[0]);
        }
    }
}
