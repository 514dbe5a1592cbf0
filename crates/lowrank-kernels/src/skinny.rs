//! The skinny GEMM of a batched inference step: Y (m × out) = X (m × in)·Wᵀ for m = 1…64 rows,
//! with every row's adapters (LoRA, DoRA, stacked) applied by segments.
//!
//! A step over m rows must cost about one pass over the weights, not m: each task takes a
//! tile of [`TILE_OUT`] output rows of W and, a block of rows of W at a time, applies them to
//! every row of X before it moves on, so each row of W comes from memory once and from L1 for the
//! other rows. A bf16 W is widened in registers as it is loaded. A 4-bit W is decoded in
//! registers for up to twelve rows of X with AVX-512 (sixteen codes by one shift and one 16-lane
//! table permute; X's values reordered once per step to the order the shift leaves the codes
//! in; two rows of W at a time, so each load of X serves both) or four with AVX2 (byte
//! shuffles, see `Planes`), and for more into an f32 buffer six
//! rows at a time — once per step, for all rows of X. A register block takes 3 rows of W × 4
//! rows of X with AVX2+FMA (12 eight-lane FMA chains); with AVX-512, 3 × 8 up to eight rows of
//! X (one pass over W) and 6 × 4 from nine (sixteen lanes, 24 chains), chosen at run time. Each
//! chain runs over the whole row before one horizontal sum per output. From 24 rows of X with
//! AVX-512 (from 12 over an f32 W, where a one-off timing says so) the broadcast blocks of
//! [`broadcast`] take over (X packed transposed once per call,
//! no horizontal sums; a bf16 or 4-bit W widened or decoded into the buffer). While a block
//! computes, the next rows of W are asked for, spread over all of its passes (see [`Ahead`]).
//! A task sums its outputs in a tile of its own and writes them into its columns of every row
//! of Y.
//!
//! Adapters follow Punica/S-LoRA's segmented form: a [`Segment`] is one adapter module and the
//! rows that use it. Before the pass over W, each segment's "shrink" T = scale·X[rows]·Aᵀ
//! (rows × r) is computed in parallel; inside each tile, after the base product, the segment's
//! "expand" adds T·B[tile]ᵀ to its rows, so B is read once per step, by the task that owns its
//! rows, which asks for it before the base product. Over an f32 or bf16 W, a segment of one or
//! two rows (an adapter per row) is expanded with its shrink instead, B read right after A,
//! and its tiles add the result. A DoRA segment then scales its rows by m/‖W + sBA‖ per
//! output; the bias comes last.

use half::bf16;
#[cfg(target_arch = "x86_64")]
use lowrank_quant::planes::Planes;
use lowrank_quant::qtensor::PairLut;
use lowrank_quant::Quantized4Bit;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod bf16_pairs;
#[cfg(target_arch = "x86_64")]
mod broadcast;
#[cfg(target_arch = "x86_64")]
use broadcast::{PackedX, Rows};
/// Stands in for [`PackedX`] where there is no AVX-512 to run it.
#[cfg(not(target_arch = "x86_64"))]
struct PackedX;

/// Output rows of W per task: register blocks of three or six rows.
const TILE_OUT: usize = 24;
/// Rows of W in a register block, at most (see [`Lanes::shape`]).
const BLOCK_W: usize = 6;
/// Rows of X in a register block, at most.
const BLOCK_X: usize = 8;
/// Rows of a 4-bit W decoded at a time into the buffer that the f32 blocks read.
const DECODED_ROWS: usize = 6;

/// A frozen base weight W (out × in, row-major), as stored.
#[derive(Clone, Copy)]
pub enum BaseWeights<'a> {
    F32(&'a [f32]),
    /// Widened to f32 as it is decoded.
    Bf16(&'a [bf16]),
    /// NF4/FP4 codes with their absmax blocks, over the row-major flattening of W: a block may
    /// straddle two rows or cover several.
    FourBit(&'a Quantized4Bit),
}

impl BaseWeights<'_> {
    /// Values stored (out × in).
    pub fn len(&self) -> usize {
        match self {
            BaseWeights::F32(w) => w.len(),
            BaseWeights::Bf16(w) => w.len(),
            BaseWeights::FourBit(q) => q.numel(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One adapter module applied to some rows of a step: `y[row] += scale·B·(A·x[row])`, and for
/// DoRA `y[row] = column_scale ⊙ (W·x[row] + scale·B·(A·x[row]))` before the bias.
#[derive(Clone, Copy)]
pub struct Segment<'a> {
    /// A (r × in), row-major.
    pub a: &'a [f32],
    /// B (out × r), row-major.
    pub b: &'a [f32],
    /// The module's scale times the weight the row gives the adapter.
    pub scale: f32,
    /// The rows of X (indices) this module applies to.
    pub rows: &'a [usize],
    /// DoRA's m/‖W + s·BA‖ per output: scales the whole output of these rows, which must
    /// then have no other segment.
    pub column_scale: Option<&'a [f32]>,
}

/// One linear of a step: W, its bias and the adapter segments over the step's rows.
pub struct StepLinear<'a> {
    pub weight: BaseWeights<'a>,
    pub bias: Option<&'a [f32]>,
    pub segments: Vec<Segment<'a>>,
}

impl StepLinear<'_> {
    /// Output features, given the input features.
    pub fn out_features(&self, in_f: usize) -> usize {
        self.weight.len().checked_div(in_f).unwrap_or(0)
    }
}

/// Each linear's Y (m × out, row-major) for X (m × in_f, row-major) on the skinny path.
pub(crate) fn skinny(x: &[f32], in_f: usize, linears: &[StepLinear]) -> Vec<Vec<f32>> {
    let m = x.len().checked_div(in_f).unwrap_or(0);
    let x_rows: Vec<&[f32]> = x.chunks_exact(in_f.max(1)).collect();
    // Over a 4-bit W the tiles decode long enough for their B to arrive while they compute:
    // expanding early cost a 32-row NF4 step with a rank-8 adapter per row 0.92 → 0.89 of one
    // shared adapter's speed (`step_rows`, best of four alternating runs, Zen 5).
    let four_bit = linears
        .iter()
        .any(|l| matches!(l.weight, BaseWeights::FourBit(_)));
    let (shrunk, expanded) = shrink_and_expand_few(&x_rows, in_f, linears, !four_bit);
    let code_order = four_bit.then(|| in_code_order(x, in_f)).flatten();
    #[cfg(target_arch = "x86_64")]
    let packed = {
        let f32_weight = linears
            .iter()
            .any(|l| matches!(l.weight, BaseWeights::F32(_)));
        let min_rows = if f32_weight {
            broadcast::f32_min_rows()
        } else {
            broadcast::MIN_ROWS
        };
        PackedX::new(x, in_f, min_rows)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let packed: Option<PackedX> = None;
    // X already in bf16 over a bf16 W.
    #[cfg(target_arch = "x86_64")]
    let x_bf16 = linears
        .iter()
        .any(|l| matches!(l.weight, BaseWeights::Bf16(_)))
        .then(|| bf16_pairs::bf16_rows(x, in_f))
        .flatten();
    #[cfg(not(target_arch = "x86_64"))]
    let x_bf16: Option<Vec<bf16>> = None;
    let luts: Vec<Option<PairLut>> = linears
        .iter()
        .map(|l| match l.weight {
            BaseWeights::FourBit(q) => Some(q.pair_lut()),
            _ => None,
        })
        .collect();
    let mut ys: Vec<Vec<f32>> = linears
        .iter()
        .map(|l| vec![0f32; m * l.out_features(in_f)])
        .collect();
    let outs: Vec<Columns> = ys.iter_mut().map(|y| Columns::new(y, m)).collect();
    let tasks: Vec<(usize, usize)> = outs
        .iter()
        .enumerate()
        .flat_map(|(part, out)| (0..out.out_f).step_by(TILE_OUT).map(move |o0| (part, o0)))
        .collect();
    // A task owns TILE_OUT outputs: it sums them transposed (out × m) in a tile of its own,
    // then writes the tile into those columns of every row.
    tasks.into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(buf, tile), (part, o0)| {
            let linear = &linears[part];
            let rows_out = TILE_OUT.min(outs[part].out_f - o0);
            tile.clear();
            tile.resize(rows_out * m, 0.0);
            ask_for_expands(linear, (&shrunk[part], &expanded[part]), o0, rows_out);
            base_tile(
                &linear.weight,
                luts[part].as_ref(),
                in_f,
                o0,
                rows_out,
                StepX {
                    rows: &x_rows,
                    code_order: code_order.as_deref(),
                    packed: packed.as_ref(),
                    bf16: x_bf16.as_deref(),
                },
                tile,
                buf,
            );
            finish_tile(linear, (&shrunk[part], &expanded[part]), o0, m, tile);
            // SAFETY: the tasks of a part start TILE_OUT apart and write at most TILE_OUT
            // columns each, so no two write the same element.
            unsafe { outs[part].put(o0, m, tile) };
        },
    );
    drop(outs);
    ys
}

/// A row-major output (m × out_f) whose columns parallel tasks fill, each its own.
struct Columns {
    ptr: *mut f32,
    len: usize,
    out_f: usize,
}

// SAFETY: the tasks sharing a `Columns` write disjoint elements (see `put`), and the Vec it
// points into outlives them.
unsafe impl Sync for Columns {}

impl Columns {
    /// Over `y`, m rows.
    fn new(y: &mut [f32], m: usize) -> Columns {
        Columns {
            ptr: y.as_mut_ptr(),
            len: y.len(),
            out_f: y.len().checked_div(m).unwrap_or(0),
        }
    }

    /// Writes a transposed tile (outputs × m) into columns o0.. of every row.
    ///
    /// # Safety
    /// No other thread may write these columns meanwhile.
    unsafe fn put(&self, o0: usize, m: usize, tile: &[f32]) {
        let width = tile.len() / m.max(1);
        assert!(o0 + width <= self.out_f && m * self.out_f <= self.len);
        for i in 0..m {
            let row = self.ptr.add(i * self.out_f + o0);
            for (o, column) in tile.chunks_exact(m).enumerate() {
                *row.add(o) = column[i];
            }
        }
    }
}

/// Rows of X per shrink task.
const SHRINK_ROWS: usize = 16;

/// Values of every segment of every linear of a step, by linear and segment.
pub(crate) type BySegment = Vec<Vec<Vec<f32>>>;

/// Every segment's T = scale·X[rows]·Aᵀ (rows × r), by linear and segment, in parallel over
/// segments and runs of their rows.
pub(crate) fn shrink(x_rows: &[&[f32]], in_f: usize, linears: &[StepLinear]) -> BySegment {
    shrink_and_expand_few(x_rows, in_f, linears, false).0
}

/// [`shrink`], and with `early`, the expand of every segment of up to [`FEW_ROWS`] rows too,
/// in the same job: T·Bᵀ transposed (out × rows, element (o, c) at o·rows + c), by linear and
/// segment, empty where the expand is left to the tiles. Such a segment's B serves no other
/// row: in the tiles, each read a short run of it cold after the base product and waited on
/// memory (58% of the expand's samples on the multiply-add that loads B). Read here, B follows
/// A as one run (a pack keeps a module's B after its A), which the hardware prefetcher streams:
/// a 32-row bf16 step with a rank-16 adapter per row, 0.85 → 0.89 of one shared adapter's speed
/// (`step_rows`, best of four alternating runs, Zen 5). Asking for B, or A's next lines, as
/// the shrink goes was no faster.
pub(crate) fn shrink_and_expand_few(
    x_rows: &[&[f32]],
    in_f: usize,
    linears: &[StepLinear],
    early: bool,
) -> (BySegment, BySegment) {
    let mut out: BySegment = linears
        .iter()
        .map(|l| {
            l.segments
                .iter()
                .map(|s| vec![0f32; s.rows.len() * s.a.len().checked_div(in_f).unwrap_or(0)])
                .collect()
        })
        .collect();
    let mut expanded: BySegment = linears
        .iter()
        .map(|l| vec![Vec::new(); l.segments.len()])
        .collect();
    let mut jobs = Vec::new();
    for (p, (ts, es)) in out.iter_mut().zip(&mut expanded).enumerate() {
        for (s, (t, e)) in ts.iter_mut().zip(es).enumerate() {
            let seg = &linears[p].segments[s];
            let r = seg.a.len().checked_div(in_f).unwrap_or(0);
            if r == 0 {
                continue;
            }
            if early && (1..=FEW_ROWS).contains(&seg.rows.len()) {
                jobs.push((seg, seg.rows, &mut t[..], Some(e)));
                continue;
            }
            for (c, t) in t.chunks_mut(SHRINK_ROWS * r).enumerate() {
                let rows = &seg.rows[c * SHRINK_ROWS..c * SHRINK_ROWS + t.len() / r];
                jobs.push((seg, rows, t, None));
            }
        }
    }
    jobs.into_par_iter().for_each(|(seg, rows, t, expanded)| {
        let r = t.len() / rows.len();
        let xs: Vec<&[f32]> = rows.iter().map(|&i| x_rows[i]).collect();
        if rows.len() > FEW_ROWS || !shrink_few_rows(seg.a, in_f, &xs, t) {
            let out_x: Vec<usize> = (0..xs.len()).map(|i| i * r).collect();
            // A comes from memory (a different adapter per row: as many A as rows), so each
            // block asks for the next block's rows as it computes.
            dot_tile(seg.a, in_f, r, in_f, &xs, t, &out_x, 1, true);
        }
        t.iter_mut().for_each(|v| *v *= seg.scale);
        if let Some(expanded) = expanded {
            // From −0, which adds nothing to any sum, so that adding these to the tile gives
            // what expanding into it would, bit for bit.
            let k = rows.len();
            expanded.resize(seg.b.len() / r * k, -0.0);
            let within: Vec<usize> = (0..k).collect();
            if !expand_by_kernels(seg.b, r, t, &within, k, expanded) {
                expanded.clear();
            }
        }
    });
    (out, expanded)
}

/// A segment's shrink without its scale, t[c·r + j] = Σ_k a[j·in_f + k]·xs[c][k], with
/// AVX-512; false, having done nothing, without it. Up to sixteen rows of A at a time against
/// one row of X, each load of x serving them all: the dot-product blocks take three rows of A
/// at a time, whose three chains left the loop waiting on the multiply-add latency and on A, a
/// short run of memory per row (a 32-row step's shrinks with a rank-16 adapter per row,
/// 3.0 → 1.9 ms). The sums are the blocks' to the bit (see [`expand_few_rows_avx512`]).
fn shrink_few_rows(a: &[f32], in_f: usize, xs: &[&[f32]], t: &mut [f32]) -> bool {
    let r = t.len().checked_div(xs.len()).unwrap_or(0);
    #[cfg(target_arch = "x86_64")]
    {
        if r > 0 && crate::cpu::has_avx512f_vl() {
            assert!(
                a.len() >= r * in_f && xs.iter().all(|x| x.len() >= in_f),
                "shrink_few_rows: out of range"
            );
            // SAFETY: the CPU has the features; the assert keeps the reads inside A and the
            // rows of x, and t holds xs.len() rows of r.
            unsafe { shrink_few_rows_avx512(a, in_f, xs, t) };
            return true;
        }
    }
    let _ = (a, in_f, xs, r);
    false
}

/// [`shrink_few_rows`] with AVX-512.
///
/// # Safety
/// The CPU must have AVX-512F and VL; t.len() / xs.len() above zero, A that many rows of in_f
/// and each row of x in_f values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn shrink_few_rows_avx512(a: &[f32], in_f: usize, xs: &[&[f32]], t: &mut [f32]) {
    use std::arch::x86_64::*;
    let r = t.len() / xs.len();
    let (whole, rest) = (in_f / 16 * 16, in_f % 16);
    // The blocks' zero-padded last step, as a masked load.
    let mask: __mmask16 = (1 << rest) - 1;
    for (x, t) in xs.iter().zip(t.chunks_exact_mut(r)) {
        for (g, t) in t.chunks_mut(16).enumerate() {
            // A last group of fewer rows repeats its last, whose extra sums are dropped.
            let rows: [*const f32; 16] =
                std::array::from_fn(|j| a.as_ptr().add((16 * g + j.min(t.len() - 1)) * in_f));
            let mut acc = [_mm512_setzero_ps(); 16];
            let mut k = 0;
            while k < whole {
                let xv = _mm512_loadu_ps(x.as_ptr().add(k));
                for j in 0..16 {
                    acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[j].add(k)), xv, acc[j]);
                }
                k += 16;
            }
            if rest > 0 {
                let xv = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(k));
                for j in 0..16 {
                    let wv = _mm512_maskz_loadu_ps(mask, rows[j].add(k));
                    acc[j] = _mm512_fmadd_ps(wv, xv, acc[j]);
                }
            }
            let mut sums = [0f32; 16];
            _mm512_storeu_ps(sums.as_mut_ptr(), crate::cpu::sum_lanes_16(acc));
            t.copy_from_slice(&sums[..t.len()]);
        }
    }
}

