//! ggml tensor types and their dequantization, operation for operation as ggml's
//! `dequantize_row_*` (ggml-quants.c) and gguf-py's `gguf.quants`, so the f32 values are
//! bit-identical: every product and sum below is one f32 operation in the same order.

use half::{bf16, f16};
use rayon::prelude::*;

/// Values per block of the K-quants.
const QK_K: usize = 256;

/// The ggml tensor types this crate dequantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

/// Every ggml type id with its name (ggml.h `enum ggml_type`), to name the unsupported ones.
const GGML_TYPE_NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

impl TensorType {
    pub const ALL: [TensorType; 12] = [
        TensorType::F32,
        TensorType::F16,
        TensorType::BF16,
        TensorType::Q4_0,
        TensorType::Q4_1,
        TensorType::Q5_0,
        TensorType::Q5_1,
        TensorType::Q8_0,
        TensorType::Q4K,
        TensorType::Q5K,
        TensorType::Q6K,
        TensorType::Q8K,
    ];

    /// The type with ggml id `id`, if supported.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The ggml type id (`enum ggml_type`).
    pub fn id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q4_0 => 2,
            TensorType::Q4_1 => 3,
            TensorType::Q5_0 => 6,
            TensorType::Q5_1 => 7,
            TensorType::Q8_0 => 8,
            TensorType::Q4K => 12,
            TensorType::Q5K => 13,
            TensorType::Q6K => 14,
            TensorType::Q8K => 15,
            TensorType::BF16 => 30,
        }
    }

    /// ggml's name of the type (`Q4_K`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        type_name(self.id())
    }

    /// The name of any ggml type id (`unknown` for ids ggml does not define).
    pub fn name_of_id(id: u32) -> &'static str {
        type_name(id)
    }

    /// The supported type names, comma-separated, for error messages.
    pub fn supported_names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            TensorType::F32 | TensorType::F16 | TensorType::BF16 => 1,
            TensorType::Q4_0
            | TensorType::Q4_1
            | TensorType::Q5_0
            | TensorType::Q5_1
            | TensorType::Q8_0 => 32,
            TensorType::Q4K | TensorType::Q5K | TensorType::Q6K | TensorType::Q8K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            TensorType::F32 => 4,
            TensorType::F16 | TensorType::BF16 => 2,
            TensorType::Q4_0 => 2 + 16,
            TensorType::Q4_1 => 2 + 2 + 16,
            TensorType::Q5_0 => 2 + 4 + 16,
            TensorType::Q5_1 => 2 + 2 + 4 + 16,
            TensorType::Q8_0 => 2 + 32,
            TensorType::Q4K => 2 + 2 + 12 + QK_K / 2,
            TensorType::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            TensorType::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            TensorType::Q8K => 4 + QK_K + 2 * QK_K / 16,
        }
    }

    /// Bytes of `n` values, or None when `n` is not a whole number of blocks (or overflows).
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let block = self.block_size() as u64;
        if !n.is_multiple_of(block) {
            return None;
        }
        (n / block).checked_mul(self.block_bytes() as u64)
    }

    /// Dequantizes whole blocks: `out.len()` values from `bytes.len()` bytes.
    ///
    /// # Panics
    /// When `bytes` is not exactly the blocks of `out.len()` values (the reader checks sizes).
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        let (bs, bb) = (self.block_size(), self.block_bytes());
        assert!(
            out.len().is_multiple_of(bs) && bytes.len() == out.len() / bs * bb,
            "{} bytes are not the {} blocks of {} values",
            bytes.len(),
            self.name(),
            out.len()
        );
        // Blocks of many rows at once on rayon's pool: a large tensor dequantizes on every core.
        const VALUES_PER_TASK: usize = 1 << 16;
        let per_task = VALUES_PER_TASK.div_ceil(bs) * bs;
        let bytes_per_task = per_task / bs * bb;
        bytes
            .par_chunks(bytes_per_task)
            .zip(out.par_chunks_mut(per_task))
            .for_each(|(b, y)| self.dequantize_blocks(b, y));
    }

    fn dequantize_blocks(self, bytes: &[u8], out: &mut [f32]) {
        let mut blocks = |block_fn: fn(&[u8], &mut [f32])| {
            let chunks = bytes.chunks_exact(self.block_bytes());
            for (b, y) in chunks.zip(out.chunks_exact_mut(self.block_size())) {
                block_fn(b, y);
            }
        };
        match self {
            // Element by element in one tight (vectorized) loop.
            TensorType::F32 => {
                for (y, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            TensorType::F16 => {
                for (y, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *y = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            TensorType::BF16 => {
                for (y, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *y = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            TensorType::Q4_0 => blocks(q4_0),
            TensorType::Q4_1 => blocks(q4_1),
            TensorType::Q5_0 => blocks(q5_0),
            TensorType::Q5_1 => blocks(q5_1),
            TensorType::Q8_0 => blocks(q8_0),
            TensorType::Q4K => blocks(q4_k),
            TensorType::Q5K => blocks(q5_k),
            TensorType::Q6K => blocks(q6_k),
            TensorType::Q8K => blocks(q8_k),
        }
    }
}

fn type_name(id: u32) -> &'static str {
    GGML_TYPE_NAMES
        .iter()
        .find(|(i, _)| *i == id)
        .map_or("unknown", |(_, n)| n)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        y[j] = (((qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        y[j] = ((qs[j] & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | h1) as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..34]) {
        *yj = q as i8 as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..16 + QK_K / 2];
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..16 + QK_K / 8];
    let qs = &b[16 + QK_K / 8..16 + QK_K / 8 + QK_K / 2];
    for (chunk, (ql, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, QK_K / 2 + QK_K / 4 + QK_K / 16);
    let ql_all = &b[..QK_K / 2];
    let qh_all = &b[QK_K / 2..QK_K / 2 + QK_K / 4];
    let sc_all = &b[QK_K / 2 + QK_K / 4..QK_K / 2 + QK_K / 4 + QK_K / 16];
    for half in 0..2 {
        let ql = &ql_all[64 * half..];
        let qh = &qh_all[32 * half..];
        let sc = &sc_all[8 * half..];
        let y = &mut y[128 * half..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | (qh[l] & 3) << 4) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | ((qh[l] >> 2) & 3) << 4) as i32 - 32;
            let q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) as i32 - 32;
            let s = |i: usize| sc[is + i] as i8 as f32;
            y[l] = d * s(0) * q1 as f32;
            y[l + 32] = d * s(2) * q2 as f32;
            y[l + 64] = d * s(4) * q3 as f32;
            y[l + 96] = d * s(6) * q4 as f32;
        }
    }
}

fn q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (yj, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *yj = d * q as i8 as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sizes_are_ggmls() {
        for t in TensorType::ALL {
            assert_eq!(TensorType::from_id(t.id()), Some(t));
        }
        // ggml's type_traits: Q4_K 144, Q5_K 176, Q6_K 210, Q8_K 292 bytes per 256 values.
        let sizes = [
            (TensorType::Q4K, 144),
            (TensorType::Q5K, 176),
            (TensorType::Q6K, 210),
            (TensorType::Q8K, 292),
        ];
        for (t, bytes) in sizes {
            assert_eq!(t.block_bytes(), bytes, "{}", t.name());
        }
        assert_eq!(TensorType::from_id(16), None);
        assert_eq!(TensorType::name_of_id(16), "IQ2_XXS");
        assert_eq!(TensorType::Q8_0.bytes_for(33), None);
    }
}
