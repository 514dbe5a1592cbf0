//! The skinny GEMM's block for 24 to 64 rows of X with AVX-512 (from 12 over an f32 W where it
//! is faster there, see [`f32_min_rows`]): each value of W is broadcast to sixteen lanes and
//! multiplied into sixteen rows of X at once.
//!
//! The dot-product blocks (`block` in the parent) keep one sum per (row of W, row of X) in a
//! vector and add its lanes at the end. Past eight rows of X those horizontal sums and the
//! re-reads of X for every block of W held them to about half of the FMA rate. Here X is packed
//! once per step transposed ([`PackedX`]: for each input, the rows' values side by side), and a
//! block keeps R rows of W × V vectors of sixteen rows of X as R·V sums of sixteen outputs each:
//! per input, V loads of X, R broadcasts of W and R·V FMAs, and no horizontal sums. The sums
//! are already the transposed tile's layout (output-major), so they are stored as they are.
//! Up to eight rows past a multiple of sixteen are left to the dot-product blocks rather than
//! padded into a vector of their own ([`REST_ROWS`]).
//! A bf16 or 4-bit W is widened or decoded R rows at a time into a buffer first (a broadcast
//! from memory is a plain load; one from a register would take an FMA port).
//!
//! Each output is one FMA chain over the inputs in order, so its rounding differs from the
//! dot-product blocks' (sixteen chains, then their sum): the same row can differ in the last
//! bits between a step of eight rows and one of nine or more.

use super::Ahead;
use std::arch::x86_64::*;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Rows of X from which the broadcast block runs (with AVX-512F and VL).
pub(super) const MIN_ROWS: usize = 24;

/// Rows of X from which the broadcast block runs over an f32 W: [`F32_FEWEST_ROWS`] where, timed
/// once in this process at [`F32_TIMED_ROWS`], it beat the dot-product blocks, else
/// [`MIN_ROWS`]. That depends on the core: on a Zen 5 (full-width AVX-512) steps of 12 to 16
/// rows ran 13–25% faster with it, on an AVX-512 Xeon sixteen rows ran 5% slower. A bf16 or
/// 4-bit W, widened or decoded into a buffer first, keeps [`MIN_ROWS`]: on that Zen 5 a bf16 W
/// at sixteen rows was 20% slower through the buffer. The two blocks sum in different orders
/// (module comment), so two processes that chose differently can differ in the last bits of a
/// 12–23-row step's outputs.
pub(super) fn f32_min_rows() -> usize {
    static ROWS: OnceLock<usize> = OnceLock::new();
    *ROWS.get_or_init(|| {
        if broadcast_is_faster(F32_TIMED_ROWS) {
            F32_FEWEST_ROWS
        } else {
            MIN_ROWS
        }
    })
}

/// Where the timing runs: one full vector of X, where the two blocks differ most. Timed with W
/// in cache, twelve rows were about even on the Zen 5; streamed from memory, as a step reads
/// it, the broadcast block won there too (16.0–16.5 against 18.3–18.7 ms a step).
const F32_TIMED_ROWS: usize = 16;
/// The fewest rows an f32 W takes the broadcast block at, where the timing said so.
const F32_FEWEST_ROWS: usize = 12;