/// X of a step in the forms the base kernels read it.
struct StepX<'a> {
    rows: &'a [&'a [f32]],
    /// Interleaved in code order, for the AVX-512 4-bit decoder (see [`in_code_order`]).
    code_order: Option<&'a [f32]>,
    /// Transposed, for the broadcast blocks (see [`PackedX`]).
    packed: Option<&'a PackedX>,
    /// In bf16, for a bf16 W's pair block, which takes it before the broadcast blocks (see
    /// `bf16_pairs::bf16_rows`).
    bf16: Option<&'a [bf16]>,
}

/// The base product of output rows o0..o0 + rows_out for every row of X, into the transposed
/// tile (element (o, i) at o·m + i): from 24 rows of X with AVX-512 by the broadcast blocks
/// (a bf16 or 4-bit W widened or decoded into `buf` first); a 4-bit W is decoded in registers
/// where it can be (from X's rows in code order, when [`in_code_order`] gave them), else into
/// `buf` first; else by the dot-product blocks.
#[allow(clippy::too_many_arguments)]
fn base_tile(
    w: &BaseWeights,
    lut: Option<&PairLut>,
    in_f: usize,
    o0: usize,
    rows_out: usize,
    x: StepX,
    tile: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let StepX {
        rows: x_rows,
        code_order: x_code_order,
        packed,
        bf16: x_bf16,
    } = x;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (packed, x_bf16);
    let m = x_rows.len();
    let out_x: Vec<usize> = (0..m).collect();
    if let BaseWeights::FourBit(q) = w {
        if fourbit_rows(q, in_f, o0, rows_out, (x_rows, x_code_order), tile) {
            return;
        }
    }
    let span = o0 * in_f..(o0 + rows_out) * in_f;
    #[cfg(target_arch = "x86_64")]
    if let (BaseWeights::Bf16(w), Some(x)) = (w, x_bf16) {
        // SAFETY: bf16_rows gave x only where the CPU has the features and in_f is a multiple
        // of 32; the span is inside W and the tile rows_out × m.
        unsafe { bf16_pairs::tile(&w[span], in_f, rows_out, x, m, tile) };
        return;
    }
    // A 4-bit W's absmax for this tile, restored once for every decoding of its rows.
    let blocks = match w {
        BaseWeights::FourBit(q) => RowBlocks::for_decoding(q, in_f, o0, rows_out),
        _ => None,
    };
    // Below broadcast::MIN_ROWS only an f32 W takes the broadcast block (see
    // `broadcast::f32_min_rows`).
    #[cfg(target_arch = "x86_64")]
    if let Some(packed) =
        packed.filter(|_| m >= broadcast::MIN_ROWS || matches!(w, BaseWeights::F32(_)))
    {
        // Rows first..first + rows of the tile's W as f32, for a bf16 or 4-bit W.
        let fill = |first: usize, rows: usize, out: &mut [f32]| {
            let at = span.start + first * in_f;
            match w {
                // SAFETY: PackedX::new checked the CPU for AVX-512F.
                BaseWeights::Bf16(w) => unsafe { broadcast::widen(&w[at..at + rows * in_f], out) },
                BaseWeights::FourBit(q) => {
                    let lut = lut.expect("a 4-bit weight has its table");
                    decode_rows(
                        q,
                        lut,
                        blocks.as_ref(),
                        in_f,
                        o0 + first,
                        &mut out[..rows * in_f],
                    )
                }
                BaseWeights::F32(_) => unreachable!("an f32 W is read in place"),
            }
        };
        let rows = match w {
            BaseWeights::F32(w) => Rows::F32(&w[span]),
            BaseWeights::Bf16(w) => Rows::Filled {
                stored: w[span.start..].as_ptr().cast(),
                bytes_per_row: 2 * in_f,
                fill: &fill,
            },
            BaseWeights::FourBit(q) => Rows::Filled {
                stored: q.packed()[span.start / 2..].as_ptr(),
                bytes_per_row: in_f / 2,
                fill: &fill,
            },
        };
        // SAFETY: PackedX::new checked the CPU; the span is inside W and the tile
        // rows_out × m.
        unsafe { broadcast::tile(rows, in_f, rows_out, packed, tile, buf) };
        // The rows past the packed vectors, W's tile now in L2.
        let done = packed.rows();
        let rest = (w, (lut, blocks.as_ref()), in_f, o0, rows_out);
        dot_rows(rest, (&x_rows[done..], &out_x[done..]), tile, buf, false);
        return;
    }
    // An f32 or bf16 W is read straight from memory (a bf16 widened in registers): its next
    // rows are asked for ahead.
    dot_rows(
        (w, (lut, blocks.as_ref()), in_f, o0, rows_out),
        (x_rows, &out_x),
        tile,
        buf,
        true,
    );
}

