//! GEMM with bf16 inputs and f32 accumulation, for training over a frozen bf16 base
//! (`--compute-dtype bf16`): dst = bf16(lhs) · rhs, lhs f32 activations rounded to bf16
//! (round to nearest even), rhs a bf16 weight, every product exact in f32 and summed in f32.
//!
//! CPUs with AVX512-BF16 can run our own microkernel on `vdpbf16ps`, which multiplies pairs
//! of bf16 and adds both products to an f32 lane: twice the multiply-adds per instruction of
//! an f32 FMA. Whether that is faster depends on the core (on some it issues at half the
//! FMA's rate), so the kernel is used only where a one-off timing of both paths at first use
//! says it wins.
//! Otherwise the same numbers come from the f32 GEMM on the rounded activations and the
//! weight widened to f32 (bf16 → f32 is exact), so results agree across CPUs up to the order
//! of the f32 sums.
//!
//! That order shows in the last bits, and bf16 rounding downstream can grow it to ~1e-5 in a
//! loss: two processes that time differently (two MPI ranks, a run and its resume) need not
//! agree bit for bit. `LOWRANK_BF16_GEMM=dot` or `=widen` names the kernel instead, as MKL's
//! `MKL_CBWR` pins its code path.

use std::sync::Arc;
use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, DType, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::cpu::{require_cpu, sgemm, Mat};
use crate::frozen_linear::FrozenMatmul;

const NAME: &str = "lowrank-bf16-gemm";

/// A strided bf16 matrix operand: data and (row stride, column stride).
#[derive(Clone, Copy)]
pub(crate) struct Bf16Mat<'a> {
    pub data: &'a [bf16],
    pub rs: usize,
    pub cs: usize,
}

impl Bf16Mat<'_> {
    #[inline(always)]
    fn at(&self, row: usize, col: usize) -> bf16 {
        self.data[row * self.rs + col * self.cs]
    }
}

/// The two ways this module runs a bf16 GEMM: both multiply exactly the same values and
/// differ only in the order of the f32 sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// Our AVX512-BF16 microkernel on `vdpbf16ps`.
    Dot,
    /// The f32 GEMM over the rounded activations and the widened weight.
    Widen,
}

/// The environment variable that names the kernel (`dot` or `widen`) for every process.
pub const BF16_KERNEL_VAR: &str = "LOWRANK_BF16_GEMM";

/// This process's bf16 GEMM kernel, chosen once: the one `LOWRANK_BF16_GEMM` names, else
/// AVX512-BF16's where this CPU has it and it times faster. An unknown name, or `dot` on a
/// CPU without AVX512-BF16, is an error naming the variable.
pub fn bf16_kernel() -> Result<Bf16Kernel> {
    static CHOICE: OnceLock<std::result::Result<Bf16Kernel, String>> = OnceLock::new();
    CHOICE
        .get_or_init(|| choose_kernel(std::env::var(BF16_KERNEL_VAR).ok().as_deref()))
        .clone()
        .map_err(candle_core::Error::Msg)
}

fn choose_kernel(named: Option<&str>) -> std::result::Result<Bf16Kernel, String> {
    match named.map(str::trim) {
        None | Some("") => Ok(if dot_kernel_is_faster() {
            Bf16Kernel::Dot
        } else {
            Bf16Kernel::Widen
        }),
        Some("widen") => Ok(Bf16Kernel::Widen),
        Some("dot") if dot_kernel_available() => Ok(Bf16Kernel::Dot),
        Some("dot") => Err(format!(
            "{BF16_KERNEL_VAR}=dot needs a CPU with AVX512-BF16, and this one has none \
             (use widen, or leave it unset)"
        )),
        Some(other) => Err(format!(
            "{BF16_KERNEL_VAR}={other:?}: expected dot or widen (or leave it unset to time both)"
        )),
    }
}

fn dot_kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx512::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// dst (m×n, row-major) [+]= bf16(lhs) (m×k) · rhs (k×n), accumulated in f32 by `kernel`.
pub(crate) fn gemm_bf16(
    kernel: Bf16Kernel,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: Mat,
    rhs: Bf16Mat,
    accumulate: bool,
) {
    assert!(dst.len() >= m * n, "gemm_bf16: dst too small");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        k == 0 || (m - 1) * lhs.rs + (k - 1) * lhs.cs < lhs.data.len(),
        "gemm_bf16: lhs too small"
    );
    assert!(
        k == 0 || (k - 1) * rhs.rs + (n - 1) * rhs.cs < rhs.data.len(),
        "gemm_bf16: rhs too small"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if k > 0 && kernel == Bf16Kernel::Dot {
            return avx512::gemm((m, n, k), dst, lhs, rhs, accumulate);
        }
    }
    widened::gemm((m, n, k), dst, lhs, rhs, accumulate)
}

