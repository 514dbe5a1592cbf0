//! The blocked AVX-512 engine behind x·Wᵀ-shaped products: dst = packed · broadcastᵀ over
//! `steps` k steps, with f32 multiply-adds ([`Kernel::F32`], `sgemm_xwt`) or AVX512-BF16 pair
//! dot products ([`Kernel::Bf16Pairs`], `lowrank-kernels`' bf16 GEMM).
//!
//! One operand is packed in tiles of 32 lanes (x's rows for x·Wᵀ), the 32 values of each k
//! step side by side; the other is read in place as rows (W's rows), one value a step
//! broadcast to every lane. A tile of 32 lanes × 12 rows lives in 24 zmm accumulators: per
//! k step two loads of the packed tile and twelve broadcasts.
//!
//! Why this way round: W is read once, in order, twelve rows at a time that stay in L1 (k a
//! chunk at a time) while a block of the packed operand sized for L2 passes them. The
//! textbook layout packs W into panels instead; packing a 576×1536 weight took a sixth of a
//! 256-row product's time and the packed copy streamed from L3 past every tile (Zen 4: bf16
//! 250–290 GFLOP/s, the `gemm` crate's f32 kernels spend 15% of a prefill packing). The
//! price is that x·Wᵀ's sums come out along dst's columns: each tile is transposed in
//! registers before it is stored.

use std::arch::x86_64::{
    __m512, __m512bh, __mmask16, _mm512_add_ps, _mm512_castpd_ps, _mm512_castps_pd,
    _mm512_dpbf16_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_storeu_ps,
    _mm512_maskz_loadu_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps,
    _mm512_shuffle_f32x4, _mm512_storeu_ps, _mm512_unpackhi_pd, _mm512_unpackhi_ps,
    _mm512_unpacklo_pd, _mm512_unpacklo_ps,
};
use std::marker::PhantomData;

use rayon::prelude::*;

/// Rows of the broadcast operand per tile: twelve broadcasts × two accumulators, the two
/// packed vectors and a broadcast fit the 32 zmm.
const NJ: usize = 12;
/// Lanes of a packed tile: two zmm of 16 (one for a last tile of up to 16).
pub const TILE_LANES: usize = 32;
/// At most this many k steps per chunk: twelve broadcast rows' chunk (6 KB) stays in a 32 KB
/// L1D beside the packed tile passing through it.
const MAX_CHUNK_STEPS: usize = 128;
/// Packed operand per block of lanes, sized to stay in a 1 MB L2 while the broadcast rows pass.
const PACKED_BLOCK_BYTES: usize = 384 << 10;

/// What one k step of the two operands holds, and so which multiply-add the tiles run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// One f32 each (as its bits).
    F32,
    /// A pair of bf16 each (low half first), summed by `vdpbf16ps`.
    Bf16Pairs,
}

impl Kernel {
    /// Whether this CPU runs the kernel.
    pub fn available(self) -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && (self == Kernel::F32 || std::arch::is_x86_feature_detected!("avx512bf16"))
    }
}

/// The broadcast operand: `rows` rows of `steps` 4-byte values each, `stride` values apart
/// (read unaligned, so bf16 pairs may start at any even offset).
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    ptr: *const u32,
    rows: usize,
    stride: usize,
    steps: usize,
    _data: PhantomData<&'a [u32]>,
}

// SAFETY: `Rows` only reads the slice it borrows.
unsafe impl Sync for Rows<'_> {}

impl<'a> Rows<'a> {
    /// f32 rows.
    pub fn f32(data: &'a [f32], rows: usize, stride: usize, steps: usize) -> Self {
        Self::checked(data.as_ptr().cast(), data.len(), rows, stride, steps)
    }

    /// Rows of u32 (bf16 pairs, or f32 bits).
    pub fn u32(data: &'a [u32], rows: usize, stride: usize, steps: usize) -> Self {
        Self::checked(data.as_ptr(), data.len(), rows, stride, steps)
    }

    /// Rows of bf16 pairs given as the bf16s' bits: row j's pair p is values 2p and 2p + 1 of
    /// the row; `stride` and `steps` count pairs.
    pub fn bf16_pairs(bits: &'a [u16], rows: usize, stride: usize, steps: usize) -> Self {
        Self::checked(bits.as_ptr().cast(), bits.len() / 2, rows, stride, steps)
    }