/// Whether the broadcast block computed tiles of an f32 W (576 inputs, 4 MB: past L2, as a
/// step's W comes from beyond it) for `rows` rows of X faster than the dot-product blocks, the
/// least of seven alternating runs each. With W in L2 the two were close at sixteen rows on the
/// Zen 5, and one process in four chose the dot-product blocks.
fn broadcast_is_faster(rows: usize) -> bool {
    const IN_F: usize = 576;
    const TILES: usize = 76;
    let rows_out = super::TILE_OUT;
    let w: Vec<f32> = (0..TILES * rows_out * IN_F)
        .map(|i| (i % 13) as f32 * 0.01 - 0.06)
        .collect();
    let x: Vec<f32> = (0..rows * IN_F)
        .map(|i| (i % 7) as f32 * 0.1 - 0.3)
        .collect();
    let Some(packed) = PackedX::new(&x, IN_F, rows) else {
        return false;
    };
    let x_rows: Vec<&[f32]> = x.chunks_exact(IN_F).collect();
    let out_x: Vec<usize> = (0..rows).collect();
    let (mut out, mut buf) = (vec![0f32; rows_out * rows], Vec::new());
    let (mut dot, mut broadcast) = (Duration::MAX, Duration::MAX);
    for _ in 0..7 {
        let start = Instant::now();
        for w in w.chunks_exact(rows_out * IN_F) {
            super::dot_tile(
                w, IN_F, rows_out, IN_F, &x_rows, &mut out, &out_x, rows, false,
            );
        }
        dot = dot.min(start.elapsed());
        let start = Instant::now();
        for w in w.chunks_exact(rows_out * IN_F) {
            // SAFETY: PackedX::new checked the CPU; each chunk holds rows_out rows of IN_F.
            unsafe { tile(Rows::F32(w), IN_F, rows_out, &packed, &mut out, &mut buf) };
        }
        broadcast = broadcast.min(start.elapsed());
    }
    broadcast < dot
}

/// X (m × in) transposed, in panels of two or three vectors of sixteen rows: in a panel,
/// input k's values of its rows side by side (16·vectors of them, the padding past m zero), at
/// k·16·vectors from the panel's start, so that a pass over the inputs reads the panel front to
/// back.
pub(crate) struct PackedX {
    values: Vec<f32>,
    panels: Vec<Panel>,
    /// The rows packed: X's first rows (see [`broadcast_rows`]).
    rows: usize,
    /// All of X's rows: the tile's row length.
    stride: usize,
}

/// Rows past a multiple of sixteen, up to which the broadcast block leaves them to the
/// dot-product blocks rather than padding a vector of X: padded, a step of 17 to 31 rows cost
/// what 32 did (f32 on a Zen 5: 16 rows 16.7 ms a step, 20 and 24 rows 23–27, 32 rows 26–28).
const REST_ROWS: usize = 8;

/// How many of `rows` rows of X the broadcast block takes: whole vectors of sixteen where
/// [`REST_ROWS`] or fewer are left over, else all.
fn broadcast_rows(rows: usize) -> usize {
    let rest = rows % 16;
    if rows > 16 && rest <= REST_ROWS {
        rows - rest
    } else {
        rows
    }
}

#[derive(Clone, Copy)]
struct Panel {
    /// Its first vector of sixteen rows, and how many.
    first: usize,
    vectors: usize,
    /// Where its values start.
    at: usize,
}

impl PackedX {
    /// X (m × in_f, row-major) packed, its first [`broadcast_rows`] rows, or None where the
    /// broadcast block does not run: no AVX-512F and VL, or fewer than `min_rows` rows.
    pub(crate) fn new(x: &[f32], in_f: usize, min_rows: usize) -> Option<PackedX> {
        let stride = x.len().checked_div(in_f).unwrap_or(0);
        if stride < min_rows || !crate::cpu::has_avx512f_vl() {
            return None;
        }
        let rows = broadcast_rows(stride);
        let vectors = rows.div_ceil(16);
        // One panel of three vectors for 33–48 rows (the 6 × 3 block), else pairs.
        let widths: Vec<usize> = if vectors == 3 {
            vec![3]
        } else {
            (0..vectors)
                .step_by(2)
                .map(|v| 2.min(vectors - v))
                .collect()
        };
        let mut panels = Vec::with_capacity(widths.len());
        let (mut first, mut at) = (0, 0);
        for vectors in widths {
            panels.push(Panel { first, vectors, at });
            first += vectors;
            at += in_f * 16 * vectors;
        }
        let mut values = Vec::with_capacity(at);
        for p in &panels {
            // SAFETY: the CPU has AVX-512F; the gathers read rows of x inside x, and the
            // panel's values are inside the capacity.
            unsafe { gather_columns(x, in_f, rows, *p, &mut values.spare_capacity_mut()[p.at..]) };
        }
        // SAFETY: gather_columns wrote every panel's values, which tile the capacity.
        unsafe { values.set_len(at) };
        Some(PackedX {
            values,
            panels,
            rows,
            stride,
        })
    }