/// The base product of output rows o0..o0 + rows_out for the rows of X `x_rows`, each into its
/// column `out_x` of the transposed tile, by the dot-product blocks: an f32 or bf16 W read in
/// place (its next rows asked for ahead where `stream`), a 4-bit one decoded into `buf` a few
/// rows at a time (with its table and the tile's restored absmax, see [`decode_rows`]).
#[allow(clippy::type_complexity)]
fn dot_rows(
    (w, (lut, blocks), in_f, o0, rows_out): (
        &BaseWeights,
        (Option<&PairLut>, Option<&RowBlocks>),
        usize,
        usize,
        usize,
    ),
    (x_rows, out_x): (&[&[f32]], &[usize]),
    tile: &mut [f32],
    buf: &mut Vec<f32>,
    stream: bool,
) {
    if x_rows.is_empty() {
        return;
    }
    let m = tile.len() / rows_out;
    let span = o0 * in_f..(o0 + rows_out) * in_f;
    match w {
        BaseWeights::F32(w) => dot_tile(
            &w[span], in_f, rows_out, in_f, x_rows, tile, out_x, m, stream,
        ),
        BaseWeights::Bf16(w) => dot_tile(
            &w[span], in_f, rows_out, in_f, x_rows, tile, out_x, m, stream,
        ),
        BaseWeights::FourBit(q) => {
            let lut = lut.expect("a 4-bit weight has its table");
            for g in (0..rows_out).step_by(DECODED_ROWS) {
                let nw = DECODED_ROWS.min(rows_out - g);
                buf.resize(nw * in_f, 0.0);
                decode_rows(q, lut, blocks, in_f, o0 + g, buf);
                let out = &mut tile[g * m..];
                dot_tile(&buf[..], in_f, nw, in_f, x_rows, out, out_x, m, false);
            }
        }
    }
}

/// Rows of X up to which a 4-bit W is decoded in registers, each group of codes once for all
/// rows; with more, into a buffer that the f32 blocks read.
const FOURBIT_DIRECT_ROWS: usize = 4;

/// The base product of a 4-bit W's output rows o0..o0 + nw into the transposed tile, the
/// codes decoded in registers and multiplied into every row's per-block sums, each block's sums
/// scaled by its absmax once: with AVX-512F for up to [`FOURBIT_WIDE_ROWS`] rows of X given in
/// code order (see [`in_code_order`]), else with AVX2+FMA for up to [`FOURBIT_DIRECT_ROWS`]
/// (thirty-two codes at a time, see [`Planes`]). Needs rows and blocks of a multiple of 32
/// values; returns false, having done nothing, where no kernel applies.
fn fourbit_rows(
    q: &Quantized4Bit,
    in_f: usize,
    o0: usize,
    nw: usize,
    (x_rows, x_code_order): (&[&[f32]], Option<&[f32]>),
    tile: &mut [f32],
) -> bool {
    let m = x_rows.len();
    if m == 0 || !in_f.is_multiple_of(32) || !q.block_size().is_multiple_of(32) {
        return false;
    }
    assert!(
        (o0 + nw) * in_f <= q.numel() && tile.len() >= nw * m,
        "fourbit_rows: out of range"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(x) = x_code_order.filter(|_| m <= FOURBIT_WIDE_ROWS) {
            if crate::cpu::has_avx512f_vl() {
                assert!(
                    x.len() == m * in_f,
                    "fourbit_rows: x in code order is not m × in_f"
                );
                macro_rules! rows_of {
                    ($($n:literal),*) => {
                        match m {
                            $($n => fourbit_rows_avx512::<$n>(
                                q, in_f, o0, nw, x.as_ptr(), tile
                            ),)*
                            _ => unreachable!("1 to {FOURBIT_WIDE_ROWS} rows"),
                        }
                    };
                }
                // SAFETY: the CPU has the feature; the asserts keep the codes read inside the
                // weight, the rows of x inside their slices, and the writes inside the tile.
                unsafe { rows_of!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12) }
                return true;
            }
        }
        if m <= FOURBIT_DIRECT_ROWS && crate::cpu::has_avx2_fma() {
            assert!(
                x_rows.iter().all(|x| x.len() >= in_f),
                "fourbit_rows: a row of x is too short"
            );
            let x = |c: usize| x_rows[c.min(m - 1)].as_ptr();
            // SAFETY: the CPU has the features; the asserts keep the codes read inside the
            // weight, the rows of x inside their slices, and the writes inside the tile.
            unsafe {
                match m {
                    1 => fourbit_rows_avx2::<1>(q, in_f, o0, nw, [x(0)], tile),
                    2 => fourbit_rows_avx2::<2>(q, in_f, o0, nw, [x(0), x(1)], tile),
                    3 => fourbit_rows_avx2::<3>(q, in_f, o0, nw, [x(0), x(1), x(2)], tile),
                    _ => fourbit_rows_avx2::<4>(q, in_f, o0, nw, [x(0), x(1), x(2), x(3)], tile),
                }
            }
            return true;
        }
    }
    false
}

/// [`fourbit_rows`] for C rows of X with AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA; in_f and the block size multiples of 32, rows o0..o0 + nw
/// inside the weight, each x[c] in_f values and the tile nw × C values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fourbit_rows_avx2<const C: usize>(
    q: &Quantized4Bit,
    in_f: usize,
    o0: usize,
    nw: usize,
    x: [*const f32; C],
    tile: &mut [f32],
) {
    use std::arch::x86_64::*;
    let planes = Planes::new(q.code());
    let packed = q.packed().as_ptr();
    let blocks = RowBlocks::new(q, in_f, o0, nw);
    for o in 0..nw {
        let row = (o0 + o) * in_f;
        let mut acc = [_mm256_setzero_ps(); C];
        let mut k = 0;
        while k < in_f {
            let (end, scale) = blocks.at(row, k, in_f);
            // Two sums per row of X, so that the FMA latency does not bound the loop.
            let mut part = [[_mm256_setzero_ps(); 2]; C];
            while k < end {
                let values = planes.decode(packed.add((row + k) / 2));
                for c in 0..C {
                    let sums = &mut part[c];
                    for (j, v) in values.iter().enumerate() {
                        let xv = _mm256_loadu_ps(x[c].add(k + 8 * j));
                        sums[j % 2] = _mm256_fmadd_ps(*v, xv, sums[j % 2]);
                    }
                }
                k += 32;
            }
            let scale = _mm256_set1_ps(scale);
            for c in 0..C {
                let sum = _mm256_add_ps(part[c][0], part[c][1]);
                acc[c] = _mm256_fmadd_ps(sum, scale, acc[c]);
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            *tile.get_unchecked_mut(o * C + c) += crate::cpu::sum_lanes(*acc);
        }
    }
}

/// Rows of X up to which the AVX-512 4-bit kernel runs: two sums each (two rows of W), with
/// the decoded values, the tables and one vector of X, fit the 32 vector registers. Above,
/// decoding into the buffer once for the f32 blocks served 32 clients faster on an AVX-512
/// Xeon (229–238 tokens/s against 199–217) than decoding again for every eight rows, and on a
/// Zen 5 than decoding again for every twelve (16 rows level, 20–32 rows 10–30% slower).
const FOURBIT_WIDE_ROWS: usize = 12;

/// Within each run of 16 values, the order in which [`fourbit_rows_avx512`] leaves 16 codes:
/// lane 2j holds code j and lane 2j + 1 code 8 + j.
fn code_lane(i: usize) -> usize {
    let (run, lane) = (i / 16 * 16, i % 16);
    run + if lane % 2 == 0 {
        lane / 2
    } else {
        8 + lane / 2
    }
}

/// X's rows for [`fourbit_rows_avx512`], made once per step for all 4-bit linears: per 32
/// inputs, every row's 32 values side by side (row c's at 32·c), each run of 16 in the order
/// that kernel decodes codes in (value `code_lane(i)` at i). One pointer then reaches every
/// row's values at fixed offsets: with a pointer per row, eight rows took more registers than
/// the loop had and it kept reloading them from the stack. None where that kernel does not
/// run (no AVX-512, rows not a multiple of 32 values, or more than [`FOURBIT_WIDE_ROWS`] of
/// them).
fn in_code_order(x: &[f32], in_f: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    let wide = crate::cpu::has_avx512f_vl();
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    if !in_f.is_multiple_of(32) || x.len() > FOURBIT_WIDE_ROWS * in_f || !wide {
        return None;
    }
    let m = x.len() / in_f;
    let mut out = vec![0f32; x.len()];
    for (c, row) in x.chunks_exact(in_f).enumerate() {
        for (j, run) in row.chunks_exact(32).enumerate() {
            let at = &mut out[(j * m + c) * 32..][..32];
            for (i, v) in at.iter_mut().enumerate() {
                *v = run[code_lane(i)];
            }
        }
    }
    Some(out)
}

/// [`fourbit_rows`] for C rows of X in code order: each 8 bytes of codes are broadcast to the
/// 16 lanes, a per-lane shift brings one code to each lane's low four bits (lane 2j code j,
/// lane 2j + 1 code 8 + j) and a 16-lane permute looks the table up — a load, a shift and a
/// permute per 16 codes, for all C rows, from the table scaled by the block's absmax (the
/// dequantized weight). Two or four rows of W at a time, so each load of x serves them all.
///
/// # Safety
/// The CPU must have AVX-512F and VL; in_f and the block size multiples of 32, rows o0..o0 + nw
/// inside the weight, x C rows of in_f values from [`in_code_order`] and the tile nw × C values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn fourbit_rows_avx512<const C: usize>(
    q: &Quantized4Bit,
    in_f: usize,
    o0: usize,
    nw: usize,
    x: *const f32,
    tile: &mut [f32],
) {
    let blocks = RowBlocks::new(q, in_f, o0, nw);
    let mut o = 0;
    // Up to four rows of x, four rows of W at a time: each sum's two multiply-adds per 32
    // codes are a chain, and two rows of W left too few chains to hide their latency (one row
    // of NF4 gate+up on one core: 0.112 → 0.102 ms; four rows 0.176 → 0.161). With more rows
    // of x, 4 × C sums would not fit the registers.
    if C <= 4 {
        while o + 4 <= nw {
            fourbit_pass::<C, 4>(q, &blocks, in_f, o0 + o, x, &mut tile[o * C..]);
            o += 4;
        }
    }
    while o + 2 <= nw {
        fourbit_pass::<C, 2>(q, &blocks, in_f, o0 + o, x, &mut tile[o * C..]);
        o += 2;
    }
    if o < nw {
        fourbit_pass::<C, 1>(q, &blocks, in_f, o0 + o, x, &mut tile[o * C..]);
    }
}

