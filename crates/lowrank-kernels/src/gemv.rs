//! Batch-1 decoding's matrix-vector products: y = W·x (+ scale·B·(A·x)) (+ bias) for one input
//! row, several linears of the same x in one parallel pass over their weights.
//!
//! Rows are split across the rayon pool in runs of 16, each run one call (`streamed_rows`,
//! `streamed_rows_bf16`) that streams its rows and asks for the bytes ahead of its reads. An
//! unmerged LoRA's B term rides in each row's dot product (B[o]·(scale·A·x) folded into the
//! same lane sums as W[o]·x), so the adapter adds no second pass over the output. A·x is
//! computed inside the same pass: with `decode_team` helpers awake, as one task at the
//! midpoint of the pass's items, where a helper takes it from its cache while the calling
//! thread streams W; otherwise split in two halves where the pool's two threads start. A run
//! that finds A·x not yet complete adds its B term apart, or leaves it to whichever thread
//! completes A·x.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;

use half::bf16;

use crate::bf16_rows::streamed_rows_bf16;
use crate::cpu::{add_scaled_matvec, prefetch, streamed_rows, RunTail};

/// Output rows per task.
const ROWS: usize = 16;

/// The LoRA term of one linear: y[o] += scale·B[o]·(A·x), A (r × in) and B (out × r)
/// row-major.
#[derive(Clone, Copy)]
pub(crate) struct LowRankTerm<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub scale: f32,
}

/// W (out × in) row-major: f32, or bf16 widened in registers (f32 accumulation either way).
#[derive(Clone, Copy)]
pub(crate) enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Weights<'_> {
    /// y[k] = W[rows.start + k]·x, plus the tail's B term, for a run of rows.
    fn run(self, rows: Range<usize>, x: &[f32], y: &mut [f32], tail: RunTail) {
        let in_f = x.len();
        let span = rows.start * in_f..rows.end * in_f;
        match self {
            Weights::F32(w) => streamed_rows(&w[span], x, y, tail),
            Weights::Bf16(w) => streamed_rows_bf16(&w[span], x, y, tail),
        }
    }

    fn len(self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }
}

/// One linear of [`gemv_parts`]: its weights, LoRA term and bias.
pub(crate) struct GemvPart<'a> {
    pub w: Weights<'a>,
    pub lora: Option<LowRankTerm<'a>>,
    pub bias: Option<&'a [f32]>,
}

impl GemvPart<'_> {
    fn out_f(&self, in_f: usize) -> usize {
        self.w.len().checked_div(in_f).unwrap_or(0)
    }
}

/// y = W·x (+ LoRA term) (+ bias) for one input row, W (out × x.len()).
pub(crate) fn gemv(
    x: &[f32],
    w: Weights,
    lora: Option<LowRankTerm>,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let part = GemvPart { w, lora, bias };
    gemv_parts(x, &[part]).pop().expect("one part")
}

/// Which rows of every part's A one A·x task computes.
#[derive(Clone, Copy)]
enum Share {
    Whole,
    FirstHalf,
    SecondHalf,
}

impl Share {
    fn rows(self, r: usize) -> Range<usize> {
        match self {
            Share::Whole => 0..r,
            Share::FirstHalf => 0..r / 2,
            Share::SecondHalf => r / 2..r,
        }
    }

    /// Its slot among the pass's shares.
    fn slot(self) -> usize {
        match self {
            Share::Whole | Share::FirstHalf => 0,
            Share::SecondHalf => 1,
        }
    }
}

/// A task of the pass: a share of A·x, or a run of one part's output rows.
enum Task<'y> {
    LowRankInput {
        share: Share,
    },
    Run {
        part: usize,
        start: usize,
        y: &'y mut [f32],
    },
}

