//! Blockwise 4-bit quantization and double quantization of the absmax, bit-exact with
//! bitsandbytes 0.50 on CPU.
//!
//! 4-bit (`backends/default/ops.py`, `quantize_4bit`): the weight is flattened row-major and
//! cut into blocks of `block_size`; each block stores absmax = max |x| as f32. Full blocks
//! are scaled by `x * (1 / max(absmax, 1e-38))`, the short last block (if any) by
//! `x / am` with `am = max(max |x|, 1e-38)` — and that clamped `am` is the stored absmax
//! (so an all-zero short block stores 1e-38 while an all-zero full block stores 0). The
//! scaled value is clamped to [-1, 1] and encoded by [`Codebook4::encode`]. Codes are packed
//! two a byte, the first element in the high nibble; an odd count is padded with the code
//! of 0.0 (NF4: 7, FP4: 0). CUDA multiplies by the reciprocal in the last block too and
//! does not clamp absmax.
//!
//! Double quantization (`functional.py`, `quantize_4bit(compress_statistics=True)`):
//! `offset = absmax.mean()` (torch's f32 sum, see [`torch_sum_f32`], divided by n), then
//! `quantize_blockwise(absmax - offset, blocksize=256)` with the signed dynamic map, which on
//! CPU is `quantize_cpu` of `csrc/cpu_ops.cpp` (see [`crate::codebook::dynamic_lut`]).
//! The absmax is restored as `f32(map[code] * nested_absmax) + offset`.

use crate::codebook::{dynamic_lut, dynamic_lut_index, dynamic_map, QuantType};
use crate::error::{Error, Result};

/// bitsandbytes' default 4-bit block size.
pub const DEFAULT_BLOCK_SIZE: usize = 64;
/// Block size of the 8-bit quantization of the absmax (double quant).
pub const NESTED_BLOCK_SIZE: usize = 256;
/// Smallest absmax bitsandbytes divides by (`absmax.clamp(min=1e-38)`).
const MIN_ABSMAX: f32 = 1e-38;

/// A 4-bit block size must be a power of two in 32..=4096 (what bitsandbytes accepts).
pub fn validate_block_size(block_size: usize) -> Result<()> {
    if block_size.is_power_of_two() && (32..=4096).contains(&block_size) {
        Ok(())
    } else {
        Err(Error::BlockSize { block_size })
    }
}

/// Number of blocks covering `n` elements.
pub fn num_blocks(n: usize, block_size: usize) -> usize {
    n.div_ceil(block_size)
}

/// The 4-bit code of element `i` in a packed buffer.
#[inline]
pub fn code_at(packed: &[u8], i: usize) -> u8 {
    let b = packed[i / 2];
    if i & 1 == 0 {
        b >> 4
    } else {
        b & 0x0f
    }
}

/// Quantize `data` (a weight flattened row-major) to packed 4-bit codes and one f32 absmax per
/// block, exactly as bitsandbytes' CPU `quantize_4bit`.
pub fn quantize_4bit(
    data: &[f32],
    block_size: usize,
    kind: QuantType,
) -> Result<(Vec<u8>, Vec<f32>)> {
    validate_block_size(block_size)?;
    let book = kind.codebook();
    let n = data.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = Vec::with_capacity(num_blocks(n, block_size));
    let full = n - n % block_size;
    for (b, block) in data.chunks(block_size).enumerate() {
        let m = block.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
        let start = b * block_size;
        let encode = |i: usize, q: u8, packed: &mut [u8]| {
            let j = start + i;
            packed[j / 2] |= if j & 1 == 0 { q << 4 } else { q };
        };
        if start < full {
            let inv = 1.0f32 / m.max(MIN_ABSMAX);
            for (i, &x) in block.iter().enumerate() {
                encode(i, book.encode((x * inv).clamp(-1.0, 1.0)), &mut packed);
            }
            absmax.push(m);
        } else {
            let am = m.max(MIN_ABSMAX);
            for (i, &x) in block.iter().enumerate() {
                encode(i, book.encode((x / am).clamp(-1.0, 1.0)), &mut packed);
            }
            absmax.push(am);
        }
    }
    if n % 2 == 1 {
        packed[n / 2] |= book.encode(0.0);
    }
    Ok((packed, absmax))
}