/// A linear's product Y (rows × out_f) = bf16(x) · Wᵀ for a bf16 W (out_f × in_f, row-major).
pub(crate) fn x_wt(
    kernel: Bf16Kernel,
    x: &[f32],
    rows: usize,
    w: &[bf16],
    (out_f, in_f): (usize, usize),
) -> Vec<f32> {
    let mut y = vec![0f32; rows * out_f];
    let wt = Bf16Mat {
        data: w,
        rs: 1,
        cs: in_f,
    };
    gemm_bf16(
        kernel,
        (rows, out_f, in_f),
        &mut y,
        Mat::rows(x, in_f),
        wt,
        false,
    );
    y
}

/// Whether this CPU has AVX512-BF16 and its kernel beat the widening path on a 512×512×512
/// product (best of three each: a few milliseconds). Smaller products flatter the kernel: the
/// widening path's rounding and widening passes weigh more there than at training sizes.
fn dot_kernel_is_faster() -> bool {
    #[cfg(not(target_arch = "x86_64"))]
    return false;
    #[cfg(target_arch = "x86_64")]
    {
        if !avx512::available() {
            return false;
        }
        let (m, n, k) = (512, 512, 512);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<bf16> = (0..k * n).map(|i| bf16::from_f32((i % 5) as f32)).collect();
        let rhs = Bf16Mat {
            data: &b,
            rs: n,
            cs: 1,
        };
        let mut c = vec![0f32; m * n];
        let mut best = |f: &dyn Fn(&mut [f32])| {
            (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f(&mut c);
                    t.elapsed()
                })
                .min()
                .expect("three runs")
        };
        let dot = best(&|c| avx512::gemm((m, n, k), c, Mat::rows(&a, k), rhs, false));
        let widen = best(&|c| widened::gemm((m, n, k), c, Mat::rows(&a, k), rhs, false));
        dot < widen
    }
}