    fn checked(ptr: *const u32, len: usize, rows: usize, stride: usize, steps: usize) -> Self {
        assert!(
            rows == 0 || (rows - 1) * stride + steps <= len,
            "tiled: broadcast rows out of range"
        );
        Rows {
            ptr,
            rows,
            stride,
            steps,
            _data: PhantomData,
        }
    }

    fn row(&self, j: usize) -> *const u32 {
        debug_assert!(j < self.rows);
        self.ptr.wrapping_add(j * self.stride)
    }
}

/// Where the broadcast rows come from.
#[derive(Clone, Copy)]
pub enum Broadcast<'a> {
    /// Read in place.
    InPlace(Rows<'a>),
    /// Made for each group of twelve rows as it starts, into that task's buffer: `fill(first,
    /// count, out)` writes f32 rows first..first + count, `steps` values each (a 4-bit W
    /// decoded once per group for every lane of a block).
    Made {
        rows: usize,
        steps: usize,
        fill: &'a (dyn Fn(usize, usize, &mut [f32]) + Sync),
    },
}

impl Broadcast<'_> {
    fn rows(&self) -> usize {
        match self {
            Broadcast::InPlace(r) => r.rows,
            Broadcast::Made { rows, .. } => *rows,
        }
    }

    fn steps(&self) -> usize {
        match self {
            Broadcast::InPlace(r) => r.steps,
            Broadcast::Made { steps, .. } => *steps,
        }
    }
}

/// The destination: the sum of packed lane l and broadcast row j goes to
/// l·lane_stride + j·row_stride.
pub struct Dst<'a> {
    ptr: *mut f32,
    lane_stride: usize,
    row_stride: usize,
    _data: PhantomData<&'a mut [f32]>,
}

// SAFETY: the tasks sharing a `Dst` write disjoint elements (one group of broadcast rows
// each, see `run`), and the slice it borrows outlives them.
unsafe impl Sync for Dst<'_> {}

impl<'a> Dst<'a> {
    /// Over `data`, for `lanes` × `rows` sums at these strides.
    pub fn new(
        data: &'a mut [f32],
        (lanes, rows): (usize, usize),
        lane_stride: usize,
        row_stride: usize,
    ) -> Self {
        assert!(
            lanes == 0
                || rows == 0
                || (lanes - 1) * lane_stride + (rows - 1) * row_stride < data.len(),
            "tiled: dst too small"
        );
        Dst {
            ptr: data.as_mut_ptr(),
            lane_stride,
            row_stride,
            _data: PhantomData,
        }
    }
}