    /// The rows packed, X's first; the dot-product blocks take the rest.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Rows of W in a block: 8 for panels of two vectors (16 sums), 6 for one of three (18).
    /// The sums, the loads of X and the broadcasts fit the 32 vector registers (6 × 4 spilled
    /// sums), and the row pointers the general registers (twelve spilled them).
    fn block_rows(&self) -> usize {
        if self.panels.iter().any(|p| p.vectors == 3) {
            6
        } else {
            8
        }
    }
}

/// Where a block's rows of W come from: rows of f32 read in place, or rows widened or decoded
/// into a buffer by `fill(first row, rows, buffer)`.
pub(super) enum Rows<'a> {
    F32(&'a [f32]),
    Filled {
        /// The stored rows' bytes, asked for ahead as the block before computes.
        stored: *const u8,
        bytes_per_row: usize,
        fill: &'a dyn Fn(usize, usize, &mut [f32]),
    },
}

/// tile (rows_out × m, output-major) += W[rows_out × in_f]·Xᵀ for the rows of X packed (the
/// tile's first columns), R rows of W at a time.
///
/// # Safety
/// The CPU must have AVX-512F and VL (as [`PackedX::new`] checked); `w` must hold rows_out
/// rows of in_f values (a `Filled`'s `stored`, rows_out rows of its bytes), `x` in_f inputs
/// and the tile rows_out × m values (m all of X's rows).
pub(super) unsafe fn tile(
    w: Rows,
    in_f: usize,
    rows_out: usize,
    x: &PackedX,
    tile: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let m = x.stride;
    assert!(
        tile.len() >= rows_out * m
            && x.panels
                .iter()
                .all(|p| p.at + in_f * 16 * p.vectors <= x.values.len()),
        "broadcast tile: out of range"
    );
    let block_rows = x.block_rows();
    let mut o = 0;
    while o < rows_out {
        let rw = block_rows.min(rows_out - o);
        let (first, ahead) = match &w {
            Rows::F32(w) => {
                assert!(w.len() >= rows_out * in_f, "broadcast tile: w too small");
                let first = w.as_ptr().add(o * in_f);
                let ahead = Ahead {
                    from: first.wrapping_add(rw * in_f).cast(),
                    lines: (block_rows * in_f * 4).div_ceil(64),
                };
                (first, ahead)
            }
            Rows::Filled {
                stored,
                bytes_per_row,
                fill,
            } => {
                buf.resize(rw * in_f, 0.0);
                fill(o, rw, buf);
                let ahead = Ahead {
                    from: stored.wrapping_add((o + rw) * bytes_per_row),
                    lines: (block_rows * bytes_per_row).div_ceil(64),
                };
                (buf.as_ptr(), ahead)
            }
        };
        let out = tile.as_mut_ptr().add(o * m);
        let rows = (first, in_f, rw);
        // Every panel of X against these rows of W, which stay in L1 after the first.
        let passes = x.panels.len();
        for (pass, &panel) in x.panels.iter().enumerate() {
            let args = (rows, in_f, out, ahead.share(pass, passes));
            match panel.vectors {
                1 => block::<8, 1>(x, panel, args),
                2 => block::<8, 2>(x, panel, args),
                _ => block::<6, 3>(x, panel, args),
            }
        }
        o += rw;
    }
}