/// Dequantize `n` values: `table[code] * absmax(block)`.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: impl Fn(usize) -> f32,
    n: usize,
    block_size: usize,
    table: &[f32; 16],
) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    for b in 0..num_blocks(n, block_size) {
        let s = absmax(b);
        let end = ((b + 1) * block_size).min(n);
        out.extend((b * block_size..end).map(|i| table[code_at(packed, i) as usize] * s));
    }
    out
}

/// torch's CPU `sum` of a contiguous f32 vector (ATen `SumKernel.cpp`, `cascade_sum`): f32
/// accumulators, 8-lane vectors (`Vectorized<float>` on AVX2 / NEON / default builds; AVX-512
/// builds use 16 lanes and may round differently) in 4 interleaved rows, each summed in a
/// 4-level cascade; the scalar tail and then the lanes are added in order at the end.
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    type V = [f32; LANES];
    fn add(a: &mut V, b: &V) {
        for (a, b) in a.iter_mut().zip(b) {
            *a += *b;
        }
    }
    let n = x.len();
    if n >= LANES {
        let nvec = n / LANES;
        let load = |i: usize| -> V { std::array::from_fn(|l| x[i * LANES + l]) };
        let v = row_sum::<V>(nvec, [0.0; LANES], &load, &add);
        let mut acc = 0.0f32;
        for &t in &x[nvec * LANES..] {
            acc += t;
        }
        for l in v {
            acc += l;
        }
        acc
    } else {
        row_sum::<f32>(n, 0.0, &|i| x[i], &|a, b| *a += *b)
    }
}