/// dst (lanes × rows, through `dst`'s strides) [+]= packed · broadcastᵀ over the rows' steps,
/// where `pack(first, count, width, out)` writes lanes first..first+count as steps × `width`
/// values (lane i of step p at p·width + i), and zeros in the lanes beyond count: every value
/// of `out`, which holds the last block's. Runs on the rayon pool.
///
/// # Panics
/// Where the CPU lacks the kernel's features ([`Kernel::available`]) or `dst` was made for
/// fewer lanes or rows.
pub fn run(
    kernel: Kernel,
    (lanes, rows): (usize, usize),
    pack: impl Fn(usize, usize, usize, &mut [u32]) + Sync,
    broadcast: Broadcast,
    dst: &Dst,
    accumulate: bool,
) {
    assert!(kernel.available(), "tiled: {kernel:?} needs AVX-512");
    assert!(broadcast.rows() >= rows, "tiled: too few broadcast rows");
    let steps = broadcast.steps();
    if lanes == 0 || rows == 0 {
        return;
    }
    let block_lanes = (PACKED_BLOCK_BYTES / (steps.max(1) * 4) / TILE_LANES).max(1) * TILE_LANES;
    let groups = rows.div_ceil(NJ);
    let chunk = steps
        .div_ceil(steps.div_ceil(MAX_CHUNK_STEPS).max(1))
        .max(1);
    let mut packed = Vec::new();
    for l0 in (0..lanes).step_by(block_lanes) {
        let tiles = block_lanes.min(lanes - l0).div_ceil(TILE_LANES);
        let width = |t: usize| tile_width(TILE_LANES.min(lanes - l0 - t * TILE_LANES));
        // Not cleared between blocks: `pack` writes every value of its tiles.
        packed.resize(packed.len().max(tiles * steps * TILE_LANES), 0u32);
        packed[..tiles * steps * TILE_LANES]
            .par_chunks_mut(steps * TILE_LANES)
            .enumerate()
            .for_each(|(t, out)| {
                let first = l0 + t * TILE_LANES;
                let count = TILE_LANES.min(lanes - first);
                pack(first, count, width(t), &mut out[..steps * width(t)])
            });
        (0..groups).into_par_iter().for_each(|g| {
            let j0 = g * NJ;
            let here = NJ.min(rows - j0);
            // Rows past the last repeat the group's first; their sums are not written.
            let row = |j: usize| if j < here { j } else { 0 };
            let mut made = Vec::new();
            let w: [*const u32; NJ] = match broadcast {
                Broadcast::InPlace(rows) => std::array::from_fn(|j| rows.row(j0 + row(j))),
                Broadcast::Made { fill, .. } => {
                    made.resize(here * steps, 0f32);
                    fill(j0, here, &mut made);
                    std::array::from_fn(|j| made[row(j) * steps..].as_ptr().cast())
                }
            };
            // k a chunk at a time, every tile's sums kept between chunks: the chunk of the
            // broadcast rows stays in L1 while the packed tiles pass.
            let mut sums = vec![[[0f32; TILE_LANES]; NJ]; tiles];
            for p0 in (0..steps).step_by(chunk) {
                let pc = chunk.min(steps - p0);
                let w = w.map(|row| row.wrapping_add(p0));
                for (t, tile) in sums.iter_mut().enumerate() {
                    let x = &packed[t * steps * TILE_LANES + p0 * width(t)..][..pc * width(t)];
                    // SAFETY: `run` checked the CPU features; each w[j] has pc steps left in
                    // its row (`Rows` checked the rows' extent; a made row is `steps` long)
                    // and x holds pc steps of the tile's width.
                    unsafe {
                        match (kernel, width(t) == TILE_LANES) {
                            (Kernel::F32, true) => f32_tile::<2>(pc, x, w, tile, p0 > 0),
                            (Kernel::F32, false) => f32_tile::<1>(pc, x, w, tile, p0 > 0),
                            (Kernel::Bf16Pairs, true) => bf16_tile::<2>(pc, x, w, tile, p0 > 0),
                            (Kernel::Bf16Pairs, false) => bf16_tile::<1>(pc, x, w, tile, p0 > 0),
                        }
                    }
                }
            }
            for (t, tile) in sums.iter().enumerate() {
                let first = l0 + t * TILE_LANES;
                let count = TILE_LANES.min(lanes - first);
                // SAFETY: `run` checked the CPU features; `Dst::new` checked that lanes
                // first..first + count and rows j0..j0 + here lie inside dst, and only this
                // task writes those rows' elements.
                unsafe { put_tile(dst, tile, (first, count), (j0, here), accumulate) };
            }
        });
    }
}

/// Packs `count` lanes (at most [`TILE_LANES`]) of a tile as `run`'s `pack` does: `out` gets
/// steps × `width` values, lane i's from `lane(i, buf)`, which writes them (`steps` of them)
/// into `buf`; sixteen lanes at a time are then transposed in registers.
///
/// # Panics
/// Where the CPU lacks AVX-512F or `out` is shorter than steps × width.
pub fn pack_lanes(
    count: usize,
    steps: usize,
    width: usize,
    out: &mut [u32],
    lane: impl Fn(usize, &mut [u32]),
) {
    assert!(
        Kernel::F32.available() && count <= width && out.len() >= steps * width,
        "tiled: packing out of range"
    );
    let mut buf = vec![0u32; 16 * steps];
    for l0 in (0..count).step_by(16) {
        let here = 16.min(count - l0);
        for (i, row) in buf.chunks_exact_mut(steps.max(1)).enumerate() {
            if i < here {
                lane(l0 + i, row);
            } else {
                row.fill(0);
            }
        }
        let whole = steps / 16 * 16;
        // SAFETY: the CPU has AVX-512F (asserted); buf holds 16 rows of `steps` values and
        // out steps × width values with l0 + 16 ≤ width.
        unsafe { transpose_into(&buf, steps, whole, &mut out[l0..], width) };
        for p in whole..steps {
            for i in 0..16 {
                out[p * width + l0 + i] = buf[i * steps + p];
            }
        }
    }
}