/// out[r·m + i] += Σ_k w[r][k]·x[i][k] for the rw ≤ R rows of W at `w` (stride `ws`) and the
/// rows of X in a panel of V vectors, R × V sums of sixteen rows each; asks for `ahead`'s
/// lines evenly as it goes.
///
/// # Safety
/// As [`tile`], for these rows.
#[target_feature(enable = "avx512f,avx512vl")]
#[allow(clippy::type_complexity)]
unsafe fn block<const R: usize, const V: usize>(
    x: &PackedX,
    panel: Panel,
    ((w, ws, rw), len, out, ahead): ((*const f32, usize, usize), usize, *mut f32, Ahead),
) {
    let w: [*const f32; R] = super::rows_of((w, ws, rw));
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    debug_assert_eq!(panel.vectors, V);
    let xp = x.values.as_ptr().add(panel.at);
    let width = 16 * V;
    // The lines ahead are asked for a share per sixteen inputs (a cache line of each row).
    let per_chunk = ahead.lines.div_ceil(len.div_ceil(16).max(1));
    let mut asked = 0;
    let mut k = 0;
    while k < len {
        let upto = (asked + per_chunk).min(ahead.lines);
        while asked < upto {
            crate::cpu::prefetch_line_l2(ahead.from.wrapping_add(64 * asked));
            asked += 1;
        }
        for k in k..(k + 16).min(len) {
            let xk = xp.add(k * width);
            let xv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(xk.add(16 * v)));
            for r in 0..R {
                let b = _mm512_set1_ps(*w[r].add(k));
                for v in 0..V {
                    acc[r][v] = _mm512_fmadd_ps(b, xv[v], acc[r][v]);
                }
            }
        }
        k += 16;
    }
    let m = x.stride;
    for (r, acc) in acc.iter().enumerate().take(rw) {
        for (v, acc) in acc.iter().enumerate() {
            let v = panel.first + v;
            let lanes = (x.rows - 16 * v).min(16);
            let mask: __mmask16 = if lanes == 16 {
                u16::MAX
            } else {
                (1u16 << lanes) - 1
            };
            let p = out.add(r * m + 16 * v);
            let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), *acc);
            _mm512_mask_storeu_ps(p, mask, sum);
        }
    }
}

/// A panel's values: out[k·16·V + j] = x[(16·first + j)·in_f + k] for its rows, 0 for the
/// padding past the last row: sixteen rows' values of an input at a time, gathered.
///
/// # Safety
/// The CPU must have AVX-512F; x must hold rows × in_f values, out in_f·16·V.
#[target_feature(enable = "avx512f")]
unsafe fn gather_columns(
    x: &[f32],
    in_f: usize,
    rows: usize,
    panel: Panel,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(
        x.len() >= rows * in_f
            && out.len() >= in_f * 16 * panel.vectors
            && rows * in_f < 1 << 31
            && 16 * panel.first < rows
    );
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let groups: Vec<(__m512i, __mmask16)> = (panel.first..panel.first + panel.vectors)
        .map(|v| {
            let first = _mm512_add_epi32(lanes, _mm512_set1_epi32(16 * v as i32));
            let valid = rows.saturating_sub(16 * v).min(16);
            let mask = if valid == 16 {
                u16::MAX
            } else {
                (1u16 << valid) - 1
            };
            (
                _mm512_mullo_epi32(first, _mm512_set1_epi32(in_f as i32)),
                mask,
            )
        })
        .collect();
    let mut to = out.as_mut_ptr().cast::<f32>();
    for k in 0..in_f {
        let column = x.as_ptr().add(k);
        for &(offsets, mask) in &groups {
            let values =
                _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, column.cast());
            _mm512_storeu_ps(to, values);
            to = to.add(16);
        }
    }
}