/// R rows of W from output row `first` against the C rows of x, added to `tile` (R × C).
///
/// # Safety
/// As [`fourbit_rows_avx512`], for rows first..first + R.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
#[inline]
unsafe fn fourbit_pass<const C: usize, const R: usize>(
    q: &Quantized4Bit,
    blocks: &RowBlocks,
    in_f: usize,
    first: usize,
    x: *const f32,
    tile: &mut [f32],
) {
    use std::arch::x86_64::*;
    let table = _mm512_loadu_ps(q.code().as_ptr());
    // Byte j of the eight holds codes 2j (high nibble) and 2j + 1 (low nibble); the even
    // lanes read the first four bytes (codes 0–7), the odd lanes the last four (codes 8–15).
    let shifts = _mm512_setr_epi32(4, 4, 0, 0, 12, 12, 8, 8, 20, 20, 16, 16, 28, 28, 24, 24);
    let packed = q.packed().as_ptr();
    let rows: [usize; R] = std::array::from_fn(|r| (first + r) * in_f);
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    // 32 codes of every row at column k, from the rows' tables times their blocks' absmax.
    macro_rules! step {
        ($k:expr, $scaled:expr) => {{
            let (k, scaled): (usize, &[__m512; R]) = ($k, $scaled);
            if k % 128 == 0 {
                // Each row's next 64 bytes of codes, PREFETCH_PASSES passes ahead.
                for &row in &rows {
                    let ahead = (row + k) / 2 + PREFETCH_PASSES * R * in_f / 2;
                    crate::cpu::prefetch_line(packed.wrapping_add(ahead));
                }
            }
            let v: [[__m512; 2]; R] = std::array::from_fn(|r| {
                let p = packed.add((rows[r] + k) / 2);
                [
                    lookup16(p, shifts, scaled[r]),
                    lookup16(p.add(8), shifts, scaled[r]),
                ]
            });
            // Each half's 16 codes against every row, so that only one vector of x is live:
            // nine to twelve rows keep 2 × C sums in registers.
            let xk = x.add(k * C);
            for h in 0..2 {
                for c in 0..C {
                    let xv = _mm512_loadu_ps(xk.add(32 * c + 16 * h));
                    for r in 0..R {
                        acc[r][c] = _mm512_fmadd_ps(v[r][h], xv, acc[r][c]);
                    }
                }
            }
        }};
    }
    // Each row's table times its block's absmax: looking codes up in it gives the products of
    // looking up and multiplying, with one multiply per block instead of one per 16.
    if in_f.is_multiple_of(blocks.size) {
        // Rows of whole blocks: row r's blocks are consecutive in the scales. Finding each
        // block's end and absmax by `RowBlocks::at` had taken a fifth of an eight-row pass
        // over 64-value blocks.
        let scales: [*const f32; R] = std::array::from_fn(|r| {
            blocks
                .scales
                .as_ptr()
                .add((rows[r] >> blocks.shift) - blocks.first)
        });
        let (mut k, mut j) = (0, 0);
        while k < in_f {
            let scaled: [__m512; R] =
                std::array::from_fn(|r| _mm512_mul_ps(table, _mm512_set1_ps(*scales[r].add(j))));
            // bitsandbytes' default block written out: as a loop of two steps, a four-row
            // pass took 0.105 ms for NF4 gate+up against 0.088 (`step_linears`, Zen 5).
            if blocks.size == 64 {
                step!(k, &scaled);
                step!(k + 32, &scaled);
                k += 64;
            } else {
                let end = k + blocks.size;
                while k < end {
                    step!(k, &scaled);
                    k += 32;
                }
            }
            j += 1;
        }
    } else {
        let mut k = 0;
        while k < in_f {
            // Up to where every row's block goes on (blocks and rows are multiples of 32
            // values).
            let mut end = in_f;
            let scaled: [__m512; R] = std::array::from_fn(|r| {
                let (row_end, scale) = blocks.at(rows[r], k, in_f);
                end = end.min(row_end);
                _mm512_mul_ps(table, _mm512_set1_ps(scale))
            });
            while k < end {
                step!(k, &scaled);
                k += 32;
            }
        }
    }
    let sums = <Avx512 as Lanes>::sums(acc);
    for (r, sums) in sums.iter().enumerate() {
        for (c, sum) in sums.iter().enumerate() {
            *tile.get_unchecked_mut(r * C + c) += sum;
        }
    }
}

/// How many passes ahead [`fourbit_pass`] asks for the codes it will read. The hardware
/// prefetcher alone left a one-row 4-bit decode waiting on memory: four passes ahead served
/// 113 against 90 tokens/s (`step_rows`, NF4, one row, median of six alternating runs on a
/// 2-core AVX-512 Xeon; 12 passes ahead 102); eight rows were unchanged within the noise.
const PREFETCH_PASSES: usize = 4;

/// Sums from which [`Lanes::sums`] adds them up together rather than one by one: a horizontal
/// sum alone takes eight shuffles and adds, sixteen together 45.
const SUMS_TOGETHER: usize = 6;

/// The values of the 16 codes in the 8 bytes at `p`, in the lane order of
/// [`fourbit_rows_avx512`].
///
/// # Safety
/// The CPU must have AVX-512F; 8 bytes must be readable at `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
#[inline]
unsafe fn lookup16(
    p: *const u8,
    shifts: std::arch::x86_64::__m512i,
    table: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let codes = _mm512_set1_epi64(p.cast::<i64>().read_unaligned());
    // The permute reads only the low four bits of each lane.
    _mm512_permutexvar_ps(_mm512_srlv_epi32(codes, shifts), table)
}

/// The absmax of every block that output rows o0..o0 + nw of a 4-bit W touch, restored once.
/// Blocks run over the flattened weight, and their sizes are powers of two: the block of a flat
/// index is a shift away.
struct RowBlocks {
    size: usize,
    shift: u32,
    first: usize,
    scales: Vec<f32>,
}

impl RowBlocks {
    fn new(q: &Quantized4Bit, in_f: usize, o0: usize, nw: usize) -> Self {
        let size = q.block_size();
        let shift = size.trailing_zeros();
        let first = (o0 * in_f) >> shift;
        let end = ((o0 + nw) * in_f).div_ceil(size);
        let scales = q.absmax().restore_range(first..end.max(first));
        RowBlocks {
            size,
            shift,
            first,
            scales,
        }
    }

    /// For [`decode_rows`] of output rows o0..o0 + nw, where its AVX-512 decoder runs: the CPU
    /// has AVX-512F, rows and blocks are multiples of 32 values.
    fn for_decoding(q: &Quantized4Bit, in_f: usize, o0: usize, nw: usize) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx512f() && in_f.is_multiple_of(32) && q.block_size().is_multiple_of(32)
        {
            return Some(RowBlocks::new(q, in_f, o0, nw));
        }
        let _ = (q, in_f, o0, nw);
        None
    }

    /// For column k of the row that starts at flat index `row`: where its block ends in the row
    /// (at most `in_f`) and the block's absmax.
    #[inline]
    fn at(&self, row: usize, k: usize, in_f: usize) -> (usize, f32) {
        let b = (row + k) >> self.shift;
        (
            ((b + 1) * self.size - row).min(in_f),
            self.scales[b - self.first],
        )
    }
}

/// Rows `first_row..` of a 4-bit W as f32 into `out` (whole rows), the values of
/// `dequantize_range` bit for bit: with AVX-512 from the tile's restored absmax where `blocks`
/// (from [`RowBlocks::for_decoding`]) has them, else through the byte-pair table.
fn decode_rows(
    q: &Quantized4Bit,
    lut: &PairLut,
    blocks: Option<&RowBlocks>,
    in_f: usize,
    first_row: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(blocks) = blocks {
        assert!(
            out.len().is_multiple_of(in_f) && (first_row * in_f + out.len()) <= q.numel(),
            "decode_rows: out of range"
        );
        // SAFETY: for_decoding checked the CPU and that rows and blocks are multiples of 32
        // values; the assert keeps the codes read inside the weight.
        unsafe { decode_rows_avx512(q, blocks, in_f, first_row, out) };
        return;
    }
    let _ = blocks;
    q.dequantize_range(lut, first_row * in_f, out);
}

/// [`decode_rows`] with AVX-512: per block, the table times its absmax; per 16 bytes, each
/// byte spread to two lanes, shifted so each lane's low four bits hold its code (high nibble
/// first), looked up by a permute and stored. The per-block bookkeeping of `dequantize_range`
/// (an absmax restored and a call per block) had cost more than the lookups.
///
/// # Safety
/// The CPU must have AVX-512F; `blocks` from [`RowBlocks::for_decoding`] over these rows; `out`
/// whole rows of in_f values, all inside the weight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_rows_avx512(
    q: &Quantized4Bit,
    blocks: &RowBlocks,
    in_f: usize,
    first_row: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let table = _mm512_loadu_ps(q.code().as_ptr());
    let shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    let packed = q.packed().as_ptr();
    for (r, dst) in out.chunks_exact_mut(in_f).enumerate() {
        let row = (first_row + r) * in_f;
        let dst = dst.as_mut_ptr();
        let mut k = 0;
        while k < in_f {
            let (end, scale) = blocks.at(row, k, in_f);
            let scaled = _mm512_mul_ps(table, _mm512_set1_ps(scale));
            while k < end {
                let v = _mm_loadu_si128(packed.add((row + k) / 2).cast());
                for (half, pairs) in [_mm_unpacklo_epi8(v, v), _mm_unpackhi_epi8(v, v)]
                    .into_iter()
                    .enumerate()
                {
                    let index = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(pairs), shifts);
                    _mm512_storeu_ps(dst.add(k + 16 * half), _mm512_permutexvar_ps(index, scaled));
                }
                k += 32;
            }
        }
    }
}

/// Asks for every segment's rows of B that [`finish_tile`] will read for this tile, into L2
/// before the base product: with a different adapter per row, each segment's rows of B are a
/// short run of memory of their own, and read cold after the product they waited on memory
/// one by one.
fn ask_for_expands(
    linear: &StepLinear,
    (shrunk, expanded): (&[Vec<f32>], &[Vec<f32>]),
    o0: usize,
    rows_out: usize,
) {
    for ((seg, t), e) in linear.segments.iter().zip(shrunk).zip(expanded) {
        let r = t.len().checked_div(seg.rows.len()).unwrap_or(0);
        if r > 0 && e.is_empty() {
            crate::cpu::prefetch_l2(&seg.b[o0 * r..(o0 + rows_out) * r]);
        }
    }
}