/// out[p·width + i] = rows[i·steps + p] for the 16 rows and steps 0..whole (a multiple of 16).
///
/// # Safety
/// The CPU must have AVX-512F; `rows` must hold 16 × steps values and `out` (whole - 1)·width
/// + 16 of them.
#[target_feature(enable = "avx512f")]
unsafe fn transpose_into(rows: &[u32], steps: usize, whole: usize, out: &mut [u32], width: usize) {
    assert!(rows.len() >= 16 * steps && (whole == 0 || out.len() >= (whole - 1) * width + 16));
    for p0 in (0..whole).step_by(16) {
        let block: [__m512; 16] =
            std::array::from_fn(|i| _mm512_loadu_ps(rows.as_ptr().add(i * steps + p0).cast()));
        for (q, v) in transpose16(block).iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add((p0 + q) * width).cast(), *v);
        }
    }
}

/// Values per k step of a packed tile of `count` lanes: 16 or 32.
fn tile_width(count: usize) -> usize {
    if count > 16 {
        TILE_LANES
    } else {
        16
    }
}

/// tile[j][l] (+)= Σ over the steps of x[p][l] · w[j][p] in f32, for the 16·H lanes of a
/// packed tile; `add` keeps the tile's sums.
///
/// # Safety
/// The CPU must have AVX-512F; every w[j] must have `steps` readable values.
#[target_feature(enable = "avx512f")]
unsafe fn f32_tile<const H: usize>(
    steps: usize,
    x: &[u32],
    w: [*const u32; NJ],
    tile: &mut [[f32; TILE_LANES]; NJ],
    add: bool,
) {
    assert!(x.len() >= steps * 16 * H);
    let mut acc = load_tile::<H>(tile, add);
    let xp = x.as_ptr().cast::<f32>();
    for p in 0..steps {
        let xv: [__m512; H] = std::array::from_fn(|h| _mm512_loadu_ps(xp.add((p * H + h) * 16)));
        for (j, sums) in acc.iter_mut().enumerate() {
            let wv = _mm512_set1_ps(f32::from_bits(w[j].add(p).read_unaligned()));
            for h in 0..H {
                sums[h] = _mm512_fmadd_ps(xv[h], wv, sums[h]);
            }
        }
    }
    store_tile(tile, acc);
}

/// [`f32_tile`] over bf16 pairs with `vdpbf16ps`: both products of a pair in f32, exact.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16; every w[j] must have `steps` readable pairs.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_tile<const H: usize>(
    steps: usize,
    x: &[u32],
    w: [*const u32; NJ],
    tile: &mut [[f32; TILE_LANES]; NJ],
    add: bool,
) {
    assert!(x.len() >= steps * 16 * H);
    let mut acc = load_tile::<H>(tile, add);
    let xp = x.as_ptr();
    for p in 0..steps {
        let xv: [__m512bh; H] = std::array::from_fn(|h| {
            std::mem::transmute(_mm512_loadu_si512(xp.add((p * H + h) * 16).cast()))
        });
        for (j, sums) in acc.iter_mut().enumerate() {
            let pair = w[j].add(p).read_unaligned();
            let wv: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
            for h in 0..H {
                sums[h] = _mm512_dpbf16_ps(sums[h], xv[h], wv);
            }
        }
    }
    store_tile(tile, acc);
}

