//! The skinny GEMM's block for a bf16 W and X already in bf16 (`--bf16-activations`), for
//! every row count it serves (1 to 64) with AVX512-BF16: `vdpbf16ps` multiplies sixteen pairs of
//! bf16 and adds both products of a pair to an f32 lane, so a block does the multiply-adds of
//! the f32 block in half the instructions and reads W as it is stored (no widening). On a Zen 4
//! it also beat the broadcast blocks from 24 rows on (`step_rows`, bf16 activations, three
//! alternating runs: 24 rows 30–42 ms a step against 61–78, 64 rows 81–113 against 129–170).
//!
//! The products are exact in f32 (8-bit significands), as the f32 block's on the same values;
//! only the order of the sums differs (per lane: a pair's two products, then the chain). The
//! instruction treats subnormal inputs and results as zero, as the prefill's bf16 GEMM does.

use half::bf16;
use std::arch::x86_64::*;

use super::{rows_of, Ahead, Avx512, Lanes, BLOCK_X};

/// Rows of W in a block: 3 × 8 sums, three rows of W and one of X in registers.
const BLOCK_ROWS: usize = 3;
/// Values of a row per step: 32 bf16, sixteen pairs.
const STEP: usize = 32;
/// Blocks ahead whose rows of W a block asks for. A block here takes half the time of the f32
/// block over the same rows, so one block ahead left too little time for the lines to arrive:
/// on the Zen 4 of the kernel notes, eight rows of X took 12.5–14.1 ms a step four blocks ahead
/// against 13.5–16.8 one ahead (`step_rows`, bf16 activations, four alternating runs).
const AHEAD_BLOCKS: usize = 4;

/// Whether this CPU runs [`tile`] (AVX-512F, VL and BF16).
pub(super) fn available() -> bool {
    crate::cpu::has_avx512f_vl() && is_x86_feature_detected!("avx512bf16")
}

/// X's rows (each `in_f` values, all of them bf16) as bf16, for [`tile`]; `None` where
/// [`tile`] cannot take them: this CPU lacks [`available`]'s features, `in_f` is not a multiple
/// of 32, or some value is not a bf16.
pub(super) fn bf16_rows(x: &[f32], in_f: usize) -> Option<Vec<bf16>> {
    if !available() || in_f == 0 || !in_f.is_multiple_of(STEP) || !crate::bf16_gemm::all_bf16(x) {
        return None;
    }
    // Exact: every value is a bf16.
    Some(x.iter().map(|&v| bf16::from_f32(v)).collect())
}

/// tile[o·m + i] += Σ_k w[o·in_f + k]·x[i·in_f + k] for o < rows_out and i < m, x as
/// [`bf16_rows`] gave it; the next rows of w asked for into L2 as each block computes.
///
/// # Safety
/// The CPU must have [`available`]'s features; w holds rows_out rows of in_f values, x m rows,
/// in_f a multiple of 32, and tile rows_out × m values.
#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
pub(super) unsafe fn tile(
    w: &[bf16],
    in_f: usize,
    rows_out: usize,
    x: &[bf16],
    m: usize,
    tile: &mut [f32],
) {
    debug_assert!(w.len() >= rows_out * in_f && x.len() >= m * in_f && tile.len() >= rows_out * m);
    let mut o = 0;
    while o < rows_out {
        let rw = BLOCK_ROWS.min(rows_out - o);
        let wp = w.as_ptr().add(o * in_f);
        let next = Ahead::blocks_ahead(wp, (rw, BLOCK_ROWS), in_f, AHEAD_BLOCKS);
        // Past eight rows of X, a pass per eight over the same three rows of W (in L1).
        let passes = m.div_ceil(BLOCK_X);
        let mut i = 0;
        while i < m {
            let rx = BLOCK_X.min(m - i);
            let ahead = next.share(i / BLOCK_X, passes);
            let xs: [*const bf16; BLOCK_X] =
                std::array::from_fn(|c| x.as_ptr().add((i + c.min(rx - 1)) * in_f));
            let ws = rows_of::<bf16, BLOCK_ROWS>((wp, in_f, rw));
            let sums = match rx {
                8 => widen(block::<8>(ws, xs, in_f, ahead)),
                7 => widen(block::<7>(ws, xs, in_f, ahead)),
                6 => widen(block::<6>(ws, xs, in_f, ahead)),
                5 => widen(block::<5>(ws, xs, in_f, ahead)),
                4 => widen(block::<4>(ws, xs, in_f, ahead)),
                3 => widen(block::<3>(ws, xs, in_f, ahead)),
                2 => widen(block::<2>(ws, xs, in_f, ahead)),
                _ => widen(block::<1>(ws, xs, in_f, ahead)),
            };
            for (r, sums) in sums.iter().enumerate().take(rw) {
                for (c, s) in sums.iter().enumerate().take(rx) {
                    *tile.get_unchecked_mut((o + r) * m + i + c) += s;
                }
            }
            i += rx;
        }
        o += rw;
    }
}

/// A 3 × C block's sums in the full 3 × 8 shape (the rest zero).
#[inline(always)]
fn widen<const C: usize>(s: [[f32; C]; BLOCK_ROWS]) -> [[f32; BLOCK_X]; BLOCK_ROWS] {
    let mut out = [[0f32; BLOCK_X]; BLOCK_ROWS];
    for (o, s) in out.iter_mut().zip(s) {
        o[..C].copy_from_slice(&s);
    }
    out
}

/// Σ_k w[r][k]·x[c][k] for r < 3, c < C: 3·C chains of sixteen f32 lanes, each step one
/// `vdpbf16ps` per pair of rows over 32 values, one horizontal sum per chain at the end.
#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
#[inline]
unsafe fn block<const C: usize>(
    w: [*const bf16; BLOCK_ROWS],
    x: [*const bf16; BLOCK_X],
    len: usize,
    ahead: Ahead,
) -> [[f32; C]; BLOCK_ROWS] {
    let mut acc = [[_mm512_setzero_ps(); C]; BLOCK_ROWS];
    let steps = len / STEP;
    let mut asked = 0;
    for step in 0..steps {
        let k = step * STEP;
        ahead.ask_until(&mut asked, step + 1, steps);
        // Plain loops: a closure would be compiled without this function's features.
        let mut wv = [_mm512_setzero_si512(); BLOCK_ROWS];
        for r in 0..BLOCK_ROWS {
            wv[r] = _mm512_loadu_si512(w[r].add(k).cast());
        }
        let wv: [__m512bh; BLOCK_ROWS] = std::mem::transmute(wv);
        for c in 0..C {
            let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(x[c].add(k).cast()));
            for r in 0..BLOCK_ROWS {
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv[r], xv);
            }
        }
    }
    <Avx512 as Lanes>::sums(acc)
}