/// Ranks below which an expand multiplies B's rows one by one (see [`finish_tile`]).
const SHORT_RANK: usize = 16;

/// Adds each segment's expand to its rows of a transposed tile, scales DoRA rows, adds the
/// bias.
fn finish_tile(
    linear: &StepLinear,
    (shrunk, expanded): (&[Vec<f32>], &[Vec<f32>]),
    o0: usize,
    m: usize,
    tile: &mut [f32],
) {
    let rows_out = tile.len() / m.max(1);
    for ((seg, t), e) in linear.segments.iter().zip(shrunk).zip(expanded) {
        let r = t.len().checked_div(seg.rows.len()).unwrap_or(0);
        if r == 0 {
            continue;
        }
        if !e.is_empty() {
            // Expanded with the shrink (see `shrink_and_expand_few`).
            let k = seg.rows.len();
            for (column, e) in tile.chunks_exact_mut(m).zip(e[o0 * k..].chunks_exact(k)) {
                for (&i, e) in seg.rows.iter().zip(e) {
                    column[i] += e;
                }
            }
            continue;
        }
        let b = &seg.b[o0 * r..(o0 + rows_out) * r];
        if expand_by_kernels(b, r, t, seg.rows, m, tile) {
            continue;
        }
        if r < SHORT_RANK {
            // A row of B shorter than one vector: the blocks would pad every row of B and T
            // into a vector per block, which cost more than these few products.
            for (b, column) in b.chunks_exact(r).zip(tile.chunks_exact_mut(m)) {
                for (t, &i) in t.chunks_exact(r).zip(seg.rows) {
                    column[i] += crate::cpu::dot_portable(b, t);
                }
            }
            continue;
        }
        let ts: Vec<&[f32]> = t.chunks_exact(r).collect();
        dot_tile(b, r, rows_out, r, &ts, tile, seg.rows, m, false);
    }
    for seg in &linear.segments {
        if let Some(cs) = seg.column_scale {
            for (o, column) in tile.chunks_exact_mut(m).enumerate() {
                for &i in seg.rows {
                    column[i] *= cs[o0 + o];
                }
            }
        }
    }
    if let Some(bias) = linear.bias {
        for (column, b) in tile.chunks_exact_mut(m).zip(&bias[o0..]) {
            column.iter_mut().for_each(|v| *v += b);
        }
    }
}

/// [`expand_by_kernels`] for a rank below [`SHORT_RANK`], any number of rows. Sixteen rows of T
/// at a time: T's columns gathered into vectors over the rows once per tile, each output is r
/// multiply-adds of B's broadcast values into one vector over the rows, added to the tile's
/// column of that output. A segment of one or two rows computes the same chains an output at a
/// time (at rank 8, eight outputs at once: [`expand_rank8_row`]). Every row's sum is the same
/// chain over k whichever way it is computed, so a row's output does not depend on which rows
/// share its adapter. One by one (`dot_portable`), a shared rank-8 LoRA cost a 32-row bf16
/// step 1.3–2.1 ms over the base on one thread, this way 0.8–1.2 (`step_rows`, three
/// alternating runs, Zen 5).
///
/// # Safety
/// The CPU must have AVX-512F, VL and FMA; 0 < r < [`SHORT_RANK`], and the operands as
/// [`expand_by_kernels`] checks them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
unsafe fn expand_short_rank_avx512(
    b: &[f32],
    r: usize,
    t: &[f32],
    rows: &[usize],
    m: usize,
    tile: &mut [f32],
) {
    use std::arch::x86_64::*;
    let rows_out = b.len() / r;
    if rows.len() <= FEW_ROWS {
        // Each sum's chain one multiply-add at a time, as a lane of the row-lane vectors below
        // computes it: gathering T's columns for one row's lane cost a 32-row step with a
        // rank-8 adapter per row 1–3 ms more than `dot_portable` had.
        for (t, &i) in t.chunks_exact(r).zip(rows) {
            let mut first = 0;
            if r == 8 {
                first = rows_out / 8 * 8;
                expand_rank8_row(&b[..first * 8], t, i, m, tile);
            }
            for (o, b) in b.chunks_exact(r).enumerate().skip(first) {
                // A loop, not a closure: a closure is compiled without this function's FMA.
                let mut sum = 0f32;
                for k in 0..r {
                    sum = b[k].mul_add(t[k], sum);
                }
                *tile.get_unchecked_mut(o * m + i) += sum;
            }
        }
        return;
    }
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let starts = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(r as i32));
    for (g, group) in rows.chunks(16).enumerate() {
        let n = group.len();
        let mask: __mmask16 = ((1u32 << n) - 1) as __mmask16;
        let t = t.as_ptr().add(16 * g * r);
        let mut columns = [_mm512_setzero_ps(); SHORT_RANK];
        for (k, c) in columns.iter_mut().enumerate().take(r) {
            *c = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, starts, t.add(k));
        }
        let consecutive = group.windows(2).all(|w| w[1] == w[0] + 1);
        for o in 0..rows_out {
            let row = b.as_ptr().add(o * r);
            let mut sum = _mm512_setzero_ps();
            for (k, c) in columns.iter().enumerate().take(r) {
                sum = _mm512_fmadd_ps(_mm512_set1_ps(*row.add(k)), *c, sum);
            }
            let column = tile.as_mut_ptr().add(o * m);
            if consecutive {
                let at = column.add(group[0]);
                let y = _mm512_maskz_loadu_ps(mask, at);
                _mm512_mask_storeu_ps(at, mask, _mm512_add_ps(y, sum));
            } else {
                let mut sums = [0f32; 16];
                _mm512_storeu_ps(sums.as_mut_ptr(), sum);
                for (&i, s) in group.iter().zip(sums) {
                    *column.add(i) += s;
                }
            }
        }
    }
}

/// One row's rank-8 expand (PEFT's default rank) into the transposed tile, eight outputs at a
/// time: their rows of B transposed in registers (the classic 8 × 8 unpack-and-shuffle), then
/// each output's chain of eight multiply-adds in its own lane, as [`expand_short_rank_avx512`]'s
/// scalar and row-lane paths compute it. Against the scalar chains, a 32-row f32 step with an
/// adapter per row went from 0.89 to 0.91 of one shared adapter's speed (`step_rows`, best of
/// four alternating runs, Zen 5); gathering B's columns instead was slower than the scalar
/// chains (0.84).
///
/// # Safety
/// The CPU must have AVX2 and FMA; b a multiple of 64 values, t 8 values, i below m and the
/// tile at least (b.len() / 8) × m.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn expand_rank8_row(b: &[f32], t: &[f32], i: usize, m: usize, tile: &mut [f32]) {
    use std::arch::x86_64::*;
    let tk: [__m256; 8] = std::array::from_fn(|k| _mm256_set1_ps(t[k]));
    for (g, b) in b.chunks_exact(64).enumerate() {
        let r: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(b.as_ptr().add(8 * j)));
        let u = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let v = [
            _mm256_shuffle_ps::<0x44>(u[0], u[2]),
            _mm256_shuffle_ps::<0xEE>(u[0], u[2]),
            _mm256_shuffle_ps::<0x44>(u[1], u[3]),
            _mm256_shuffle_ps::<0xEE>(u[1], u[3]),
            _mm256_shuffle_ps::<0x44>(u[4], u[6]),
            _mm256_shuffle_ps::<0xEE>(u[4], u[6]),
            _mm256_shuffle_ps::<0x44>(u[5], u[7]),
            _mm256_shuffle_ps::<0xEE>(u[5], u[7]),
        ];
        // Column k: lane j holds b[j·8 + k].
        let columns = [
            _mm256_permute2f128_ps::<0x20>(v[0], v[4]),
            _mm256_permute2f128_ps::<0x20>(v[1], v[5]),
            _mm256_permute2f128_ps::<0x20>(v[2], v[6]),
            _mm256_permute2f128_ps::<0x20>(v[3], v[7]),
            _mm256_permute2f128_ps::<0x31>(v[0], v[4]),
            _mm256_permute2f128_ps::<0x31>(v[1], v[5]),
            _mm256_permute2f128_ps::<0x31>(v[2], v[6]),
            _mm256_permute2f128_ps::<0x31>(v[3], v[7]),
        ];
        let mut sum = _mm256_setzero_ps();
        for k in 0..8 {
            sum = _mm256_fmadd_ps(columns[k], tk[k], sum);
        }
        let mut sums = [0f32; 8];
        _mm256_storeu_ps(sums.as_mut_ptr(), sum);
        for (j, s) in sums.iter().enumerate() {
            *tile.get_unchecked_mut((8 * g + j) * m + i) += s;
        }
    }
}

/// Rows of a segment up to which its expand is [`expand_few_rows_avx512`]'s.
const FEW_ROWS: usize = 2;

/// A segment's expand into the transposed tile, tile[o·m + rows[i]] += Σ_k b[o·r + k]·t[i·r +
/// k], by an AVX-512 kernel where one applies: a rank below [`SHORT_RANK`]
/// ([`expand_short_rank_avx512`]) or up to [`FEW_ROWS`] rows ([`expand_few_rows_avx512`]);
/// false, having done nothing, otherwise (the dot-product blocks, or `dot_portable` below one
/// vector, serve it).
fn expand_by_kernels(
    b: &[f32],
    r: usize,
    t: &[f32],
    rows: &[usize],
    m: usize,
    tile: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let short = (1..SHORT_RANK).contains(&r);
        if (short || (r > 0 && rows.len() <= FEW_ROWS))
            && crate::cpu::has_avx512f_vl()
            && crate::cpu::has_avx2_fma()
        {
            assert!(
                t.len() == rows.len() * r
                    && rows.iter().all(|&i| i < m)
                    && tile.len() >= b.len() / r * m,
                "expand_by_kernels: out of range"
            );
            // SAFETY (both): the CPU has the features; the assert keeps T's reads inside T
            // and the writes inside the tile, and B is read in whole rows of r.
            unsafe {
                if short {
                    expand_short_rank_avx512(b, r, t, rows, m, tile);
                } else {
                    expand_few_rows_avx512(b, r, t, rows, m, tile);
                }
            }
            return true;
        }
    }
    let _ = (b, r, t, rows, m, tile);
    false
}

