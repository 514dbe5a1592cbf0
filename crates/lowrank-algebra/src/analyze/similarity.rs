//! Subspace similarity between two updates (Hu et al. 2021, "LoRA", §7.2):
//! φ(A₁, A₂, i, j) = ‖U₁,ᵢᵀ U₂,ⱼ‖²_F / min(i, j) ∈ [0, 1], where U₁,ᵢ holds the top i singular
//! vectors of the first update and U₂,ⱼ the top j of the second. 1: the smaller subspace lies in
//! the larger; 0: they are orthogonal.
//!
//! The paper takes the right singular vectors of the A matrices. Here both sides of ΔW = s·B·A
//! are compared, ordered by ΔW's own singular values (not A's): the right singular vectors V
//! (input space; ΔW's row space is A's row space, so this is the paper's subspace) and the left
//! ones U (output space, B's column space). Two random subspaces of dimensions i and j in ℝⁿ have
//! E‖U₁,ᵢᵀU₂,ⱼ‖²_F = i·j/n, so φ's chance level is max(i, j)/n; the reports give it.

use std::collections::BTreeMap;

use nalgebra::DMatrix;

use crate::analyze::report::{ModuleSimilarity, SideSummary, SimilarityGrid, SimilaritySummary};
use crate::analyze::stats::model_order_key;
use crate::{Error, LowRankSvd, Result};

/// φ(i, j) for every i ≤ p₁, j ≤ p₂ (`phi[i-1][j-1]`), from two orthonormal bases given as
/// columns, most important first. ‖U₁,ᵢᵀU₂,ⱼ‖²_F is a 2-D prefix sum of the squared entries of
/// U₁ᵀU₂, so the whole grid costs one p₁×p₂ product.
pub fn subspace_similarity(u1: &DMatrix<f64>, u2: &DMatrix<f64>) -> Result<Vec<Vec<f64>>> {
    if u1.nrows() != u2.nrows() {
        return Err(Error::Invalid(format!(
            "subspaces of different spaces cannot be compared: vectors of length {} and {}",
            u1.nrows(),
            u2.nrows()
        )));
    }
    let overlap = u1.transpose() * u2;
    let (p1, p2) = overlap.shape();
    // prefix[i][j] = Σ_{a<i, b<j} overlap[a, b]².
    let mut prefix = vec![vec![0.0; p2 + 1]; p1 + 1];
    for i in 1..=p1 {
        for j in 1..=p2 {
            prefix[i][j] = overlap[(i - 1, j - 1)].powi(2) + prefix[i - 1][j] + prefix[i][j - 1]
                - prefix[i - 1][j - 1];
        }
    }
    Ok((1..=p1)
        .map(|i| {
            (1..=p2)
                // Round-off can push an exact 1 or 0 just outside [0, 1].
                .map(|j| (prefix[i][j] / i.min(j) as f64).clamp(0.0, 1.0))
                .collect()
        })
        .collect())
}

/// The grid with its headline numbers, for bases in ℝⁿ (n = their length).
pub fn similarity_grid(u1: &DMatrix<f64>, u2: &DMatrix<f64>) -> Result<SimilarityGrid> {
    let phi = subspace_similarity(u1, u2)?;
    let (p1, p2) = (u1.ncols(), u2.ncols());
    let n = u1.nrows().max(1) as f64;
    let corner = |grid: &Vec<Vec<f64>>| {
        grid.last()
            .and_then(|row| row.last())
            .copied()
            .unwrap_or(0.0)
    };
    Ok(SimilarityGrid {
        top_direction: phi
            .first()
            .and_then(|row| row.first())
            .copied()
            .unwrap_or(0.0),
        whole_subspace: corner(&phi),
        random_whole_subspace: (p1.max(p2) as f64 / n).min(1.0),
        phi,
    })
}