/// `out` = the bf16 values of `from`, widened (exactly), sixteen at a time.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn widen(from: &[half::bf16], out: &mut [f32]) {
    use super::TileWeight;
    let n = from.len().min(out.len());
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_ps(
            out.as_mut_ptr().add(i),
            half::bf16::load16(from.as_ptr().add(i)),
        );
        i += 16;
    }
    for (o, v) in out[i..n].iter_mut().zip(&from[i..n]) {
        *o = v.to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;

    /// Under [`MIN_ROWS`] (one vector of X, or a second one mostly padding) the broadcast
    /// block gives the dot-product blocks' sums for the rows it packs, for an f32 W of two
    /// tiles and a ragged rest, and leaves the other columns alone.
    #[test]
    fn a_few_rows_broadcast_give_the_dot_products() {
        if !crate::cpu::has_avx512f_vl() {
            return;
        }
        let (in_f, rows_out) = (96, 2 * super::super::TILE_OUT + 5);
        let w = values(rows_out * in_f, 1);
        for rows in [F32_FEWEST_ROWS, F32_TIMED_ROWS, 17, MIN_ROWS - 1, 26] {
            let x = values(rows * in_f, rows);
            let packed = PackedX::new(&x, in_f, F32_FEWEST_ROWS).expect("AVX-512");
            let done = packed.rows();
            assert_eq!(done, if rows % 16 <= REST_ROWS { 16 } else { rows });
            let (mut got, mut buf) = (vec![0f32; rows_out * rows], Vec::new());
            // SAFETY: the CPU has AVX-512F and VL; w holds rows_out rows of in_f.
            unsafe { tile(Rows::F32(&w), in_f, rows_out, &packed, &mut got, &mut buf) };
            let x_rows: Vec<&[f32]> = x.chunks_exact(in_f).collect();
            let out_x: Vec<usize> = (0..rows).collect();
            let mut want = vec![0f32; rows_out * rows];
            super::super::dot_tile(
                &w, in_f, rows_out, in_f, &x_rows, &mut want, &out_x, rows, false,
            );
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                if i % rows >= done {
                    assert_eq!(*g, 0.0, "{rows} rows, {i}: a column past the packed rows");
                    continue;
                }
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{rows} rows, {i}: {g} vs {w}"
                );
            }
        }
    }

    /// In each panel, input k's values of its rows side by side, the padding past the last
    /// row zero; the panels cover every row packed once, in order — all rows, or whole
    /// vectors where up to [`REST_ROWS`] are left over; None under the rows asked for or
    /// without AVX-512.
    #[test]
    fn packed_x_is_x_transposed_in_panels() {
        let in_f = 5;
        for (rows, min_rows) in [
            (MIN_ROWS - 1, MIN_ROWS),
            (MIN_ROWS, MIN_ROWS),
            (F32_FEWEST_ROWS - 1, F32_FEWEST_ROWS),
            (F32_FEWEST_ROWS, F32_FEWEST_ROWS),
            (33, MIN_ROWS),
            (41, MIN_ROWS),
            (48, MIN_ROWS),
            (64, MIN_ROWS),
            (65, MIN_ROWS),
            (80, MIN_ROWS),
            (130, MIN_ROWS),
        ] {
            let x = values(rows * in_f, rows);
            let packed = PackedX::new(&x, in_f, min_rows);
            if rows < min_rows || !crate::cpu::has_avx512f_vl() {
                assert!(packed.is_none(), "{rows} rows");
                continue;
            }
            let p = packed.unwrap();
            let packed_rows = match rows % 16 {
                rest if rows > 16 && rest <= REST_ROWS => rows - rest,
                _ => rows,
            };
            assert_eq!((p.rows, p.stride), (packed_rows, rows), "{rows} rows");
            let rows = packed_rows;
            let mut next = 0;
            for panel in &p.panels {
                assert_eq!(panel.first, next, "{rows} rows");
                assert!((1..=3).contains(&panel.vectors));
                next += panel.vectors;
                let width = 16 * panel.vectors;
                for k in 0..in_f {
                    for j in 0..width {
                        let i = 16 * panel.first + j;
                        let want = if i < rows { x[i * in_f + k] } else { 0.0 };
                        let got = p.values[panel.at + k * width + j];
                        assert_eq!(got, want, "{rows} rows, input {k}, row {i}");
                    }
                }
            }
            assert_eq!(next, rows.div_ceil(16), "{rows} rows");
            let last = p.panels.last().unwrap();
            assert_eq!(p.values.len(), last.at + in_f * 16 * last.vectors);
        }
    }
}
