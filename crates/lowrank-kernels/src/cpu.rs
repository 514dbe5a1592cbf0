//! Shared CPU plumbing: contiguous f32 slices out of candle storage, a safe wrapper over the
//! `gemm` crate, and SIMD-friendly reductions.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Shape, Storage, StorageRef, Tensor};
pub(crate) use lowrank_quant::sgemm::{sgemm, sgemm_xwt, Mat};

/// The contiguous f32 data of a custom op's input.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: expects f32 tensors, got {:?}", s.dtype())
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op}: expects a contiguous tensor")
    };
    Ok(&v[start..end])
}

/// A read guard on a CPU f32 tensor's contiguous data (for backward passes and tensors that an
/// op captures instead of taking as an argument).
pub(crate) struct View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl View<'_> {
    pub(crate) fn get(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            _ => unreachable!("checked in view()"),
        }
    }
}

/// Borrows `t`'s data; `t` must be a contiguous f32 CPU tensor.
pub(crate) fn view<'a>(t: &'a Tensor, op: &str) -> Result<View<'a>> {
    let (guard, layout) = t.storage_and_layout();
    match &*guard {
        Storage::Cpu(CpuStorage::F32(_)) => {}
        Storage::Cpu(s) => bail!("{op}: expects f32 tensors, got {:?}", s.dtype()),
        _ => bail!(
            "{op}: has only a CPU implementation so far (tensor on {:?})",
            t.device().location()
        ),
    }
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: expects a contiguous tensor")
    };
    Ok(View { guard, start, end })
}

/// The rank r of LoRA factors A (r × in) and B (out × r) for a weight of shape (out, in), or
/// an error naming `op` and the shapes when they do not fit.
pub(crate) fn factor_rank(
    op: &str,
    a: &Tensor,
    b: &Tensor,
    (out_f, in_f): (usize, usize),
) -> Result<usize> {
    let r = a.dims().first().copied().unwrap_or(0);
    if a.dims() != [r, in_f] || b.dims() != [out_f, r] {
        bail!(
            "{op}: a {:?}, b {:?} do not fit a weight of shape {:?}",
            a.dims(),
            b.dims(),
            (out_f, in_f)
        )
    }
    Ok(r)
}

/// Fails unless `t` is on the CPU (for ops whose forward reads captured tensors).
pub(crate) fn require_cpu(t: &Tensor, op: &str) -> Result<()> {
    if !t.device().is_cpu() {
        bail!(
            "{op}: has only a CPU implementation so far (tensor on {:?})",
            t.device().location()
        )
    }
    Ok(())
}

/// (rows, features) of a tensor whose last dimension is the feature axis: the linear ops take
/// (..., in) inputs as they are, because a reshape to 2-D and back would add two nodes to the
/// autograd graph, and candle's backward materialises a zeroed gradient and an add for each.
pub(crate) fn rows_and_features(shape: &Shape, op: &str) -> Result<(usize, usize)> {
    match shape.dims().last() {
        Some(&f) if f > 0 => Ok((shape.elem_count() / f, f)),
        _ => bail!("{op}: expects a tensor with a non-empty last dimension, got {shape:?}"),
    }
}

/// `shape` with its last dimension replaced by `features`.
pub(crate) fn with_features(shape: &Shape, features: usize) -> Shape {
    let mut dims = shape.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = features;
    }
    Shape::from(dims)
}

/// The LoRA term of a run of streamed rows: the run's rows of B (rows × r, row-major) and
/// scale·A·x (r). Row k's B[k]·(scale·A·x) is added into the same eight-lane sums as its W·x
/// (two FMAs for r = 16), so the B term needs no horizontal sum of its own.
pub(crate) type RunTail<'a> = Option<(&'a [f32], &'a [f32])>;

/// Σ a·b. Long slices take an AVX2+FMA path when the CPU has it (the build targets baseline
/// x86-64, where the portable loop compiles to 4-wide SSE without FMA).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if a.len() >= 64 && has_avx2_fma() {
            // SAFETY: the CPU supports the features `dot_avx2` is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// How far ahead of a streamed row's reads [`streamed_rows`] asks for memory: the hardware
/// prefetchers alone leave each core short of the bandwidth it can draw.
pub(crate) const STREAM_AHEAD_BYTES: usize = 2048;