/// φ on both sides of ΔW for one module.
pub fn module_similarity(module: &str, a: &LowRankSvd, b: &LowRankSvd) -> Result<ModuleSimilarity> {
    let context = |e: Error| Error::Invalid(format!("{module}: {e}"));
    Ok(ModuleSimilarity {
        module: module.to_string(),
        rank: a.singular_values.len(),
        other_rank: b.singular_values.len(),
        right: similarity_grid(&a.v_t.transpose(), &b.v_t.transpose()).map_err(context)?,
        left: similarity_grid(&a.u, &b.u).map_err(context)?,
    })
}

/// φ for every module both updates have (in model order), the modules only one has, and the
/// means.
pub fn compare_spectra(
    ours: &BTreeMap<String, LowRankSvd>,
    theirs: &BTreeMap<String, LowRankSvd>,
) -> Result<(Vec<ModuleSimilarity>, Vec<String>, SimilaritySummary)> {
    let mut common: Vec<&String> = ours.keys().filter(|k| theirs.contains_key(*k)).collect();
    common.sort_by_key(|k| model_order_key(k));
    let modules = common
        .into_iter()
        .map(|name| module_similarity(name, &ours[name], &theirs[name]))
        .collect::<Result<Vec<_>>>()?;
    let mut unmatched: Vec<String> = ours
        .keys()
        .filter(|k| !theirs.contains_key(*k))
        .chain(theirs.keys().filter(|k| !ours.contains_key(*k)))
        .cloned()
        .collect();
    unmatched.sort_by_key(|k| model_order_key(k));
    let summary = SimilaritySummary {
        modules: modules.len(),
        right: side_summary(modules.iter().map(|m| &m.right)),
        left: side_summary(modules.iter().map(|m| &m.left)),
    };
    Ok((modules, unmatched, summary))
}

fn side_summary<'a>(grids: impl Iterator<Item = &'a SimilarityGrid>) -> SideSummary {
    let grids: Vec<&SimilarityGrid> = grids.collect();
    let mean = |f: fn(&SimilarityGrid) -> f64| {
        if grids.is_empty() {
            0.0
        } else {
            grids.iter().map(|g| f(g)).sum::<f64>() / grids.len() as f64
        }
    };
    SideSummary {
        mean_top_direction: mean(|g| g.top_direction),
        mean_whole_subspace: mean(|g| g.whole_subspace),
        mean_random_whole_subspace: mean(|g| g.random_whole_subspace),
    }
}