/// `row_sum` + `multi_row_sum` of ATen's SumKernel, generic over scalar / vector accumulators.
#[allow(clippy::needless_range_loop)] // mirrors the C++ index loops
fn row_sum<A: Copy>(
    size: usize,
    zero: A,
    load: &dyn Fn(usize) -> A,
    add: &dyn Fn(&mut A, &A),
) -> A {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let size_ilp = size / ILP;
    let ceil_log2 = |x: usize| -> u32 {
        if x <= 2 {
            1
        } else {
            usize::BITS - (x - 1).leading_zeros()
        }
    };
    let level_power = 4.max(ceil_log2(size_ilp) / LEVELS as u32);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[zero; ILP]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size_ilp {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &load(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = zero;
            }
            if i & (level_mask << (j as u32 * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size_ilp {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, &load(i * ILP + k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    let mut partial = acc[0];
    for i in size_ilp * ILP..size {
        add(&mut partial[0], &load(i));
    }
    let mut total = partial[0];
    for p in &partial[1..] {
        add(&mut total, p);
    }
    total
}

/// `torch.mean` of an f32 vector on CPU: the sum above divided by n in f32.
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    torch_sum_f32(x) / x.len() as f32
}

/// bitsandbytes' CPU 8-bit blockwise quantization with the signed dynamic map
/// (`quantize_cpu`): per block absmax = max |x| (0 for an empty or zero block, whose codes
/// are all 0), codes from the 65536-entry LUT at `x * (1 / absmax)`.
pub fn quantize_blockwise_8bit(data: &[f32], block_size: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = dynamic_lut();
    let mut codes = vec![0u8; data.len()];
    let mut absmax = Vec::with_capacity(num_blocks(data.len(), block_size));
    for (block, out) in data.chunks(block_size).zip(codes.chunks_mut(block_size)) {
        let m = block.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
        absmax.push(m);
        if m == 0.0 {
            continue;
        }
        let inv = 1.0f32 / m;
        for (q, &x) in out.iter_mut().zip(block) {
            *q = lut[dynamic_lut_index(x * inv)];
        }
    }
    (codes, absmax)
}

/// The absmax of a 4-bit weight stored with double quantization.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code per 4-bit block.
    pub codes: Vec<u8>,
    /// One f32 absmax per [`NESTED_BLOCK_SIZE`] codes.
    pub nested_absmax: Vec<f32>,
    /// The mean subtracted before quantizing.
    pub offset: f32,
}

/// Double-quantize a 4-bit absmax vector as bitsandbytes does.
pub fn double_quantize(absmax: &[f32]) -> DoubleQuant {
    let offset = torch_mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&centered, NESTED_BLOCK_SIZE);
    DoubleQuant {
        codes,
        nested_absmax,
        offset,
    }
}

/// One restored absmax: `f32(map[code] * nested_absmax[block / nested]) + offset`.
#[inline]
pub fn restore_absmax(
    map: &[f32; 256],
    codes: &[u8],
    nested_absmax: &[f32],
    nested_block_size: usize,
    offset: f32,
    block: usize,
) -> f32 {
    map[codes[block] as usize] * nested_absmax[block / nested_block_size] + offset
}

impl DoubleQuant {
    /// All absmax values restored (bitsandbytes' `dequantize_blockwise(...) + offset`).
    pub fn restore(&self) -> Vec<f32> {
        let map = dynamic_map();
        (0..self.codes.len())
            .map(|b| {
                restore_absmax(
                    map,
                    &self.codes,
                    &self.nested_absmax,
                    NESTED_BLOCK_SIZE,
                    self.offset,
                    b,
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_validation() {
        for ok in [32, 64, 128, 256, 512, 1024, 2048, 4096] {
            validate_block_size(ok).unwrap();
        }
        for bad in [0, 1, 16, 48, 63, 65, 96, 100, 8192, 3000] {
            let err = validate_block_size(bad).unwrap_err();
            assert!(matches!(err, Error::BlockSize { block_size } if block_size == bad));
            assert!(err.to_string().contains(&bad.to_string()), "{err}");
        }
        assert!(quantize_4bit(&[1.0; 10], 48, QuantType::Nf4).is_err());
    }

    #[test]
    fn packing_order_and_padding() {
        // 3 values, block 64, absmax 1: codes 15 (1.0), 0 (-1.0), 7 (0.0) + NF4 pad code 7.
        let (p, a) = quantize_4bit(&[1.0, -1.0, 0.0], 64, QuantType::Nf4).unwrap();
        assert_eq!(p, vec![0xf0, 0x77]);
        assert_eq!(a, vec![1.0]);
        let (p, _) = quantize_4bit(&[1.0, -1.0, 0.0], 64, QuantType::Fp4).unwrap();
        assert_eq!(p, vec![0x3b, 0x00]);
    }

    #[test]
    fn zero_blocks() {
        let mut x = vec![0.0f32; 64 + 10];
        x[0] = 2.0;
        let (_, a) = quantize_4bit(&x[..64], 32, QuantType::Nf4).unwrap();
        assert_eq!(a, vec![2.0, 0.0]);
        let (p, a) = quantize_4bit(&x, 64, QuantType::Nf4).unwrap();
        assert_eq!(a, vec![2.0, 1e-38]); // a short last block clamps its stored absmax
        let d = dequantize_4bit(&p, |b| a[b], x.len(), 64, QuantType::Nf4.table());
        assert_eq!(d, x);
    }

    #[test]
    fn torch_sum_small_cases() {
        assert_eq!(torch_sum_f32(&[]), 0.0);
        assert_eq!(torch_sum_f32(&[1.5]), 1.5);
        let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(torch_sum_f32(&x), 499500.0);
        assert_eq!(torch_mean_f32(&[1.0, 2.0, 4.0]), 7.0 / 3.0);
    }

    #[test]
    fn double_quant_restores_close() {
        let a: Vec<f32> = (0..600)
            .map(|i| 0.01 + (i as f32 * 0.37).sin().abs())
            .collect();
        let dq = double_quantize(&a);
        assert_eq!(dq.codes.len(), 600);
        assert_eq!(dq.nested_absmax.len(), 3);
        for (r, x) in dq.restore().iter().zip(&a) {
            assert!((r - x).abs() < 0.02, "{r} vs {x}");
        }
    }
}