/// Several linears of the same input x in one parallel pass over all their rows (q, k and v,
/// or gate and up): one dispatch and one tail instead of one per linear.
pub(crate) fn gemv_parts(x: &[f32], parts: &[GemvPart]) -> Vec<Vec<f32>> {
    let in_f = x.len();
    let ranks: Vec<usize> = parts
        .iter()
        .map(|p| {
            p.lora
                .map_or(0, |l| l.a.len().checked_div(in_f).unwrap_or(0))
        })
        .collect();
    // Every part's scale·A·x in one buffer, part i's at offsets[i]..offsets[i] + ranks[i].
    let offsets: Vec<usize> = ranks
        .iter()
        .scan(0, |next, &r| {
            let offset = *next;
            *next += r;
            Some(offset)
        })
        .collect();
    let total_rank: usize = ranks.iter().sum();
    let n_runs: usize = parts.iter().map(|p| p.out_f(in_f).div_ceil(ROWS)).sum();

    // [A·x first half, first half of the runs, A·x second half, the other runs], or with
    // helpers awake [first half of the runs, A·x, the other runs]: rayon splits a parallel
    // iterator's items at len / 2 first, which is where the second share of A·x is.
    let low_rank = total_rank > 0;
    let (first_share, second_share) = if crate::decode_team::helpers_awake() {
        (None, Share::Whole)
    } else {
        (Some(Share::FirstHalf), Share::SecondHalf)
    };
    let n_shares = 1 + usize::from(first_share.is_some());
    let mut ys: Vec<Vec<f32>> = parts.iter().map(|p| vec![0f32; p.out_f(in_f)]).collect();
    let mut tasks = Vec::with_capacity(n_runs + 2);
    if let Some(share) = first_share.filter(|_| low_rank) {
        tasks.push(Task::LowRankInput { share });
    }
    let mut runs = 0;
    for (part, y) in ys.iter_mut().enumerate() {
        for (c, y) in y.chunks_mut(ROWS).enumerate() {
            if runs == n_runs / 2 && low_rank {
                tasks.push(Task::LowRankInput {
                    share: second_share,
                });
            }
            tasks.push(Task::Run {
                part,
                start: c * ROWS,
                y,
            });
            runs += 1;
        }
    }
    if n_runs == 0 && low_rank {
        tasks.push(Task::LowRankInput {
            share: second_share,
        });
    }

    // Each share of A·x is written whole by one thread (its own buffer, so two threads never
    // write the same cache line), and whichever completes last adds them into `axs` (the rows
    // each share leaves are zero). Runs that found `axs` missing wait in `late` for that
    // thread.
    let shares: [OnceLock<Vec<f32>>; 2] = Default::default();
    let shares_done = AtomicUsize::new(0);
    let axs: OnceLock<Vec<f32>> = OnceLock::new();
    let late: Mutex<Vec<(usize, usize, &mut [f32])>> = Mutex::new(Vec::new());
    let add_low_rank = |axs: &[f32], part: usize, start: usize, y: &mut [f32]| {
        let r = ranks[part];
        let ax = &axs[offsets[part]..offsets[part] + r];
        let b = parts[part].lora.expect("a part with A·x").b;
        add_scaled_matvec(y, &b[start * r..(start + y.len()) * r], ax, 1.0);
    };
    tasks.into_par_iter().for_each(|task| match task {
        Task::LowRankInput { share } => {
            let mut ax = vec![0f32; total_rank];
            for (part, &r) in ranks.iter().enumerate().filter(|(_, &r)| r > 0) {
                let lora = parts[part].lora.expect("a part with A·x");
                let rows = share.rows(r);
                // Rows of A as `add_scaled_matvec` reads them, eight at a time.
                add_scaled_matvec(
                    &mut ax[offsets[part] + rows.start..offsets[part] + rows.end],
                    &lora.a[rows.start * in_f..rows.end * in_f],
                    x,
                    lora.scale,
                );
            }
            shares[share.slot()]
                .set(ax)
                .expect("each share of A·x is computed once");
            // AcqRel: the last share to finish sees the others' buffers.
            if shares_done.fetch_add(1, Ordering::AcqRel) + 1 == n_shares {
                let mut done = shares.iter().filter_map(OnceLock::get);
                let mut sum = done.next().expect("a share of A·x").clone();
                for other in done {
                    sum.iter_mut().zip(other).for_each(|(s, o)| *s += o);
                }
                let axs = axs.get_or_init(|| sum);
                // Set before taking the lock: a run that locks after this sees it set.
                let waiting = std::mem::take(&mut *late.lock().expect("late runs"));
                for (part, start, y) in waiting {
                    add_low_rank(axs, part, start, y);
                }
            }
        }
        Task::Run { part, start, y } => {
            let p = &parts[part];
            let rows = start..start + y.len();
            let r = ranks[part];
            let lora = p.lora.filter(|_| r > 0);
            if let Some(lora) = lora {
                prefetch(&lora.b[rows.start * r..rows.end * r]);
            }
            // With A·x complete, each row's B term rides in its dot product's sums.
            let ax = lora
                .and(axs.get())
                .map(|axs| &axs[offsets[part]..offsets[part] + r]);
            let tail = lora
                .zip(ax)
                .map(|(lora, ax)| (&lora.b[rows.start * r..rows.end * r], ax));
            p.w.run(rows.clone(), x, y, tail);
            if let Some(bias) = p.bias {
                for (y, b) in y.iter_mut().zip(&bias[rows]) {
                    *y += b;
                }
            }
            if lora.is_none() || ax.is_some() {
                return;
            }
            // A·x was incomplete when the run began: the B term is added apart.
            if let Some(axs) = axs.get() {
                return add_low_rank(axs, part, start, y);
            }
            let mut waiting = late.lock().expect("late runs");
            match axs.get() {
                Some(axs) => {
                    drop(waiting);
                    add_low_rank(axs, part, start, y);
                }
                None => waiting.push((part, start, y)),
            }
        }
    });
    ys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;

    /// W·x + scale·B·(A·x) + bias, one row at a time in f64.
    fn reference(
        x: &[f32],
        w: &[f32],
        lora: Option<LowRankTerm>,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let in_f = x.len();
        let dot64 = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
        };
        let ax: Vec<f64> = lora.map_or_else(Vec::new, |l| {
            l.a.chunks(in_f).map(|row| dot64(row, x)).collect()
        });
        w.chunks(in_f)
            .enumerate()
            .map(|(o, row)| {
                let mut y = dot64(row, x);
                if let Some(l) = lora {
                    let r = ax.len();
                    let b_row = &l.b[o * r..(o + 1) * r];
                    y += l.scale as f64
                        * b_row
                            .iter()
                            .zip(&ax)
                            .map(|(b, a)| *b as f64 * a)
                            .sum::<f64>();
                }
                (y + bias.map_or(0.0, |b| b[o] as f64)) as f32
            })
            .collect()
    }

    /// Three linears of one input (with and without LoRA and bias, odd ranks and output sizes
    /// that leave partial runs) match the reference, on one thread — where runs before the
    /// second half of A·x always leave their B term to it — on two, and on two inside a
    /// decoding step with a helper awake, where A·x is one task.
    #[test]
    fn parts_match_the_reference_on_one_and_two_threads() {
        let in_f = 96;
        let x = values(in_f, 1);
        // (out, rank, bias)
        let shapes = [(50, 5, true), (37, 0, false), (130, 16, false)];
        // One vector per shape, of the length `len` gives, from its own seed.
        let per_shape = |seed: usize, len: &dyn Fn((usize, usize, bool)) -> usize| {
            shapes
                .iter()
                .enumerate()
                .map(|(i, &shape)| values(len(shape), seed + i))
                .collect::<Vec<_>>()
        };
        let ws = per_shape(10, &|(o, _, _)| o * in_f);
        let a_s = per_shape(20, &|(_, r, _)| r * in_f);
        let b_s = per_shape(30, &|(o, r, _)| o * r);
        let biases = per_shape(40, &|(o, _, _)| o);
        let loras: Vec<Option<LowRankTerm>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(_, r, _))| {
                (r > 0).then_some(LowRankTerm {
                    a: &a_s[i],
                    b: &b_s[i],
                    scale: 0.75,
                })
            })
            .collect();
        let bias_of = |i: usize| shapes[i].2.then_some(biases[i].as_slice());
        let parts: Vec<GemvPart> = (0..shapes.len())
            .map(|i| GemvPart {
                w: Weights::F32(&ws[i]),
                lora: loras[i],
                bias: bias_of(i),
            })
            .collect();
        for (threads, helped) in [(1, false), (2, false), (2, true)] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for _ in 0..20 {
                let got = pool.install(|| {
                    if helped {
                        crate::with_helpers(|team| {
                            assert!(team.is_helped());
                            gemv_parts(&x, &parts)
                        })
                    } else {
                        gemv_parts(&x, &parts)
                    }
                });
                for (i, y) in got.iter().enumerate() {
                    let want = reference(&x, &ws[i], loras[i], bias_of(i));
                    for (o, (g, w)) in y.iter().zip(&want).enumerate() {
                        if (g - w).abs() > 1e-4 * (1.0 + w.abs()) {
                            eprintln!("row {o}: {g} vs {w}");
                        }
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "part {i}, {threads} threads (helped {helped}): {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