/// f32 → bf16 → f32, round to nearest even (NaN stays NaN).
#[inline(always)]
fn round_bf16(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// Values per task of [`round_to_bf16`], [`rounded_to_bf16`] and [`all_bf16`]: a prefill's
/// activations (256 rows of 576) ran on one thread while the pool's other threads waited (2%
/// of its samples each, once per group of linears).
const PARALLEL_VALUES: usize = 1 << 14;

/// v rounded to the nearest bf16 (ties to even; a NaN stays a NaN): the same value as
/// `half::bf16::from_f32`, in branch-free integer steps the compiler vectorises (the `half`
/// call per value took a tenth of a 256-token prefill).
#[inline(always)]
fn nearest_bf16(v: f32) -> f32 {
    let bits = v.to_bits();
    let nan = bits & 0x7fff_ffff > 0x7f80_0000;
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(if nan {
        (bits | 0x0040_0000) & 0xffff_0000
    } else {
        rounded
    })
}

/// Rounds every value to the nearest bf16 ([`nearest_bf16`]) in place, runs of
/// [`PARALLEL_VALUES`] in parallel.
pub fn round_to_bf16(values: &mut [f32]) {
    values
        .par_chunks_mut(PARALLEL_VALUES)
        .for_each(|run| run.iter_mut().for_each(|v| *v = nearest_bf16(*v)));
}

/// A copy of `values`, each rounded to the nearest bf16 ([`nearest_bf16`]), written in runs of
/// [`PARALLEL_VALUES`] in parallel: a copy and then [`round_to_bf16`] spent 1% of a prefill
/// copying on one thread.
pub fn rounded_to_bf16(values: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(values.len());
    out.spare_capacity_mut()[..values.len()]
        .par_chunks_mut(PARALLEL_VALUES)
        .zip(values.par_chunks(PARALLEL_VALUES))
        .for_each(|(dst, src)| {
            for (d, &v) in dst.iter_mut().zip(src) {
                d.write(nearest_bf16(v));
            }
        });
    // SAFETY: the loop above wrote each of the first values.len() elements.
    unsafe { out.set_len(values.len()) };
    out
}

/// Whether every value already is a bf16 (its low sixteen bits zero); runs of
/// [`PARALLEL_VALUES`] in parallel.
pub fn all_bf16(values: &[f32]) -> bool {
    if values.len() > PARALLEL_VALUES {
        return values.par_chunks(PARALLEL_VALUES).all(all_bf16);
    }
    values.iter().fold(0, |low, v| low | (v.to_bits() & 0xffff)) == 0
}

/// The fallback: f32 GEMMs on exactly the values the bf16 kernel multiplies.
mod widened {
    use super::*;

    /// At most this many rhs elements are widened at once (16 MiB of f32): a whole weight of
    /// a 135M–1B model, a block of columns of anything larger, so the conversion never holds
    /// a second full-size copy of a big weight.
    const WIDEN_ELEMS: usize = 1 << 22;

    pub(super) fn gemm(
        (m, n, k): (usize, usize, usize),
        dst: &mut [f32],
        lhs: Mat,
        rhs: Bf16Mat,
        accumulate: bool,
    ) {
        let mut a = vec![0f32; m * k];
        a.par_chunks_mut(k.max(1)).enumerate().for_each(|(i, row)| {
            for (c, v) in row.iter_mut().enumerate() {
                *v = round_bf16(lhs.data[i * lhs.rs + c * lhs.cs]);
            }
        });
        let block_cols = (WIDEN_ELEMS / k.max(1)).max(64).min(n);
        let mut block = vec![0f32; k * block_cols];
        for j0 in (0..n).step_by(block_cols) {
            let cols = block_cols.min(n - j0);
            // Widened in the layout rhs already has, so the copy reads it in order: W read as
            // Wᵀ (x·Wᵀ) is column-major, W itself (dy·W) row-major.
            let widened = if rhs.rs == 1 {
                block
                    .par_chunks_mut(k.max(1))
                    .take(cols)
                    .enumerate()
                    .for_each(|(j, col)| {
                        for (kk, v) in col.iter_mut().enumerate() {
                            *v = rhs.at(kk, j0 + j).to_f32();
                        }
                    });
                Mat::t(&block[..k * cols], k)
            } else {
                block
                    .par_chunks_mut(cols)
                    .take(k)
                    .enumerate()
                    .for_each(|(kk, row)| {
                        for (j, v) in row.iter_mut().enumerate() {
                            *v = rhs.at(kk, j0 + j).to_f32();
                        }
                    });
                Mat::rows(&block[..k * cols], cols)
            };
            sgemm(
                m,
                cols,
                k,
                &mut dst[j0..],
                n,
                Mat::rows(&a, k),
                widened,
                1.0,
                accumulate,
                true,
            );
        }
    }
}

/// The AVX512-BF16 kernel: `lowrank_quant::tiled`'s engine on bf16 pairs along k
/// (`vdpbf16ps` takes one u32 of two bf16 per lane). For x·Wᵀ with an even k, W's rows are
/// read in place as rows of pairs and x's rows are rounded to bf16 (32 lanes at a time,
/// `vcvtne2ps2bf16`) and packed. Any other layout (dy·W reads W row-major) runs as
/// dstᵀ = rhsᵀ · lhsᵀ: rhs's columns packed (pairs down a column, read along rhs's rows) and
/// lhs's rows rounded once and read in place.
///
/// The first version packed rhs into panels of 32 columns and ran every panel past one tile
/// of 12 lhs rows at a time (Zen 4, x·Wᵀ of 256 rows: 277–301 GFLOP/s against 358–387 now; even
/// at 1024 rows; kernel notes in docs/performance.md).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{bf16, Bf16Mat, Mat};
    use half::slice::HalfFloatSliceExt;
    use lowrank_quant::tiled::{pack_lanes, run, Broadcast, Dst, Kernel, Rows};
    use rayon::prelude::*;
    use std::arch::x86_64::{__m512i, _mm512_cvtne2ps_pbh, _mm512_loadu_ps, _mm512_storeu_si512};

    pub(super) fn available() -> bool {
        Kernel::Bf16Pairs.available()
    }

    pub(super) fn gemm(
        (m, n, k): (usize, usize, usize),
        dst: &mut [f32],
        lhs: Mat,
        rhs: Bf16Mat,
        accumulate: bool,
    ) {
        let kp = k.div_ceil(2);
        if rhs.rs == 1 && rhs.cs == k && k.is_multiple_of(2) {
            // x·Wᵀ: rows of x packed, rows of W read in place.
            let dst = Dst::new(dst, (m, n), n, 1);
            let pack = |first: usize, count: usize, width: usize, out: &mut [u32]| {
                pack_lanes(count, kp, width, out, |i, row| {
                    round_row(lhs, first + i, k, row)
                })
            };
            let w = Broadcast::InPlace(Rows::bf16_pairs(
                rhs.data[..n * k].reinterpret_cast(),
                n,
                kp,
                kp,
            ));
            run(Kernel::Bf16Pairs, (m, n), pack, w, &dst, accumulate);
        } else {
            let dst = Dst::new(dst, (n, m), 1, n);
            let bits = |row: usize, col: usize| {
                if row < k {
                    rhs.at(row, col).to_bits() as u32
                } else {
                    0
                }
            };
            let pack = |c0: usize, cols: usize, lanes: usize, out: &mut [u32]| {
                for (p, out) in out.chunks_exact_mut(lanes).enumerate() {
                    let (out, beyond) = out.split_at_mut(cols);
                    beyond.fill(0);
                    if rhs.cs == 1 && 2 * p + 1 < k {
                        // Two rows of rhs side by side (a loop the compiler vectorises).
                        let row = |r: usize| &rhs.data[r * rhs.rs + c0..][..cols];
                        for ((o, lo), hi) in out.iter_mut().zip(row(2 * p)).zip(row(2 * p + 1)) {
                            *o = lo.to_bits() as u32 | (hi.to_bits() as u32) << 16;
                        }
                    } else {
                        for (j, o) in out.iter_mut().enumerate() {
                            *o = bits(2 * p, c0 + j) | bits(2 * p + 1, c0 + j) << 16;
                        }
                    }
                }
            };
            let mut rounded = vec![0u32; m * kp];
            rounded
                .par_chunks_mut(kp)
                .enumerate()
                .for_each(|(i, row)| round_row(lhs, i, k, row));
            let rows = Broadcast::InPlace(Rows::u32(&rounded, m, kp, kp));
            run(Kernel::Bf16Pairs, (n, m), pack, rows, &dst, accumulate);
        }
    }

    /// Row `r` of lhs rounded to bf16 (nearest even), written as pairs into `out` (kp long).
    fn round_row(lhs: Mat, r: usize, k: usize, out: &mut [u32]) {
        let at = |c: usize| lhs.data[r * lhs.rs + c * lhs.cs];
        let whole = if lhs.cs == 1 { k / 32 * 32 } else { 0 };
        if whole > 0 {
            let src = &lhs.data[r * lhs.rs..][..whole];
            // SAFETY: `available()` checked the CPU features; `src` holds `whole` floats and
            // `out` at least whole / 2 pairs.
            unsafe { round_32s(src, &mut out[..whole / 2]) };
        }
        for c in (whole..k).step_by(2) {
            let hi = if c + 1 < k {
                bf16::from_f32(at(c + 1)).to_bits() as u32
            } else {
                0
            };
            out[c / 2] = bf16::from_f32(at(c)).to_bits() as u32 | hi << 16;
        }
    }

    /// 32 floats at a time → 32 bf16 (16 pairs), round to nearest even.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn round_32s(src: &[f32], out: &mut [u32]) {
        for (c, o) in src.chunks_exact(32).zip(out.chunks_exact_mut(16)) {
            let lo = _mm512_loadu_ps(c.as_ptr());
            let hi = _mm512_loadu_ps(c.as_ptr().add(16));
            // The second operand fills the low half.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(o.as_mut_ptr().cast(), v);
        }
    }
}