/// The cell-wise mean of several φ grids of possibly different sizes (a cell averages the grids
/// that have it): what the heat map draws.
pub fn mean_grid<'a>(grids: impl Iterator<Item = &'a Vec<Vec<f64>>>) -> Vec<Vec<f64>> {
    let mut sum: Vec<Vec<(f64, usize)>> = Vec::new();
    for grid in grids {
        for (i, row) in grid.iter().enumerate() {
            if sum.len() <= i {
                sum.push(Vec::new());
            }
            for (j, v) in row.iter().enumerate() {
                if sum[i].len() <= j {
                    sum[i].push((0.0, 0));
                }
                sum[i][j].0 += v;
                sum[i][j].1 += 1;
            }
        }
    }
    sum.into_iter()
        .map(|row| row.into_iter().map(|(s, n)| s / n as f64).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Factored;

    fn basis(columns: &[&[f64]]) -> DMatrix<f64> {
        let n = columns[0].len();
        DMatrix::from_fn(n, columns.len(), |r, c| columns[c][r])
    }

    #[test]
    fn identical_subspaces_give_one_and_orthogonal_give_zero() {
        let e = |i: usize| {
            let mut v = [0.0; 4];
            v[i] = 1.0;
            v
        };
        let (e0, e1, e2, e3) = (e(0), e(1), e(2), e(3));
        let u = basis(&[&e0, &e1, &e2]);
        for row in subspace_similarity(&u, &u).unwrap() {
            assert!(row.iter().all(|v| (v - 1.0).abs() < 1e-15), "{row:?}");
        }
        let other = basis(&[&e3]);
        let phi = subspace_similarity(&basis(&[&e0, &e1]), &other).unwrap();
        assert!(phi.iter().flatten().all(|v| *v == 0.0));
        assert!(subspace_similarity(&u, &basis(&[&[1.0, 0.0]])).is_err());
    }

    #[test]
    fn a_hand_computed_intermediate_case() {
        // U₁ = [e₀, e₁], U₂ = [(e₀+e₂)/√2, e₁]: U₁ᵀU₂ = [[1/√2, 0], [0, 1]], squares ½ and 1.
        // φ(1,1) = ½, φ(1,2) = ½/1, φ(2,1) = ½/1, φ(2,2) = (½+1)/2 = ¾.
        let h = std::f64::consts::FRAC_1_SQRT_2;
        let u1 = basis(&[&[1.0, 0.0, 0.0], &[0.0, 1.0, 0.0]]);
        let u2 = basis(&[&[h, 0.0, h], &[0.0, 1.0, 0.0]]);
        let phi = subspace_similarity(&u1, &u2).unwrap();
        let expected = [[0.5, 0.5], [0.5, 0.75]];
        for i in 0..2 {
            for j in 0..2 {
                assert!((phi[i][j] - expected[i][j]).abs() < 1e-15, "{phi:?}");
            }
        }
        // One direction at angle θ to another: φ = cos²θ.
        let t: f64 = 0.3;
        let phi =
            subspace_similarity(&basis(&[&[1.0, 0.0]]), &basis(&[&[t.cos(), t.sin()]])).unwrap();
        assert!((phi[0][0] - t.cos().powi(2)).abs() < 1e-15);
        let grid = similarity_grid(&u1, &u2).unwrap();
        assert!((grid.top_direction - 0.5).abs() < 1e-15);
        assert!((grid.whole_subspace - 0.75).abs() < 1e-15);
        assert!((grid.random_whole_subspace - 2.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn swapping_the_updates_transposes_the_grid() {
        let f = |seed: u64, r: usize| {
            let mut state = seed;
            let mut next = move || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            };
            let b = DMatrix::from_fn(7, r, |_, _| next());
            let a = DMatrix::from_fn(r, 6, |_, _| next());
            Factored::new(b, a).unwrap().svd()
        };
        let (x, y) = (f(1, 2), f(2, 3));
        let xy = module_similarity("m", &x, &y).unwrap();
        let yx = module_similarity("m", &y, &x).unwrap();
        for (grid_xy, grid_yx) in [(&xy.right, &yx.right), (&xy.left, &yx.left)] {
            for i in 0..2 {
                for j in 0..3 {
                    assert!((grid_xy.phi[i][j] - grid_yx.phi[j][i]).abs() < 1e-12);
                }
            }
        }
        // Same row space (same A, another B): the right subspaces coincide.
        let a = DMatrix::from_fn(2, 6, |r, c| ((r * 6 + c) as f64).sin());
        let b1 = DMatrix::from_fn(7, 2, |r, c| ((r * 2 + c) as f64).cos());
        let b2 = DMatrix::from_fn(7, 2, |r, c| ((r + 3 * c) as f64).cos() + 0.5);
        let s1 = Factored::new(b1, a.clone()).unwrap().svd();
        let s2 = Factored::new(b2, a).unwrap().svd();
        let sim = module_similarity("m", &s1, &s2).unwrap();
        assert!((sim.right.whole_subspace - 1.0).abs() < 1e-12);
        assert!(sim.left.whole_subspace < 0.999);
    }

    #[test]
    fn mean_grid_averages_the_cells_each_grid_has() {
        let a = vec![vec![1.0, 0.5]];
        let b = vec![vec![0.0], vec![0.2]];
        let m = mean_grid([&a, &b].into_iter());
        assert_eq!(m, vec![vec![0.5, 0.5], vec![0.2]]);
    }
}