/// The accumulators a tile starts from: its sums so far, or zeros.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_tile<const H: usize>(
    tile: &[[f32; TILE_LANES]; NJ],
    add: bool,
) -> [[__m512; H]; NJ] {
    std::array::from_fn(|j| {
        std::array::from_fn(|h| {
            if add {
                _mm512_loadu_ps(tile[j].as_ptr().add(16 * h))
            } else {
                _mm512_setzero_ps()
            }
        })
    })
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile<const H: usize>(tile: &mut [[f32; TILE_LANES]; NJ], acc: [[__m512; H]; NJ]) {
    for (j, sums) in acc.iter().enumerate() {
        for (h, s) in sums.iter().enumerate() {
            _mm512_storeu_ps(tile[j].as_mut_ptr().add(16 * h), *s);
        }
    }
}

/// Writes (or adds) a tile's sums into dst: lanes first.. (count of them) by rows j0.. (here of
/// them), tile[j][l] for lane first + l and row j0 + j.
///
/// # Safety
/// The CPU must have AVX-512F; those elements must be inside dst, and no other thread may
/// write them meanwhile.
#[target_feature(enable = "avx512f")]
unsafe fn put_tile(
    dst: &Dst,
    tile: &[[f32; TILE_LANES]; NJ],
    (first, count): (usize, usize),
    (j0, here): (usize, usize),
    accumulate: bool,
) {
    let put = |p: *mut f32, mask: __mmask16, v: __m512| {
        let v = if accumulate {
            _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), v)
        } else {
            v
        };
        _mm512_mask_storeu_ps(p, mask, v);
    };
    let lanes_in = |h: usize| count.saturating_sub(16 * h).min(16);
    if dst.lane_stride == 1 {
        // Each row's lanes lie together in dst.
        for (j, sums) in tile.iter().enumerate().take(here) {
            for h in 0..count.div_ceil(16) {
                let p = dst.ptr.add((j0 + j) * dst.row_stride + first + 16 * h);
                let mask = ((1u32 << lanes_in(h)) - 1) as __mmask16;
                put(p, mask, _mm512_loadu_ps(sums.as_ptr().add(16 * h)));
            }
        }
        return;
    }
    // Each lane's sums for the rows lie together (x·Wᵀ): the tile is transposed in registers,
    // sixteen lanes at a time, and stored a lane at a time (element by element the stores
    // took a tenth of a bf16 product's time).
    let mask = ((1u32 << here) - 1) as __mmask16;
    for h in 0..count.div_ceil(16) {
        let rows: [__m512; 16] = std::array::from_fn(|j| {
            if j < NJ {
                _mm512_loadu_ps(tile[j].as_ptr().add(16 * h))
            } else {
                _mm512_setzero_ps()
            }
        });
        let lanes = transpose16(rows);
        for (l, v) in lanes.iter().enumerate().take(lanes_in(h)) {
            let p = dst
                .ptr
                .add((first + 16 * h + l) * dst.lane_stride + j0 * dst.row_stride);
            put(p, mask, *v);
        }
    }
}

/// The 16×16 transpose of `r` (out[l] lane j = r[j] lane l): pairs of 32-bit values, then of
/// 64-bit, then a 4×4 transpose of the 128-bit blocks.
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4g + c], block b: column 4b + c of rows 4g..4g + 4.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (a, b) = (
            _mm512_castps_pd(t[4 * g + c / 2]),
            _mm512_castps_pd(t[4 * g + c / 2 + 2]),
        );
        _mm512_castpd_ps(if c % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let (a, b, cc, d) = (u[c], u[4 + c], u[8 + c], u[12 + c]);
        let x0 = _mm512_shuffle_f32x4::<0x44>(a, b);
        let x1 = _mm512_shuffle_f32x4::<0xee>(a, b);
        let y0 = _mm512_shuffle_f32x4::<0x44>(cc, d);
        let y1 = _mm512_shuffle_f32x4::<0xee>(cc, d);
        out[c] = _mm512_shuffle_f32x4::<0x88>(x0, y0);
        out[4 + c] = _mm512_shuffle_f32x4::<0xdd>(x0, y0);
        out[8 + c] = _mm512_shuffle_f32x4::<0x88>(x1, y1);
        out[12 + c] = _mm512_shuffle_f32x4::<0xdd>(x1, y1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_sixteen_by_sixteen() {
        if !Kernel::F32.available() {
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut out = [0f32; 256];
        // SAFETY: the CPU has AVX-512F (checked above); every load and store is inside m / out.
        unsafe {
            let rows: [__m512; 16] =
                std::array::from_fn(|j| _mm512_loadu_ps(m.as_ptr().add(16 * j)));
            for (l, v) in transpose16(rows).iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * l), *v);
            }
        }
        for l in 0..16 {
            for j in 0..16 {
                assert_eq!(out[16 * l + j], m[16 * j + l], "lane {l}, row {j}");
            }
        }
    }
}