/// A frozen bf16 weight W (out × in) as the base of a LoRA linear or a frozen linear:
/// x·Wᵀ and dy·W through [`gemm_bf16`].
pub struct Bf16Frozen {
    w: Tensor,
    out_f: usize,
    in_f: usize,
    kernel: Bf16Kernel,
}

impl Bf16Frozen {
    /// `w` must be a bf16 CPU matrix (out × in).
    pub fn new(w: &Tensor) -> Result<Arc<Self>> {
        require_cpu(w, NAME)?;
        if w.dtype() != DType::BF16 {
            bail!("{NAME}: the weight must be bf16, got {:?}", w.dtype())
        }
        let (out_f, in_f) = w.dims2()?;
        Ok(Arc::new(Bf16Frozen {
            w: w.detach().contiguous()?,
            out_f,
            in_f,
            kernel: bf16_kernel()?,
        }))
    }

    fn with_data<R>(&self, f: impl FnOnce(&[bf16]) -> R) -> Result<R> {
        let (guard, layout) = self.w.storage_and_layout();
        let Storage::Cpu(CpuStorage::BF16(v)) = &*guard else {
            bail!("{NAME}: the weight must be a bf16 CPU tensor")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{NAME}: the weight must be contiguous")
        };
        Ok(f(&v[start..end]))
    }
}