/// y[k] = w[k]·x (+ B[k]·(scale·A·x) from `tail`) for each row k of `w` (row-major, x.len()
/// wide): a run of a weight that is read once, row after row, from memory (batch-1
/// decoding, which must keep up with memory bandwidth). Each row's reads also ask for the
/// bytes [`STREAM_AHEAD_BYTES`] past them, the rows that follow.
///
/// One call per run rather than per row: when memory is fast, each core's streaming is what
/// limits decoding, and the instructions around each row count.
pub(crate) fn streamed_rows(w: &[f32], x: &[f32], y: &mut [f32], tail: RunTail) {
    check_run("streamed_rows", w.len(), x, y, tail);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports the features `streamed_rows_avx2` is compiled for.
            return unsafe { streamed_rows_avx2(w, x, y, tail) };
        }
    }
    streamed_rows_portable(w, x, y, tail)
}

/// Panics unless the run's weight holds y.len() rows of x.len() values (`w_len` of them) and
/// its B y.len() rows of ax.len(): the SIMD paths read by pointer within those bounds.
pub(crate) fn check_run(kernel: &str, w_len: usize, x: &[f32], y: &[f32], tail: RunTail) {
    assert_eq!(
        w_len,
        y.len() * x.len(),
        "{kernel}: w is not y.len() rows of x"
    );
    if let Some((b, ax)) = tail {
        assert_eq!(
            b.len(),
            y.len() * ax.len(),
            "{kernel}: B is not y.len() rows of ax"
        );
    }
}

/// [`streamed_rows`] without SIMD intrinsics (and without prefetching).
fn streamed_rows_portable(w: &[f32], x: &[f32], y: &mut [f32], tail: RunTail) {
    rows_with(w, x, y, tail, dot_portable)
}

/// y[k] = row_dot(w[k], x) + B[k]·ax, one row at a time: the portable loop of the streamed
/// rows, f32 or bf16.
pub(crate) fn rows_with<T>(
    w: &[T],
    x: &[f32],
    y: &mut [f32],
    tail: RunTail,
    row_dot: impl Fn(&[T], &[f32]) -> f32,
) {
    let in_f = x.len();
    let r = tail.map_or(0, |(_, ax)| ax.len());
    for (k, y) in y.iter_mut().enumerate() {
        *y = row_dot(&w[k * in_f..(k + 1) * in_f], x)
            + tail.map_or(0.0, |(b, ax)| dot_portable(&b[k * r..(k + 1) * r], ax));
    }
}

/// Asks the CPU to load the cache line at `p` (a hint: it cannot fault, so `p` may lie past
/// the end of the data being read).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_line<T>(p: *const T) {
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()) }
}

/// Asks for the cache line at `p` into L2 only. The skinny GEMM's blocks ask for the next
/// rows of W this way: with AVX-512 on a Zen 4 (32 KB L1D) eight rows of X (18 KB at 576
/// features), the rows of W being read and the next ones asked into L1 did not fit, and an
/// eight-row f32 step took 33–40 ms against 23–29 with the next rows asked into L2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_line_l2<T>(p: *const T) {
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast()) }
}

/// Whether this x86-64 CPU has AVX2 and FMA (std caches the answer).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether this x86-64 CPU has AVX-512F (std caches the answer).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Whether this x86-64 CPU has AVX-512F and VL (every AVX-512 CPU since Skylake-SP).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512f_vl() -> bool {
    has_avx512f() && std::arch::is_x86_feature_detected!("avx512vl")
}

/// Eight independent accumulators, so the loop vectorises without fast-math. Called directly
/// for short vectors (a rank-r row), where the SIMD dispatch would cost more than the work.
#[inline(always)]
pub(crate) fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// [`dot`] on AVX2: [`dot_sums`], without streaming.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (sums, vectorised) = dot_sums::<false>(a.as_ptr(), b.as_ptr(), n);
    // The lanes summed in order, then the rest one by one: training's sums stay bit for bit
    // what they were before the streamed rows' shuffled sum (`sum_lanes`), and with them the
    // demo's documented runs.
    let mut lanes = [0f32; 8];
    std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), sums);
    let mut s = lanes.iter().sum::<f32>();
    for k in vectorised..n {
        s += a[k] * b[k];
    }
    s
}