/// [`expand_by_kernels`] for up to [`FEW_ROWS`] rows. Sixteen outputs' products are summed
/// together: the dot-product blocks, three rows of B at a time against one row of T, spent most
/// of their time on three horizontal sums and a call per block (a 32-row step's expands with a
/// rank-16 adapter per row, 4.4 → 3.4–3.7 ms of CPU, in the tiles). The sums are the blocks'
/// to the bit (each output one chain over k, added up in `_mm512_reduce_add_ps`'s order), so a
/// row's output does not depend on how many rows share its adapter.
///
/// # Safety
/// The CPU must have AVX-512F and VL; r above zero, and the operands as [`expand_by_kernels`]
/// checks them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn expand_few_rows_avx512(
    b: &[f32],
    r: usize,
    t: &[f32],
    rows: &[usize],
    m: usize,
    tile: &mut [f32],
) {
    use std::arch::x86_64::*;
    let rows_out = b.len() / r;
    let (whole, rest) = (r / 16 * 16, r % 16);
    // The blocks' zero-padded last step, as a masked load.
    let mask: __mmask16 = (1 << rest) - 1;
    for (t, &i) in t.chunks_exact(r).zip(rows) {
        let mut o = 0;
        while o < rows_out {
            let n = 16.min(rows_out - o);
            let mut products = [_mm512_setzero_ps(); 16];
            for (j, p) in products.iter_mut().enumerate().take(n) {
                let row = b.as_ptr().add((o + j) * r);
                for k in (0..whole).step_by(16) {
                    let x = _mm512_loadu_ps(t.as_ptr().add(k));
                    *p = _mm512_fmadd_ps(_mm512_loadu_ps(row.add(k)), x, *p);
                }
                if rest > 0 {
                    let x = _mm512_maskz_loadu_ps(mask, t.as_ptr().add(whole));
                    let w = _mm512_maskz_loadu_ps(mask, row.add(whole));
                    *p = _mm512_fmadd_ps(w, x, *p);
                }
            }
            let mut sums = [0f32; 16];
            _mm512_storeu_ps(sums.as_mut_ptr(), crate::cpu::sum_lanes_16(products));
            for (j, s) in sums.iter().enumerate().take(n) {
                *tile.get_unchecked_mut((o + j) * m + i) += s;
            }
            o += n;
        }
    }
}

/// out[out_x[i] + o·out_w] += Σ_{k < len} w[o·w_stride + k]·xs[i][k] for o < nw and every
/// row i of `xs`. With `stream` (w read from memory, its rows one after another at the
/// stride), each block of rows asks for the next block's bytes as it computes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_tile<T: TileWeight>(
    w: &[T],
    w_stride: usize,
    nw: usize,
    len: usize,
    xs: &[&[f32]],
    out: &mut [f32],
    out_x: &[usize],
    out_w: usize,
    stream: bool,
) {
    if nw == 0 || xs.is_empty() {
        return;
    }
    assert!(
        len <= w_stride && (nw - 1) * w_stride + len <= w.len(),
        "dot_tile: w too small"
    );
    assert!(
        xs.iter().all(|x| x.len() >= len),
        "dot_tile: a row of x is too short"
    );
    assert_eq!(
        out_x.len(),
        xs.len(),
        "dot_tile: one output offset per row of x"
    );
    let last = out_x.iter().max().copied().unwrap_or(0) + (nw - 1) * out_w;
    assert!(last < out.len(), "dot_tile: out too small");
    #[cfg(target_arch = "x86_64")]
    {
        let args = (w_stride, nw, len, out_x, out_w, stream);
        // SAFETY (both): the CPU has the features; the asserts above keep every read inside w
        // and the rows of x, and every write inside out.
        if crate::cpu::has_avx512f_vl() {
            return unsafe { dot_tile_simd::<Avx512, T>(w, xs, out, args) };
        }
        if crate::cpu::has_avx2_fma() {
            return unsafe { dot_tile_simd::<Avx2, T>(w, xs, out, args) };
        }
    }
    dot_tile_portable(w, w_stride, nw, len, xs, out, out_x, out_w)
}

/// [`dot_tile`] without SIMD intrinsics.
#[allow(clippy::too_many_arguments)]
fn dot_tile_portable<T: TileWeight>(
    w: &[T],
    w_stride: usize,
    nw: usize,
    len: usize,
    xs: &[&[f32]],
    out: &mut [f32],
    out_x: &[usize],
    out_w: usize,
) {
    let mut row = vec![0f32; len];
    for o in 0..nw {
        for (r, v) in row.iter_mut().zip(&w[o * w_stride..o * w_stride + len]) {
            *r = v.to_f32();
        }
        for (x, &at) in xs.iter().zip(out_x) {
            out[at + o * out_w] += crate::cpu::dot_portable(&row, &x[..len]);
        }
    }
}

/// Blocks ahead whose rows of W a dot-product block asks for. On the Zen 4 of the kernel notes,
/// two rather than one (`step_rows`, five alternating runs): eight rows of X over f32 W 22.4–24.0
/// ms a step against 24.7–26.2, four over bf16 11.5–12.7 against 13.8–15.6.
const DOT_AHEAD_BLOCKS: usize = 2;

/// Cache lines to ask for while a block computes: `lines` from `from` on.
///
/// A core keeps only so many misses in flight, so the next rows of w stream at full speed only
/// if they are asked for all the time: spread over every pass of a block, not only the first
/// (that left memory idle while the later passes computed from L1, and the step cost the sum
/// of both instead of the larger).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Ahead {
    from: *const u8,
    lines: usize,
}

#[cfg(target_arch = "x86_64")]
impl Ahead {
    /// The lines of `block_rows` rows of W (`stride` values apart) `blocks` blocks past the
    /// block of `rw` rows at `wp`.
    fn blocks_ahead<T>(
        wp: *const T,
        (rw, block_rows): (usize, usize),
        stride: usize,
        blocks: usize,
    ) -> Ahead {
        Ahead {
            from: wp
                .wrapping_add((rw + (blocks - 1) * block_rows) * stride)
                .cast(),
            lines: (block_rows * stride * std::mem::size_of::<T>()).div_ceil(64),
        }
    }

    /// Asks for this share's lines up to step `step` of `steps` in proportion, from line
    /// `*asked` on (into L2).
    #[inline(always)]
    fn ask_until(self, asked: &mut usize, step: usize, steps: usize) {
        while *asked * steps < step * self.lines {
            crate::cpu::prefetch_line_l2(self.from.wrapping_add(64 * *asked));
            *asked += 1;
        }
    }

    /// Pass `pass` of `passes`' equal share of the lines.
    fn share(self, pass: usize, passes: usize) -> Ahead {
        let each = self.lines.div_ceil(passes.max(1));
        let first = (pass * each).min(self.lines);
        Ahead {
            from: self.from.wrapping_add(64 * first),
            lines: each.min(self.lines - first),
        }
    }
}

/// Blocks of up to [`BLOCK_W`] rows of w × [`BLOCK_X`] rows of x, `L` lanes at a time.
///
/// # Safety
/// The CPU must have `L`'s features, and the arguments must pass [`dot_tile`]'s checks.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::type_complexity)]
unsafe fn dot_tile_simd<L: Lanes, T: TileWeight>(
    w: &[T],
    xs: &[&[f32]],
    out: &mut [f32],
    (w_stride, nw, len, out_x, out_w, stream): (usize, usize, usize, &[usize], usize, bool),
) {
    let (block_rows, block_x) = L::shape(xs.len());
    let mut o = 0;
    while o < nw {
        let rw = block_rows.min(nw - o);
        let wp = w.as_ptr().add(o * w_stride);
        // While these rows of w meet every row of x, the rows of the block after next are
        // asked for, an equal share in each pass over a group of rows of x.
        let mut next = Ahead::blocks_ahead(wp, (rw, block_rows), w_stride, DOT_AHEAD_BLOCKS);
        if !stream {
            next.lines = 0;
        }
        let passes = xs.len().div_ceil(block_x);
        let mut i = 0;
        while i < xs.len() {
            let rx = block_x.min(xs.len() - i);
            let ahead = next.share(i / block_x, passes);
            let x = std::array::from_fn(|c| xs[i + c.min(rx - 1)].as_ptr());
            let sums = L::block_of::<T>((wp, w_stride, rw), block_rows, x, rx, len, ahead);
            for (r, sums) in sums.iter().enumerate().take(rw) {
                for (c, s) in sums.iter().enumerate().take(rx) {
                    *out.get_unchecked_mut(out_x[i + c] + (o + r) * out_w) += s;
                }
            }
            i += rx;
        }
        o += rw;
    }
}

/// A SIMD width the tile kernels run at: its vector of f32 lanes, its block's rows of W and
/// the operations a block needs, each compiled with the width's CPU features.
#[cfg(target_arch = "x86_64")]
trait Lanes {
    type V: Copy;
    const N: usize;

    /// Rows of W and of x in a block, for this many rows of x: as many as keep the sums, the
    /// rows of W and one of x in registers.
    fn shape(rows_x: usize) -> (usize, usize);

    /// # Safety (every method)
    /// The CPU must have the width's features; loads read `N` values at the pointer.
    unsafe fn zero() -> Self::V;
    unsafe fn load_w<T: TileWeight>(p: *const T) -> Self::V;
    unsafe fn load_x(p: *const f32) -> Self::V;
    unsafe fn fmadd(a: Self::V, b: Self::V, acc: Self::V) -> Self::V;
    /// Each sum's lanes added up.
    unsafe fn sums<const R: usize, const C: usize>(acc: [[Self::V; C]; R]) -> [[f32; C]; R];

    /// [`block`] over the `rw` rows of w at `w` (stride `ws`) in a block of `block_rows` and
    /// the first `rx` of `x`, as [`Lanes::shape`] gives them, its sums in the full
    /// [`BLOCK_W`] × [`BLOCK_X`] shape (the rest zero), compiled with the width's features.
    unsafe fn block_of<T: TileWeight>(
        w: (*const T, usize, usize),
        block_rows: usize,
        x: [*const f32; BLOCK_X],
        rx: usize,
        len: usize,
        ahead: Ahead,
    ) -> [[f32; BLOCK_X]; BLOCK_W];
}

/// Eight lanes: AVX2 and FMA (sixteen registers: 3 × 4 sums).
#[cfg(target_arch = "x86_64")]
struct Avx2;

