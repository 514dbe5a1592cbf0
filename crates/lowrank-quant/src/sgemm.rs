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