/// Σ a·b over the first multiple of eight of n floats, as eight lanes of sums, and that
/// multiple: four 8-wide FMA chains (32 floats per iteration) hide the FMA latency. With
/// `STREAM`, each iteration also asks for the two cache lines [`STREAM_AHEAD_BYTES`] past its
/// reads of `a`.
///
/// # Safety
/// `a` and `b` must each point at n readable f32s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_sums<const STREAM: bool>(
    a: *const f32,
    b: *const f32,
    n: usize,
) -> (std::arch::x86_64::__m256, usize) {
    use std::arch::x86_64::*;
    const AHEAD: usize = STREAM_AHEAD_BYTES / 4;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        if STREAM {
            prefetch_line(a.wrapping_add(i + AHEAD));
            prefetch_line(a.wrapping_add(i + AHEAD + 16));
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            let av = _mm256_loadu_ps(a.add(i + 8 * j));
            *acc = _mm256_fmadd_ps(av, _mm256_loadu_ps(b.add(i + 8 * j)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc[0]);
        i += 8;
    }
    let sums = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    (sums, i)
}

/// [`streamed_rows`]: each row's dot as [`dot_sums`] streams it, its B row's products added
/// into the same sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn streamed_rows_avx2(w: &[f32], x: &[f32], y: &mut [f32], tail: RunTail) {
    let n = x.len();
    let r = tail.map_or(0, |(_, ax)| ax.len());
    for (k, y) in y.iter_mut().enumerate() {
        // SAFETY: w holds y.len() rows of n (and B y.len() rows of r), checked by the caller.
        let row = w.as_ptr().add(k * n);
        let (mut sums, vectorised) = dot_sums::<true>(row, x.as_ptr(), n);
        let mut rest = 0.0;
        for (j, xj) in x.iter().enumerate().skip(vectorised) {
            rest += *row.add(j) * xj;
        }
        if let Some((b, ax)) = tail {
            rest += add_tail_row(&mut sums, b.as_ptr().add(k * r), ax);
        }
        *y = sum_lanes(sums) + rest;
    }
}

/// Adds B·ax into eight lanes of sums, eight products at a time, for the B row at `b_row`
/// (ax.len() values), and returns the sum of what is left past a multiple of eight (nothing
/// for r = 8, 16, 32…).
///
/// # Safety
/// `b_row` must point at ax.len() readable f32s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn add_tail_row(
    sums: &mut std::arch::x86_64::__m256,
    b_row: *const f32,
    ax: &[f32],
) -> f32 {
    use std::arch::x86_64::*;
    let (r, pax) = (ax.len(), ax.as_ptr());
    let mut j = 0;
    while j + 8 <= r {
        *sums = _mm256_fmadd_ps(
            _mm256_loadu_ps(b_row.add(j)),
            _mm256_loadu_ps(pax.add(j)),
            *sums,
        );
        j += 8;
    }
    let mut rest = 0.0;
    while j < r {
        rest += *b_row.add(j) * *pax.add(j);
        j += 1;
    }
    rest
}

/// Lane t of the result = the sum of a[t]'s sixteen lanes: the sixteen horizontal sums in 45
/// shuffles and adds instead of about 8 × 16, halving the vectors at each step (128-bit
/// quarters, then pairs of floats, then floats), and a last permute into a's order. Each sum
/// is added in `_mm512_reduce_add_ps`'s order (lanes i and i + 8, then i + 4, i + 2, i + 1),
/// so lane t is that of `_mm512_reduce_add_ps(a[t])` bit for bit.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn sum_lanes_16(a: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // b[i], quarter q: a[2i] (q = 0, 1) or a[2i + 1] (q = 2, 3), its quarters q and q + 2 added.
    let b: [__m512; 8] = std::array::from_fn(|i| {
        let (x, y) = (a[2 * i], a[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
        )
    });
    // c[i], quarter q: the four partial sums of a[4i + q].
    let c: [__m512; 4] = std::array::from_fn(|i| {
        let (x, y) = (b[2 * i], b[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
        )
    });
    // Within each quarter q, pairs, then single floats: element e = the sum of a[4e + q].
    let pair =
        |x: __m512, y: __m512| _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    let (e01, e23) = (pair(c[0], c[1]), pair(c[2], c[3]));
    let g = _mm512_add_ps(
        _mm512_shuffle_ps::<0b01_00_01_00>(e01, e23),
        _mm512_shuffle_ps::<0b11_10_11_10>(e01, e23),
    );
    // g holds the sum of a[4e + q] at 4q + e; lane t = 4e + q comes from 4(t % 4) + t / 4.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, g)
}

/// The sum of eight lanes, by shuffles (no store and reload).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn sum_lanes(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
}

