//! Rows of bf16 weights dotted with an f32 vector, accumulated in f32, streamed from memory as
//! `cpu::streamed_rows` streams f32 rows. X is f32, so `vdpbf16ps` does not apply: each bf16 is
//! widened to f32 in registers (a 16-bit shift: `vpmovzxwd` + `vpslld`) and accumulated with
//! f32 FMAs, sixteen lanes wide with AVX-512, else eight with AVX2, picked at run time, with a
//! portable fallback.

use half::bf16;

use crate::cpu::{check_run, rows_with, RunTail};

/// Σ bf16(w)·x in f32, eight lanes at a time.
fn dot_bf16_portable(w: &[bf16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (cw, cx) = (w.chunks_exact(8), x.chunks_exact(8));
    let (rw, rx) = (cw.remainder(), cx.remainder());
    for (w, x) in cw.zip(cx) {
        for i in 0..8 {
            acc[i] += f32::from_bits((w[i].to_bits() as u32) << 16) * x[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (w, x) in rw.iter().zip(rx) {
        s += w.to_f32() * x;
    }
    s
}

/// y[k] = bf16(w[k])·x (+ B[k]·(scale·A·x) from `tail`) in f32 for each row k of `w`
/// (row-major, x.len() wide), streamed from memory as `cpu::streamed_rows` streams f32 rows:
/// one call per run, each row's reads asking for the bytes `STREAM_AHEAD_BYTES` past them.
pub(crate) fn streamed_rows_bf16(w: &[bf16], x: &[f32], y: &mut [f32], tail: RunTail) {
    check_run("streamed_rows_bf16", w.len(), x, y, tail);
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx512f() && crate::cpu::has_avx2_fma() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { streamed_rows_bf16_avx512(w, x, y, tail) };
        }
        if crate::cpu::has_avx2_fma() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { streamed_rows_bf16_avx2(w, x, y, tail) };
        }
    }
    streamed_rows_bf16_portable(w, x, y, tail)
}

/// [`streamed_rows_bf16_avx2`] sixteen lanes wide: each 64 values (two cache lines of w)
/// widened by four zero-extensions and shifts into four 16-lane FMA chains. Half the
/// instructions per line of the eight-lane loop, which on a Zen 5 read bf16 rows at 43–51 GB/s
/// while the host's probe read 77: one-row bf16 steps 167–169 → 183–188 tokens/s (`step_rows
/// MODEL 128 1 bf16`, four alternating runs). The f32 rows, which need no widening, were no
/// faster sixteen lanes wide (84–94 against 81–106 tokens/s), so `cpu::streamed_rows` stays
/// eight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn streamed_rows_bf16_avx512(w: &[bf16], x: &[f32], y: &mut [f32], tail: RunTail) {
    use crate::cpu::{add_tail_row, prefetch_line, sum_lanes, STREAM_AHEAD_BYTES};
    use std::arch::x86_64::*;
    const AHEAD: usize = STREAM_AHEAD_BYTES / 2;
    let n = x.len();
    let r = tail.map_or(0, |(_, ax)| ax.len());
    let px = x.as_ptr();
    for (k, y) in y.iter_mut().enumerate() {
        // SAFETY (all loads from `row`): w holds y.len() rows of n, and i + 64 ≤ n, resp.
        // i + 16 ≤ n, keeps each load inside row k and inside x.
        let row = w.as_ptr().add(k * n) as *const u16;
        let widen = |i: usize| {
            let half = _mm256_loadu_si256(row.add(i) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
        };
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            prefetch_line(row.wrapping_add(i + AHEAD));
            prefetch_line(row.wrapping_add(i + 32 + AHEAD));
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc =
                    _mm512_fmadd_ps(widen(i + 16 * j), _mm512_loadu_ps(px.add(i + 16 * j)), *acc);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps(widen(i), _mm512_loadu_ps(px.add(i)), acc[0]);
            i += 16;
        }
        let mut rest = 0.0;
        for (wj, xj) in w[k * n + i..(k + 1) * n].iter().zip(&x[i..]) {
            rest += wj.to_f32() * xj;
        }
        let mut tail_sums = _mm256_setzero_ps();
        if let Some((b, ax)) = tail {
            rest += add_tail_row(&mut tail_sums, b.as_ptr().add(k * r), ax);
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        *y = _mm512_reduce_add_ps(sum) + sum_lanes(tail_sums) + rest;
    }
}

/// [`streamed_rows_bf16`] without SIMD intrinsics (and without prefetching).
fn streamed_rows_bf16_portable(w: &[bf16], x: &[f32], y: &mut [f32], tail: RunTail) {
    rows_with(w, x, y, tail, dot_bf16_portable)
}

/// Each bf16 widened in registers (zero-extend to 32 bits, shift left 16) and accumulated by
/// four 8-wide FMA chains, so the FMA latency does not bound the loop; each iteration (one
/// cache line of w) also asks for the line `STREAM_AHEAD_BYTES` past it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn streamed_rows_bf16_avx2(w: &[bf16], x: &[f32], y: &mut [f32], tail: RunTail) {
    use crate::cpu::{add_tail_row, prefetch_line, sum_lanes, STREAM_AHEAD_BYTES};
    use std::arch::x86_64::*;
    const AHEAD: usize = STREAM_AHEAD_BYTES / 2;
    let n = x.len();
    let r = tail.map_or(0, |(_, ax)| ax.len());
    let px = x.as_ptr();
    let widen = |p: *const u16| {
        // SAFETY: callers pass p with 8 readable u16s.
        let half = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(half)))
    };
    for (k, y) in y.iter_mut().enumerate() {
        // SAFETY (all loads from `row`): w holds y.len() rows of n, and i + 32 ≤ n, resp.
        // i + 8 ≤ n, keeps each load inside row k and inside x.
        let row = w.as_ptr().add(k * n) as *const u16;
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            prefetch_line(row.wrapping_add(i + AHEAD));
            for (j, acc) in acc.iter_mut().enumerate() {
                let wv = widen(row.add(i + 8 * j));
                *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(i + 8 * j)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(widen(row.add(i)), _mm256_loadu_ps(px.add(i)), acc[0]);
            i += 8;
        }
        let mut rest = 0.0;
        for (wj, xj) in w[k * n + i..(k + 1) * n].iter().zip(&x[i..]) {
            rest += wj.to_f32() * xj;
        }
        if let Some((b, ax)) = tail {
            rest += add_tail_row(&mut acc[1], b.as_ptr().add(k * r), ax);
        }
        *y = sum_lanes(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        )) + rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of bf16 weights (with and without a B term, r a multiple of eight and not) on
    /// the SIMD and portable paths against an f64 sum, at row lengths around the unroll
    /// boundaries.
    #[test]
    fn bf16_row_paths_agree() {
        let rows = 3;
        for n in [0, 5, 8, 31, 32, 40, 77, 576, 1537] {
            let w: Vec<bf16> = (0..rows * n)
                .map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 25.0))
                .collect();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
                .collect();
            for r in [0, 5, 16] {
                let b: Vec<f32> = (0..rows * r).map(|i| (i % 7) as f32 * 0.3 - 1.0).collect();
                let ax: Vec<f32> = (0..r).map(|i| (i % 5) as f32 * 0.2 - 0.4).collect();
                let tail = (r > 0).then_some((b.as_slice(), ax.as_slice()));
                let mut fast = vec![f32::NAN; rows];
                streamed_rows_bf16(&w, &x, &mut fast, tail);
                let mut portable = vec![f32::NAN; rows];
                streamed_rows_bf16_portable(&w, &x, &mut portable, tail);
                let mut paths = vec![("dispatched", fast), ("portable", portable)];
                // Each SIMD width this CPU has, whichever the dispatch picks.
                #[cfg(target_arch = "x86_64")]
                {
                    if crate::cpu::has_avx2_fma() {
                        let mut y = vec![f32::NAN; rows];
                        // SAFETY: the CPU has AVX2+FMA; the shapes are checked above.
                        unsafe { streamed_rows_bf16_avx2(&w, &x, &mut y, tail) };
                        paths.push(("avx2", y));
                    }
                    if crate::cpu::has_avx512f() && crate::cpu::has_avx2_fma() {
                        let mut y = vec![f32::NAN; rows];
                        // SAFETY: as above, with AVX-512F.
                        unsafe { streamed_rows_bf16_avx512(&w, &x, &mut y, tail) };
                        paths.push(("avx512", y));
                    }
                }
                for k in 0..rows {
                    let exact: f64 = (0..n)
                        .map(|j| w[k * n + j].to_f64() * x[j] as f64)
                        .sum::<f64>()
                        + (0..r)
                            .map(|j| b[k * r + j] as f64 * ax[j] as f64)
                            .sum::<f64>();
                    let tol = 1e-5 * (1.0 + exact.abs()) * (n as f64).sqrt().max(1.0);
                    for (path, got) in paths.iter().map(|(p, y)| (p, y[k])) {
                        assert!(
                            (got as f64 - exact).abs() < tol,
                            "{path}: n={n} r={r} row {k}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