/// Sixteen lanes: AVX-512F and VL (thirty-two registers: 3 × 8 sums up to eight rows of x, one
/// pass over W for all of them; 6 × 4 from nine on, fewer loads of x per multiply-add). VL
/// matters: without it the horizontal sums' 256- and 128-bit steps reach only the first
/// sixteen registers, and the compiler spills sums from them inside the loop.
#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx2 {
    type V = std::arch::x86_64::__m256;
    const N: usize = 8;

    fn shape(_rows_x: usize) -> (usize, usize) {
        (3, 4)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm256_setzero_ps()
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_w<T: TileWeight>(p: *const T) -> Self::V {
        T::load8(p)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_x(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fmadd(a: Self::V, b: Self::V, acc: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_fmadd_ps(a, b, acc)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn sums<const R: usize, const C: usize>(acc: [[Self::V; C]; R]) -> [[f32; C]; R] {
        // Plain loops: a closure here would be compiled without AVX2 (see Avx512's).
        let mut sums = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                sums[r][c] = crate::cpu::sum_lanes(acc[r][c]);
            }
        }
        sums
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_of<T: TileWeight>(
        w: (*const T, usize, usize),
        _block_rows: usize,
        x: [*const f32; BLOCK_X],
        rx: usize,
        len: usize,
        ahead: Ahead,
    ) -> [[f32; BLOCK_X]; BLOCK_W] {
        block_of::<Self, T, 3>(w, x, rx, len, ahead)
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx512 {
    type V = std::arch::x86_64::__m512;
    const N: usize = 16;

    fn shape(rows_x: usize) -> (usize, usize) {
        if rows_x <= 8 {
            (3, 8)
        } else {
            (6, 4)
        }
    }

    #[target_feature(enable = "avx512f,avx512vl")]
    #[inline]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm512_setzero_ps()
    }

    #[target_feature(enable = "avx512f,avx512vl")]
    #[inline]
    unsafe fn load_w<T: TileWeight>(p: *const T) -> Self::V {
        T::load16(p)
    }

    #[target_feature(enable = "avx512f,avx512vl")]
    #[inline]
    unsafe fn load_x(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }

    #[target_feature(enable = "avx512f,avx512vl")]
    #[inline]
    unsafe fn fmadd(a: Self::V, b: Self::V, acc: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_fmadd_ps(a, b, acc)
    }

    #[target_feature(enable = "avx512f,avx512vl")]
    #[inline]
    unsafe fn sums<const R: usize, const C: usize>(acc: [[Self::V; C]; R]) -> [[f32; C]; R] {
        use std::arch::x86_64::*;
        if R * C < SUMS_TOGETHER {
            // Plain loops: a closure (array::map) is compiled without AVX-512, and it
            // called the reduction instead of inlining it.
            let mut sums = [[0f32; C]; R];
            for r in 0..R {
                for c in 0..C {
                    sums[r][c] = _mm512_reduce_add_ps(acc[r][c]);
                }
            }
            return sums;
        }
        // Sixteen at a time, in `_mm512_reduce_add_ps`'s order.
        let mut flat = [0f32; 32];
        for (chunk, out) in flat
            .chunks_exact_mut(16)
            .enumerate()
            .take((R * C).div_ceil(16))
        {
            let vectors: [__m512; 16] = std::array::from_fn(|i| {
                let i = 16 * chunk + i;
                if i < R * C {
                    acc[i / C][i % C]
                } else {
                    _mm512_setzero_ps()
                }
            });
            _mm512_storeu_ps(out.as_mut_ptr(), crate::cpu::sum_lanes_16(vectors));
        }
        std::array::from_fn(|r| std::array::from_fn(|c| flat[r * C + c]))
    }

    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn block_of<T: TileWeight>(
        w: (*const T, usize, usize),
        block_rows: usize,
        x: [*const f32; BLOCK_X],
        rx: usize,
        len: usize,
        ahead: Ahead,
    ) -> [[f32; BLOCK_X]; BLOCK_W] {
        match (block_rows, rx) {
            (6, _) => block_of::<Self, T, 6>(w, x, rx, len, ahead),
            (_, 5..) => widen(block::<Self, T, 3, 8>(rows_of(w), x, len, ahead)),
            _ => block_of::<Self, T, 3>(w, x, rx, len, ahead),
        }
    }
}

/// The R row pointers of a block of W from its first row, stride and rows: fewer rows than R
/// (the last block of a tile whose rows are not a multiple of R) repeat the last one, whose
/// extra sums the caller drops. So do x's rows past `rx` in a block of eight.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows_of<T, const R: usize>((w, ws, rw): (*const T, usize, usize)) -> [*const T; R] {
    std::array::from_fn(|r| w.add(r.min(rw - 1) * ws))
}

/// [`Lanes::block_of`]'s body for R rows of W and one to four of x, inlined into each width's
/// features.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_of<L: Lanes, T: TileWeight, const R: usize>(
    w: (*const T, usize, usize),
    x: [*const f32; BLOCK_X],
    rx: usize,
    len: usize,
    ahead: Ahead,
) -> [[f32; BLOCK_X]; BLOCK_W] {
    let w: [*const T; R] = rows_of(w);
    match rx {
        4 => widen(block::<L, T, R, 4>(w, [x[0], x[1], x[2], x[3]], len, ahead)),
        3 => widen(block::<L, T, R, 3>(w, [x[0], x[1], x[2]], len, ahead)),
        2 => widen(block::<L, T, R, 2>(w, [x[0], x[1]], len, ahead)),
        _ => widen(block::<L, T, R, 1>(w, [x[0]], len, ahead)),
    }
}

/// An R × C block's sums in the full [`BLOCK_W`] × [`BLOCK_X`] shape (the rest zero).
#[inline(always)]
fn widen<const R: usize, const C: usize>(s: [[f32; C]; R]) -> [[f32; BLOCK_X]; BLOCK_W] {
    let mut out = [[0f32; BLOCK_X]; BLOCK_W];
    for (o, s) in out.iter_mut().zip(s) {
        o[..C].copy_from_slice(&s);
    }
    out
}

/// Σ_k w[r][k]·x[c][k] for r < R, c < C: R·C FMA chains of `L::N` lanes over the rows (the
/// rest past a multiple of `L::N` zero-padded to one more step), one horizontal sum each at
/// the end, asking for `ahead`'s lines evenly along the way.
///
/// # Safety
/// The CPU must have `L`'s features; each w[r] and x[c] must hold `len` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block<L: Lanes, T: TileWeight, const R: usize, const C: usize>(
    w: [*const T; R],
    x: [*const f32; C],
    len: usize,
    ahead: Ahead,
) -> [[f32; C]; R] {
    let mut acc = [[L::zero(); C]; R];
    let steps = len / L::N;
    let (mut asked, mut step) = (0, 0);
    let mut k = 0;
    while k + L::N <= len {
        step += 1;
        ahead.ask_until(&mut asked, step, steps);
        let mut wv = [L::zero(); R];
        for (r, wv) in wv.iter_mut().enumerate() {
            *wv = L::load_w(w[r].add(k));
        }
        for c in 0..C {
            let xv = L::load_x(x[c].add(k));
            for r in 0..R {
                acc[r][c] = L::fmadd(wv[r], xv, acc[r][c]);
            }
        }
        k += L::N;
    }
    if k < len {
        // The rest, zero-padded to one more step: a short row (a rank-r factor) then costs
        // R·C multiply-adds of L::N lanes instead of R·C·(len − k) scalar ones.
        let pad = |p: *const f32| {
            let mut v = [0f32; 16];
            std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len - k);
            v
        };
        let xs: [[f32; 16]; C] = std::array::from_fn(|c| pad(x[c].add(k)));
        for r in 0..R {
            let mut v = [0f32; 16];
            for (v, kk) in v.iter_mut().zip(k..len) {
                *v = (*w[r].add(kk)).to_f32();
            }
            let wv = L::load_x(v.as_ptr());
            for c in 0..C {
                acc[r][c] = L::fmadd(wv, L::load_x(xs[c].as_ptr()), acc[r][c]);
            }
        }
    }
    L::sums(acc)
}

/// A value of W as the tile kernels read it: an f32, or a bf16 widened (exactly) to f32.
pub(crate) trait TileWeight: Copy + Send + Sync {
    fn to_f32(self) -> f32;

    /// Eight values from `p`, as f32.
    ///
    /// # Safety
    /// The CPU must have AVX2; eight values must be readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// Sixteen values from `p`, as f32.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; sixteen values must be readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl TileWeight for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl TileWeight for bf16 {
    /// A bf16 is the high half of an f32.
    #[inline]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;

    /// dot_tile's SIMD and portable paths against f64 sums: every block shape and its edges,
    /// row lengths around the eight-lane step, output offsets and strides.
    #[test]
    fn dot_tile_matches_f64() {
        dot_tile_matches_f64_over(|v| v);
    }

    /// The same over a bf16 W (widened in registers), against the widened values.
    #[test]
    fn dot_tile_bf16_matches_f64() {
        dot_tile_matches_f64_over(bf16::from_f32);
    }