/// Asks the CPU to start loading `data` into cache (a hint: no effect on results).
#[inline]
pub(crate) fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        prefetch_line(line.as_ptr());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Asks for every cache line of `data` into L2 (see [`prefetch_line_l2`]).
pub(crate) fn prefetch_l2(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        prefetch_line_l2(line.as_ptr());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// y[k] += scale·M[k]·v for a small row-major M (y.len() × v.len()), all rows at once.
pub(crate) fn add_scaled_matvec(y: &mut [f32], m: &[f32], v: &[f32], scale: f32) {
    debug_assert_eq!(m.len(), y.len() * v.len());
    #[cfg(target_arch = "x86_64")]
    {
        if v.len().is_multiple_of(8) && !v.is_empty() && has_avx2_fma() {
            // SAFETY: the CPU supports the features the kernel is compiled for.
            return unsafe { add_scaled_matvec_avx2(y, m, v, scale) };
        }
    }
    for (y, row) in y.iter_mut().zip(m.chunks_exact(v.len().max(1))) {
        *y += scale * dot_portable(row, v);
    }
}

/// Eight rows at a time: each row's products summed in an 8-lane register, then the eight
/// registers reduced together by a tree of horizontal adds (no per-row horizontal sum). Also
/// A·x of an unmerged LoRA (r rows as long as x), where the eight chains hide the FMA latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_scaled_matvec_avx2(y: &mut [f32], m: &[f32], v: &[f32], scale: f32) {
    use std::arch::x86_64::*;
    let r = v.len();
    let full = y.len() / 8 * 8;
    let factor = _mm256_set1_ps(scale);
    for base in (0..full).step_by(8) {
        let mut acc = [_mm256_setzero_ps(); 8];
        let rows = m[base * r..(base + 8) * r].as_ptr();
        // The eight rows side by side: eight independent FMA chains, and v loaded once.
        for j in (0..r).step_by(8) {
            // SAFETY: j + 8 ≤ r keeps every load inside its row of the block and inside v.
            let vj = _mm256_loadu_ps(v.as_ptr().add(j));
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(rows.add(k * r + j)), vj, *acc);
            }
        }
        let h01 = _mm256_hadd_ps(acc[0], acc[1]);
        let h23 = _mm256_hadd_ps(acc[2], acc[3]);
        let h45 = _mm256_hadd_ps(acc[4], acc[5]);
        let h67 = _mm256_hadd_ps(acc[6], acc[7]);
        let h0123 = _mm256_hadd_ps(h01, h23);
        let h4567 = _mm256_hadd_ps(h45, h67);
        // Lanes 0–3 of h0123 hold rows 0–3's sums over their low four products, lanes 4–7
        // over their high four; h4567 the same for rows 4–7.
        let low = _mm256_permute2f128_ps::<0x20>(h0123, h4567);
        let high = _mm256_permute2f128_ps::<0x31>(h0123, h4567);
        let sums = _mm256_add_ps(low, high);
        // SAFETY: base + 8 ≤ y.len().
        let out = y.as_mut_ptr().add(base);
        _mm256_storeu_ps(out, _mm256_fmadd_ps(sums, factor, _mm256_loadu_ps(out)));
    }
    for (y, row) in y[full..].iter_mut().zip(m[full * r..].chunks_exact(r)) {
        *y += scale * dot_portable(row, v);
    }
}

/// Σ a², vectorisable.
#[inline]
pub(crate) fn sum_sq(a: &[f32]) -> f32 {
    dot(a, a)
}

