//! The one f32 GEMM wrapper of the workspace: `gemm::gemm` (the packed kernels candle's CPU
//! matmul uses) behind a safe function that checks every operand's bounds. This crate's 4-bit
//! matmul and `lowrank-kernels` use it.

/// A row-major or strided matrix operand: data and (row stride, column stride).
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn t(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
}

/// Rows of x up to which [`sgemm_xwt`] runs on [`crate::tiled`]'s engine where the CPU has
/// AVX-512F. Zen 4, 2 threads, SmolLM-135M's four shapes: at 64–256 rows it ran 1.0–3.7× the
/// `gemm` crate (which packs W for every call), except a 192-row W at 256 rows (0.85–1.0);
/// at 512 rows the two were even, at 1024 and 4096 the `gemm` crate was 10–35% faster.
pub const TILED_MAX_ROWS: usize = 384;

/// dst (m×n, row stride `dst_rs`) = x · wᵀ for row-major x (m×k) and w (n×k): a linear
/// layer's product (w holds one output per row), on the rayon pool.
pub fn sgemm_xwt(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    x: &[f32],
    w: &[f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let w = crate::tiled::Broadcast::InPlace(crate::tiled::Rows::f32(w, n, k, k));
        if tiled_xwt((m, n, k), dst, dst_rs, x, w) {
            return;
        }
    }
    sgemm(
        m,
        n,
        k,
        dst,
        dst_rs,
        Mat::rows(x, k),
        Mat::t(w, k),
        1.0,
        false,
        true,
    );
}

/// dst (m×n, row stride `dst_rs`) = x · wᵀ where w's rows are made as they are needed:
/// `fill(first, count, out)` writes rows first..first + count of w (k values each) into out.
/// Each of the tiled engine's tasks makes its twelve rows once for all of x (a 4-bit W
/// decoded). Returns false, having done nothing, where that engine does not
/// run (no AVX-512F, or more than [`TILED_MAX_ROWS`] rows): the caller then makes W in tiles
/// for [`sgemm_xwt`].
pub fn sgemm_xwt_made(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    x: &[f32],
    fill: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) -> bool {
    #[cfg(target_arch = "x86_64")]
    return tiled_xwt(
        (m, n, k),
        dst,
        dst_rs,
        x,
        crate::tiled::Broadcast::Made {
            rows: n,
            steps: k,
            fill,
        },
    );
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, dst, dst_rs, x, fill);
        false
    }
}

/// x · wᵀ on the tiled engine, x's rows packed, w's rows from `w`; false, having done nothing,
/// where the engine does not run (no AVX-512F, or more than [`TILED_MAX_ROWS`] rows).
#[cfg(target_arch = "x86_64")]
fn tiled_xwt(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    x: &[f32],
    w: crate::tiled::Broadcast,
) -> bool {
    use crate::tiled::{run, Dst, Kernel};
    if m > TILED_MAX_ROWS || k == 0 || !Kernel::F32.available() {
        return false;
    }
    if m > 0 && n > 0 {
        assert!(x.len() >= m * k, "gemm: lhs too small");
        let dst = Dst::new(dst, (m, n), dst_rs, 1);
        run(Kernel::F32, (m, n), pack_rows(x, k), w, &dst, false);
    }
    true
}

/// The tiled engine's `pack` for row-major x (rows of k values).
#[cfg(target_arch = "x86_64")]
fn pack_rows(x: &[f32], k: usize) -> impl Fn(usize, usize, usize, &mut [u32]) + Sync + '_ {
    move |first, count, width, out| {
        crate::tiled::pack_lanes(count, k, width, out, |i, lane| {
            for (b, v) in lane.iter_mut().zip(&x[(first + i) * k..][..k]) {
                *b = v.to_bits();
            }
        })
    }
}

/// dst (m×n, row-major with row stride `dst_rs`) = [dst +] alpha · lhs (m×k) · rhs (k×n).
/// `parallel` lets gemm use the rayon pool (leave it off inside a rayon task).
///
/// # Panics
/// When an operand's slice is too short for its shape and strides: a caller's bug, which would
/// otherwise be an out-of-bounds access inside gemm.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm: dst too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        (m - 1) * lhs.rs + (k - 1) * lhs.cs < lhs.data.len(),
        "gemm: lhs too small"
    );
    assert!(
        (k - 1) * rhs.rs + (n - 1) * rhs.cs < rhs.data.len(),
        "gemm: rhs too small"
    );
    let par = if parallel && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index gemm touches inside the three slices, and
    // `dst` is borrowed mutably so it cannot alias the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both paths of `sgemm_xwt` (the tiled engine where the CPU has it, up to
    /// TILED_MAX_ROWS rows; the `gemm` crate above) against f64, over shapes off every tile
    /// and chunk size, into a wider dst whose other columns stay untouched.
    #[test]
    fn xwt_matches_f64() {
        let value = |i: usize, s: usize| ((i * 7919 + s * 104_729) % 2003) as f32 / 1001.0 - 1.0;
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 13, 15),
            (17, 25, 16),
            (33, 12, 130),
            (100, 37, 300),
            (TILED_MAX_ROWS, 20, 33),
            (TILED_MAX_ROWS + 1, 14, 40),
        ] {
            let x: Vec<f32> = (0..m * k).map(|i| value(i, 1)).collect();
            let w: Vec<f32> = (0..n * k).map(|i| value(i, 2)).collect();
            let rs = n + 3;
            let mut dst = vec![7f32; m * rs];
            sgemm_xwt(m, n, k, &mut dst, rs, &x, &w);
            for i in 0..m {
                for j in 0..rs {
                    let got = dst[i * rs + j];
                    if j >= n {
                        assert_eq!(got, 7.0, "{m}x{n}x{k}: column {j} was written");
                        continue;
                    }
                    let want: f64 = (0..k)
                        .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                        .sum();
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * k as f64,
                        "{m}x{n}x{k} ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