impl FrozenMatmul for Bf16Frozen {
    fn shape(&self) -> (usize, usize) {
        (self.out_f, self.in_f)
    }

    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.with_data(|w| x_wt(self.kernel, x, rows, w, (self.out_f, self.in_f)))
    }

    fn grad_input(&self, dy: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (out_f, in_f) = (self.out_f, self.in_f);
        self.with_data(|w| {
            let mut dx = vec![0f32; rows * in_f];
            let wm = Bf16Mat {
                data: w,
                rs: in_f,
                cs: 1,
            };
            gemm_bf16(
                self.kernel,
                (rows, in_f, out_f),
                &mut dx,
                Mat::rows(dy, out_f),
                wm,
                false,
            );
            dx
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_to_bf16_gives_half_s_values() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
        ];
        let mut s = 0x9e37_79b9u32;
        let values: Vec<f32> = specials
            .into_iter()
            .chain((0..100_000).map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                f32::from_bits(s)
            }))
            .collect();
        let mut rounded = values.clone();
        round_to_bf16(&mut rounded);
        let copied = rounded_to_bf16(&values);
        assert_eq!(copied.len(), values.len());
        for ((v, r), c) in values.iter().zip(&rounded).zip(&copied) {
            assert_eq!(r.to_bits(), c.to_bits(), "{v:e}: copy and in place differ");
            assert_eq!(
                r.to_bits(),
                bf16::from_f32(*v).to_f32().to_bits(),
                "{v:e} ({:#x})",
                v.to_bits()
            );
        }
        assert!(all_bf16(&rounded));
        assert!(!all_bf16(&values));
        assert!(!all_bf16(&[1.0, f32::from_bits(0x3f80_0001)]));
        // One value off bf16 in the last of the parallel runs.
        let last = rounded.len() - 1;
        rounded[last] = f32::from_bits(0x3f80_0001);
        assert!(!all_bf16(&rounded));
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    /// Σ bf16(a)·b in f64 — the exact value the kernels approximate in f32.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &Bf16Mat) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|c| round_bf16(a[i * k + c]) as f64 * b.at(c, j).to_f64())
                    .sum();
            }
        }
        out
    }

    fn check(got: &[f32], want: &[f64], k: usize, what: &str) {
        for (g, w) in got.iter().zip(want) {
            // f32 sums of k terms of magnitude ≤ 1.
            let tol = 1e-6 * k as f64 + 1e-6;
            assert!((*g as f64 - w).abs() <= tol, "{what}: {g} vs {w}");
        }
    }

    /// Odd and tile-unaligned sizes, both rhs layouts, store and accumulate, through the
    /// dispatching entry point and the fallback (the same on a CPU without AVX512-BF16).
    #[test]
    fn matches_the_exact_product_of_the_rounded_inputs() {
        let kernel = bf16_kernel().unwrap();
        // The last one is over widened::WIDEN_ELEMS: the fallback widens it a block of columns at a time.
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 33, 7),
            (25, 70, 64),
            (40, 31, 129),
            (29, 100, 300),
            (100, 50, 2000),
            (3, 2100, 2048),
        ] {
            let a = values(m * k, 1);
            let w: Vec<bf16> = values(n * k, 2).into_iter().map(bf16::from_f32).collect();
            // rhs as Wᵀ (W n×k row-major) and as a row-major k×n matrix.
            let wt = Bf16Mat {
                data: &w,
                rs: 1,
                cs: k,
            };
            let wr = Bf16Mat {
                data: &w,
                rs: n,
                cs: 1,
            };
            for (rhs, layout) in [(wt, "Wt"), (wr, "rows")] {
                let want = reference(m, n, k, &a, &rhs);
                let lhs = Mat::rows(&a, k);
                let mut got = vec![0f32; m * n];
                gemm_bf16(kernel, (m, n, k), &mut got, lhs, rhs, false);
                check(&got, &want, k, &format!("{m}x{n}x{k} {layout}"));
                let mut fallback = vec![0f32; m * n];
                widened::gemm((m, n, k), &mut fallback, lhs, rhs, false);
                check(
                    &fallback,
                    &want,
                    k,
                    &format!("fallback {m}x{n}x{k} {layout}"),
                );
                // The AVX512-BF16 kernel wherever the CPU has it, whichever path the dispatch
                // chose (accumulating onto ones).
                #[cfg(target_arch = "x86_64")]
                if avx512::available() {
                    let mut dot = vec![1f32; m * n];
                    avx512::gemm((m, n, k), &mut dot, lhs, rhs, true);
                    let plus_one: Vec<f64> = want.iter().map(|v| v + 1.0).collect();
                    check(&dot, &plus_one, k, &format!("avx512 {m}x{n}x{k} {layout}"));
                }
                // Accumulating adds the same product again.
                gemm_bf16(kernel, (m, n, k), &mut got, lhs, rhs, true);
                let twice: Vec<f64> = want.iter().map(|v| 2.0 * v).collect();
                check(
                    &got,
                    &twice,
                    2 * k,
                    &format!("accumulate {m}x{n}x{k} {layout}"),
                );
            }
        }
    }

    /// `LOWRANK_BF16_GEMM` names a kernel; a name it does not know, or `dot` where the CPU
    /// lacks AVX512-BF16, is an error that names the variable.
    #[test]
    fn the_environment_names_the_kernel() {
        assert_eq!(choose_kernel(Some("widen")), Ok(Bf16Kernel::Widen));
        match choose_kernel(Some("dot")) {
            Ok(k) => assert!(dot_kernel_available() && k == Bf16Kernel::Dot),
            Err(e) => assert!(!dot_kernel_available() && e.contains("AVX512-BF16"), "{e}"),
        }
        let e = choose_kernel(Some("fast")).unwrap_err();
        assert!(
            e.contains(BF16_KERNEL_VAR) && e.contains("dot or widen"),
            "{e}"
        );
        let timed = choose_kernel(None).unwrap();
        assert!(timed == Bf16Kernel::Widen || dot_kernel_available());
    }

    /// The activations really are rounded: an input that bf16 cannot hold gives bf16's value.
    #[test]
    fn activations_are_rounded_to_bf16() {
        let x = [1.0 + 1.0 / 512.0]; // between two bf16 values (spacing 1/128 near 1)
        let w = [bf16::ONE];
        let mut y = [0f32];
        let rhs = Bf16Mat {
            data: &w,
            rs: 1,
            cs: 1,
        };
        gemm_bf16(
            bf16_kernel().unwrap(),
            (1, 1, 1),
            &mut y,
            Mat::rows(&x, 1),
            rhs,
            false,
        );
        assert_eq!(y[0], 1.0);
    }

    #[test]
    fn frozen_base_products_match_f32_on_the_rounded_values() {
        let (rows, out_f, in_f) = (9, 20, 17);
        let w32 = Tensor::from_vec(
            values(out_f * in_f, 3),
            (out_f, in_f),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let base = Bf16Frozen::new(&w32.to_dtype(DType::BF16).unwrap()).unwrap();
        assert!(Bf16Frozen::new(&w32).is_err(), "an f32 weight is refused");
        let w: Vec<f32> = w32
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let x = values(rows * in_f, 4);
        let dy = values(rows * out_f, 5);
        let y = base.forward(&x, rows).unwrap();
        let dx = base.grad_input(&dy, rows).unwrap();
        for i in 0..rows {
            for o in 0..out_f {
                let want: f64 = (0..in_f)
                    .map(|c| round_bf16(x[i * in_f + c]) as f64 * w[o * in_f + c] as f64)
                    .sum();
                assert!((y[i * out_f + o] as f64 - want).abs() < 1e-5);
            }
            for c in 0..in_f {
                let want: f64 = (0..out_f)
                    .map(|o| round_bf16(dy[i * out_f + o]) as f64 * w[o * in_f + c] as f64)
                    .sum();
                assert!((dx[i * in_f + c] as f64 - want).abs() < 1e-5);
            }
        }
    }
}