/// Σ a·b·c, vectorisable.
#[inline]
pub(crate) fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n8 = a.len() / 8 * 8;
    for ((x, y), z) in a[..n8]
        .chunks_exact(8)
        .zip(b[..n8].chunks_exact(8))
        .zip(c[..n8].chunks_exact(8))
    {
        for i in 0..8 {
            acc[i] += x[i] * y[i] * z[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in n8..a.len() {
        s += a[i] * b[i] * c[i];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sixteen sums at once are `_mm512_reduce_add_ps`'s, bit for bit, and in a's order:
    /// values of very different sizes, so another order of additions rounds differently.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sum_lanes_16_adds_as_reduce_add() {
        use std::arch::x86_64::*;
        if !has_avx512f() {
            return;
        }
        let value = |i: usize| ((i * 7919 % 2003) as f32 - 1001.0) * 10f32.powi((i % 9) as i32 - 4);
        let vectors: [[f32; 16]; 16] =
            std::array::from_fn(|t| std::array::from_fn(|l| value(16 * t + l)));
        // SAFETY: the CPU has AVX-512F; each array is 16 floats.
        let (got, want) = unsafe {
            let a = vectors.map(|v| _mm512_loadu_ps(v.as_ptr()));
            let mut got = [0f32; 16];
            _mm512_storeu_ps(got.as_mut_ptr(), sum_lanes_16(a));
            (got, a.map(|v| _mm512_reduce_add_ps(v)))
        };
        let sequential: Vec<f32> = vectors.iter().map(|v| v.iter().sum()).collect();
        assert_ne!(sequential, want, "the values do not tell the orders apart");
        for t in 0..16 {
            assert_eq!(
                got[t].to_bits(),
                want[t].to_bits(),
                "lane {t}: {} vs {}",
                got[t],
                want[t]
            );
        }
    }

    /// Each row's w·x + B·ax against f64, on the SIMD path and the portable one: rows whose
    /// length leaves remainders past 32 and past 8, B rows of multiples of eight and not, no
    /// B term, and runs of zero to three rows.
    #[test]
    fn streamed_rows_match_f64() {
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 31 + seed * 17) % 97) as f32 - 48.0) / 24.0)
                .collect()
        };
        let exact = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
        };
        for rows in [0, 1, 3] {
            for n in [0, 5, 63, 64, 100, 576] {
                let (w, x) = (values(rows * n, 1), values(n, 2));
                for r in [None, Some(3), Some(8), Some(13), Some(16)] {
                    let b = values(rows * r.unwrap_or(0), 3);
                    let ax = values(r.unwrap_or(0), 4);
                    let tail = r.map(|_| (b.as_slice(), ax.as_slice()));
                    let want: Vec<f64> = (0..rows)
                        .map(|k| {
                            let rk = r.unwrap_or(0);
                            exact(&w[k * n..(k + 1) * n], &x) + exact(&b[k * rk..(k + 1) * rk], &ax)
                        })
                        .collect();
                    let mut fast = vec![f32::NAN; rows];
                    streamed_rows(&w, &x, &mut fast, tail);
                    let mut portable = vec![f32::NAN; rows];
                    streamed_rows_portable(&w, &x, &mut portable, tail);
                    for (k, want) in want.iter().enumerate() {
                        for (path, got) in [("streamed", fast[k]), ("portable", portable[k])] {
                            assert!(
                                (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{path}: rows={rows} n={n} r={r:?} row {k}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// y + s·M·v against an f64 reference: rows around the eight-row blocks (and their
    /// tail), row lengths the AVX2 path takes (multiples of 8) and ones it leaves to the loop.
    #[test]
    fn scaled_matvec_matches_f64() {
        for rows in [0, 1, 7, 8, 9, 16, 37] {
            // Short rows (B's, r long) and long ones (A's, as long as x).
            for r in [4, 8, 12, 16, 24, 150, 576] {
                let m: Vec<f32> = (0..rows * r)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                    .collect();
                let v: Vec<f32> = (0..r)
                    .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
                    .collect();
                let y0: Vec<f32> = (0..rows).map(|i| i as f32 * 0.25 - 1.0).collect();
                let mut y = y0.clone();
                add_scaled_matvec(&mut y, &m, &v, 0.7);
                for k in 0..rows {
                    let dot: f64 = (0..r).map(|j| m[k * r + j] as f64 * v[j] as f64).sum();
                    let want = y0[k] as f64 + 0.7 * dot;
                    let tol = 1e-5 * (1.0 + want.abs()) * (r as f64).sqrt();
                    assert!(
                        (y[k] as f64 - want).abs() < tol,
                        "rows {rows} r {r} row {k}: {} vs {want}",
                        y[k]
                    );
                }
            }
        }
    }

    /// The SIMD path and the portable loop agree with an f64 sum at every length around the
    /// unroll boundaries.
    #[test]
    fn dot_paths_agree() {
        for n in [0, 1, 7, 8, 31, 32, 63, 64, 65, 95, 96, 100, 577, 1536] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
                .collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let tol = 1e-5 * (1.0 + exact.abs()) * (n as f64).sqrt().max(1.0);
            assert!((dot(&a, &b) as f64 - exact).abs() < tol, "n={n}");
            assert!((dot_portable(&a, &b) as f64 - exact).abs() < tol, "n={n}");
        }
    }
}