    fn dot_tile_matches_f64_over<T: TileWeight>(make: impl Fn(f32) -> T) {
        // 40 rows of 300 exceed the slice budget: three slices of 96 and one of 12.
        for (nw, nx, len) in [(1, 40, 300), (4, 40, 300)].into_iter().chain(
            [1, 2, 3, 4, 5, 6, 7, 13].into_iter().flat_map(|nw| {
                [1, 2, 3, 4, 5, 6, 8, 9].into_iter().flat_map(move |nx| {
                    [0, 1, 7, 8, 9, 16, 17, 33, 100].map(move |len| (nw, nx, len))
                })
            }),
        ) {
            {
                {
                    let stride = len + 3;
                    let w: Vec<T> = values(nw * stride, nw + len)
                        .into_iter()
                        .map(&make)
                        .collect();
                    let xv: Vec<Vec<f32>> = (0..nx).map(|i| values(len, 50 + i)).collect();
                    let xs: Vec<&[f32]> = xv.iter().map(|v| v.as_slice()).collect();
                    let out_x: Vec<usize> = (0..nx).map(|i| 2 * i + 1).collect();
                    let out_w = 2 * nx + 1;
                    let size = out_x[nx - 1] + (nw - 1) * out_w + 1;
                    let start = values(size, 99);
                    let mut fast = start.clone();
                    dot_tile(&w, stride, nw, len, &xs, &mut fast, &out_x, out_w, nw > 1);
                    let mut portable = start.clone();
                    dot_tile_portable(&w, stride, nw, len, &xs, &mut portable, &out_x, out_w);
                    let mut paths = vec![("dispatched", fast), ("portable", portable)];
                    // Each SIMD width this CPU has, whichever the dispatch picks.
                    #[cfg(target_arch = "x86_64")]
                    {
                        let args = (stride, nw, len, &out_x[..], out_w, nw > 1);
                        if crate::cpu::has_avx2_fma() {
                            let mut y = start.clone();
                            // SAFETY: the CPU has AVX2+FMA; the sizes are dot_tile's, checked.
                            unsafe { dot_tile_simd::<Avx2, T>(&w, &xs, &mut y, args) };
                            paths.push(("avx2", y));
                        }
                        if crate::cpu::has_avx512f_vl() {
                            let mut y = start.clone();
                            // SAFETY: as above, for AVX-512F and VL.
                            unsafe { dot_tile_simd::<Avx512, T>(&w, &xs, &mut y, args) };
                            paths.push(("avx512", y));
                        }
                    }
                    for o in 0..nw {
                        for (i, x) in xs.iter().enumerate() {
                            let at = out_x[i] + o * out_w;
                            let want = start[at] as f64
                                + (0..len)
                                    .map(|k| w[o * stride + k].to_f32() as f64 * x[k] as f64)
                                    .sum::<f64>();
                            for (path, got) in paths.iter().map(|(p, y)| (p, y[at])) {
                                assert!(
                                    (got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                                    "{path}: nw {nw} nx {nx} len {len} ({o}, {i}): {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// A segment of one or two rows takes its own shrink and expand kernels, and must give
    /// the dot-product blocks' sums bit for bit, so that a row's output does not depend on how
    /// many rows share its adapter: ranks of one and two vectors, rows of whole vectors and not,
    /// a tile that is not a multiple of 16 outputs.
    #[test]
    fn few_row_segments_sum_as_the_blocks() {
        for (r, in_f, rows_out) in [
            (16, 48, 24),
            (16, 37, 13),
            (32, 64, 24),
            (32, 19, 40),
            (8, 40, 24),
            (24, 33, 13),
        ] {
            for rows in [vec![2], vec![0, 3]] {
                let m = 5;
                let a = values(r * in_f, r + in_f);
                let b = values(rows_out * r, 7 + rows_out);
                let xv: Vec<Vec<f32>> = rows.iter().map(|&i| values(in_f, 30 + i)).collect();
                let xs: Vec<&[f32]> = xv.iter().map(|v| v.as_slice()).collect();
                let at = format!("r {r} in_f {in_f} rows_out {rows_out} rows {rows:?}");

                let mut t = vec![0f32; rows.len() * r];
                let mut t_blocks = t.clone();
                if !shrink_few_rows(&a, in_f, &xs, &mut t) {
                    continue; // No AVX-512: the blocks serve these segments too.
                }
                let out_x: Vec<usize> = (0..rows.len()).map(|i| i * r).collect();
                dot_tile(&a, in_f, r, in_f, &xs, &mut t_blocks, &out_x, 1, true);
                assert_eq!(t, t_blocks, "shrink, {at}");

                if r < SHORT_RANK {
                    continue; // `expand_short_rank_avx512`'s, for every row count.
                }
                let start = values(rows_out * m, 3);
                let mut tile = start.clone();
                assert!(expand_by_kernels(&b, r, &t, &rows, m, &mut tile), "{at}");
                let mut tile_blocks = start.clone();
                let ts: Vec<&[f32]> = t.chunks_exact(r).collect();
                dot_tile(&b, r, rows_out, r, &ts, &mut tile_blocks, &rows, m, false);
                assert_eq!(tile, tile_blocks, "expand, {at}");
                assert_ne!(tile, start, "expand added nothing, {at}");
            }
        }
    }

    /// A row's output is the same bit for bit whether its adapter's segment has it alone, with
    /// one other row (over f32 both expanded with the shrink, over NF4 in the tiles by their
    /// own kernel) or with five (expanded by the blocks), for ranks below, at and above one
    /// vector, as the server needs (greedy outputs must not depend on the rest of the batch).
    #[test]
    fn a_rows_output_does_not_depend_on_who_shares_its_adapter() {
        let (in_f, out_f, m) = (64, 50, 12);
        let w = values(out_f * in_f, 1);
        let q =
            Quantized4Bit::quantize(&w, &[out_f, in_f], lowrank_quant::QuantType::Nf4, 64, false)
                .unwrap();
        let x = values(m * in_f, 2);
        for (r, weight) in [8, 16, 24]
            .into_iter()
            .flat_map(|r| [(r, BaseWeights::F32(&w)), (r, BaseWeights::FourBit(&q))])
        {
            let (a, b) = (values(r * in_f, 3), values(out_f * r, 4));
            let row_three = |rows: &[usize]| {
                let linear = StepLinear {
                    weight,
                    bias: None,
                    segments: vec![Segment {
                        a: &a,
                        b: &b,
                        scale: 0.5,
                        rows,
                        column_scale: None,
                    }],
                };
                skinny(&x, in_f, &[linear]).remove(0)[3 * out_f..4 * out_f].to_vec()
            };
            let at = format!(
                "rank {r}, 4-bit {}",
                matches!(weight, BaseWeights::FourBit(_))
            );
            let alone = row_three(&[3]);
            assert_eq!(alone, row_three(&[3, 8]), "{at}, two rows");
            assert_eq!(alone, row_three(&[1, 3, 5, 7, 9]), "{at}, five rows");
            assert_ne!(alone, row_three(&[]), "{at}: the adapter added nothing");
        }
    }

    /// A short-rank expand against f64 sums, and each row's output the same bit for bit
    /// whether its segment has it alone or with others: ranks 1 to 15, groups of 16 rows and a
    /// part, rows in a run and scattered.
    #[test]
    fn short_rank_expand_matches_f64_and_each_row_alone() {
        let m = 40;
        for r in [1, 4, 8, 15] {
            for rows in [(0..20).collect::<Vec<usize>>(), vec![1, 5, 6, 30, 39]] {
                let rows_out = 13;
                let b = values(rows_out * r, r);
                let t = values(rows.len() * r, 11 + r);
                let start = values(rows_out * m, 5);
                let at = format!("r {r} rows {rows:?}");
                let mut together = start.clone();
                if !expand_by_kernels(&b, r, &t, &rows, m, &mut together) {
                    return; // No AVX-512: `dot_portable` serves every row count.
                }
                let mut alone = start.clone();
                for (i, t) in rows.iter().zip(t.chunks_exact(r)) {
                    assert!(expand_by_kernels(&b, r, t, &[*i], m, &mut alone));
                }
                assert_eq!(together, alone, "{at}");
                for o in 0..rows_out {
                    for (c, &i) in rows.iter().enumerate() {
                        let want = start[o * m + i] as f64
                            + (0..r)
                                .map(|k| b[o * r + k] as f64 * t[c * r + k] as f64)
                                .sum::<f64>();
                        let got = together[o * m + i] as f64;
                        assert!(
                            (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "{at} ({o}, {i})"
                        );
                    }
                }
                for (o, column) in together.chunks_exact(m).enumerate() {
                    for (i, v) in column.iter().enumerate() {
                        if !rows.contains(&i) {
                            assert_eq!(*v, start[o * m + i], "{at}: row {i} is not the segment's");
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 row decoder gives `dequantize_range`'s values bit for bit: blocks within
    /// rows, straddling them and covering several, from a row past the first.
    #[test]
    fn decoded_rows_equal_dequantize_range() {
        for (in_f, out_f, qt, block, dq) in [
            (128, 9, lowrank_quant::QuantType::Nf4, 64, true),
            (96, 11, lowrank_quant::QuantType::Nf4, 64, true),
            (32, 13, lowrank_quant::QuantType::Fp4, 128, false),
        ] {
            let q =
                Quantized4Bit::quantize(&values(out_f * in_f, 3), &[out_f, in_f], qt, block, dq)
                    .unwrap();
            let lut = q.pair_lut();
            let (o0, nw) = (1, out_f - 1);
            let blocks = RowBlocks::for_decoding(&q, in_f, o0, nw);
            #[cfg(target_arch = "x86_64")]
            assert_eq!(blocks.is_some(), crate::cpu::has_avx512f());
            for (first, rows) in [(o0, nw), (o0 + 2, 3)] {
                let mut got = vec![0f32; rows * in_f];
                decode_rows(&q, &lut, blocks.as_ref(), in_f, first, &mut got);
                let mut want = vec![0f32; rows * in_f];
                q.dequantize_range(&lut, first * in_f, &mut want);
                assert_eq!(
                    got, want,
                    "{qt:?} in {in_f} block {block}, rows {first}+{rows}"
                );
            }
        }
    }

    /// The 4-bit kernels that decode in registers — AVX2's for up to four rows of X, AVX-512's
    /// for up to twelve (X in code order) — against f64 sums over the dequantized weight, where
    /// the CPU has them: NF4 and FP4, plain and double-quantized absmax, blocks that straddle
    /// rows (96 inputs in blocks of 64) and cover several (32 inputs in blocks of 128), from
    /// an output row past the first.
    #[test]
    fn fourbit_kernels_match_f64() {
        for (in_f, out_f, qt, block, dq) in [
            (96, 11, lowrank_quant::QuantType::Nf4, 64, true),
            (32, 13, lowrank_quant::QuantType::Fp4, 128, false),
            (64, 7, lowrank_quant::QuantType::Nf4, 32, false),
            (128, 9, lowrank_quant::QuantType::Nf4, 64, true),
        ] {
            let q =
                Quantized4Bit::quantize(&values(out_f * in_f, 1), &[out_f, in_f], qt, block, dq)
                    .unwrap();
            let w = q.dequantize();
            let (o0, nw) = (2, out_f - 2);
            for m in 1..=FOURBIT_WIDE_ROWS + 2 {
                let xv = values(m * in_f, 20 + m);
                let x: Vec<&[f32]> = xv.chunks_exact(in_f).collect();
                let x_ordered = in_code_order(&xv, in_f);
                let mut paths = Vec::new();
                let mut tile = vec![0f32; nw * m];
                // Without X in code order, the AVX2 kernel (up to four rows).
                if fourbit_rows(&q, in_f, o0, nw, (&x, None), &mut tile) {
                    paths.push(("avx2", tile));
                }
                if let Some(xo) = &x_ordered {
                    let mut tile = vec![0f32; nw * m];
                    assert!(fourbit_rows(
                        &q,
                        in_f,
                        o0,
                        nw,
                        (&x, Some(xo.as_slice())),
                        &mut tile
                    ));
                    paths.push(("avx512", tile));
                }
                #[cfg(target_arch = "x86_64")]
                assert_eq!(
                    x_ordered.is_some(),
                    crate::cpu::has_avx512f_vl() && m <= FOURBIT_WIDE_ROWS,
                    "{m} rows"
                );
                for (path, tile) in &paths {
                    for o in 0..nw {
                        for (i, x) in x.iter().enumerate() {
                            let want: f64 = (0..in_f)
                                .map(|k| w[(o0 + o) * in_f + k] as f64 * x[k] as f64)
                                .sum();
                            let got = tile[o * m + i] as f64;
                            assert!(
                                (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                                "{path} {qt:?} in {in_f} block {block}: {m} rows ({o}, {i}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
