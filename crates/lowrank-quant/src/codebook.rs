//! The 4-bit tables (NF4, FP4) and bitsandbytes' signed 8-bit dynamic map.
//!
//! Both 4-bit tables are stored in code order (index = the 4-bit code written to the file).
//! Quantization picks the code whose value is nearest, exactly as bitsandbytes' CPU path
//! (`backends/default/ops.py`, `quantize_4bit`): the table is sorted (a stable argsort),
//! the f32 midpoints `(a + b) / 2` of neighbours are the thresholds, and a value gets the
//! sorted position `#{midpoints < value}` (`torch.bucketize`, `right=False`), i.e. a value
//! exactly on a midpoint goes to the lower (more negative) code.
//!
//! FP4 has two zero codes (0 = +0 and 8 = "-0", both 0.0 in the table). The stable argsort
//! puts code 0 first, so on CPU values in (-0.0026, 0] get code 0 and values in
//! (0, 0.0026] get code 8. bitsandbytes' CUDA kernel (`csrc/kernels.cu`, `dQuantizeFP4`)
//! decides by sign and magnitude instead (`x > threshold` on |x|): negatives get 0b1xxx,
//! a tie goes towards zero for both signs, and its thresholds are rounded literals
//! (e.g. 0.583333f vs our 0.58333337f). Its NF4 tree (`dQuantizeNF4`) uses `x > t` like
//! bucketize but with double literals rounded to f32, which can differ from the f32
//! midpoints by an ulp. We match the CPU path.

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Which 4-bit table: NormalFloat4 (QLoRA) or bitsandbytes' FP4 (e2m1, bias 3); bitsandbytes'
/// `bnb_4bit_quant_type`, written `nf4` / `fp4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// NormalFloat4: quantiles of N(0, 1), for normally distributed weights.
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bits).
    Fp4,
}

impl QuantType {
    /// The name bitsandbytes and transformers use: `nf4` / `fp4`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::field(
                "quant_type",
                "quant_type",
                format!("expected `nf4` or `fp4`, got `{other}`"),
            )),
        }
    }

    /// The 16 values in code order.
    pub fn table(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4,
            QuantType::Fp4 => &FP4,
        }
    }

    /// Thresholds and the code of each sorted position.
    pub fn codebook(self) -> &'static Codebook4 {
        static NF4_BOOK: OnceLock<Codebook4> = OnceLock::new();
        static FP4_BOOK: OnceLock<Codebook4> = OnceLock::new();
        match self {
            QuantType::Nf4 => NF4_BOOK.get_or_init(|| Codebook4::new(&NF4)),
            QuantType::Fp4 => FP4_BOOK.get_or_init(|| Codebook4::new(&FP4)),
        }
    }
}

/// `--quantize nf4|fp4` (any case).
impl std::str::FromStr for QuantType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            _ => Err(Error::UnknownQuantType { name: s.into() }),
        }
    }
}

/// How to quantize a base weight to 4 bits (bitsandbytes' `quant_type`, `compress_statistics`,
/// `blocksize`): what `--quantize`, `--double-quant` and `--block-size` say, and what a run's
/// options record (as `{"quant_type", "double_quant", "block_size"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuantSpec {
    #[serde(rename = "quant_type")]
    pub kind: QuantType,
    pub double_quant: bool,
    pub block_size: usize,
}

impl QuantSpec {
    /// Checks the block size (a power of two from 32 to 4096).
    pub fn new(kind: QuantType, double_quant: bool, block_size: usize) -> Result<Self> {
        crate::validate_block_size(block_size)?;
        Ok(QuantSpec {
            kind,
            double_quant,
            block_size,
        })
    }

    /// This spec, its block size checked (for one built field by field).
    pub fn validated(self) -> Result<Self> {
        QuantSpec::new(self.kind, self.double_quant, self.block_size)
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// bitsandbytes' `get_4bit_type("nf4")` (already normalized: max |v| = 1).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' `get_4bit_type("fp4")`: e2m1 values in bit-pattern order, divided (in f32)
/// by their max 12. Code 8 is "-0", which bitsandbytes stores as +0.0.
pub const FP4: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0, // 12 / 12
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -12.0 / 12.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// A 4-bit table prepared for nearest-value search.
#[derive(Debug, Clone)]
pub struct Codebook4 {
    /// f32 midpoints of the sorted values, as bitsandbytes computes them.
    pub midpoints: [f32; 15],
    /// The code at each sorted position (stable argsort of the table).
    pub order: [u8; 16],
}

impl Codebook4 {
    fn new(table: &[f32; 16]) -> Self {
        let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
        // `sort_by` is stable, like torch's argsort on a 16-element CPU tensor.
        order.sort_by(|&a, &b| table[a as usize].total_cmp(&table[b as usize]));
        // -0.0 vs 0.0: total_cmp orders them, but the table has only +0.0, so stability holds.
        let midpoints = std::array::from_fn(|i| {
            (table[order[i] as usize] + table[order[i + 1] as usize]) / 2.0
        });
        Codebook4 { midpoints, order }
    }

    /// The code of a value already scaled into [-1, 1]: the number of midpoints strictly
    /// below it (a tie goes to the lower code), mapped through the sort order.
    #[inline]
    pub fn encode(&self, scaled: f32) -> u8 {
        // 15 comparisons, branch-free; NaN counts as below every midpoint (code of -1).
        let pos: usize = self.midpoints.iter().map(|&m| (m < scaled) as usize).sum();
        self.order[pos]
    }
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)` as f32
/// bit patterns, sorted (index = the 8-bit code). The Python builds it from
/// `torch.linspace(0.1, 1, 2**i + 1)` midpoints times 10**(i-6) for i in 0..7, plus 0 and 1;
/// torch's vectorized f32 linspace rounds a few entries differently from any closed form, so
/// the table is kept as bitsandbytes 0.50.2 produces it (checked against the fixture).
pub const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed dynamic map as f32 values.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| DYNAMIC_MAP_BITS.map(f32::from_bits))
}

/// Size of bitsandbytes' CPU quantization LUT for 8-bit blockwise codes.
const LUT_SIZE: usize = 65536;

/// bitsandbytes' CPU 8-bit blockwise quantizer does not search the map: it indexes a
/// 65536-entry table built from the map's f32 midpoints (`csrc/cpu_ops.cpp`,
/// `build_quantize_lut` / `norm_to_lut_index`). Entry i covers the value
/// `-1 + (2 i) / 65535` and holds `#{midpoints < that value}`. CUDA (`dQuantize` in
/// `kernels.cu`) does a binary search of the map instead, so near midpoints the two can
/// pick neighbouring codes.
pub fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let map = dynamic_map();
        let mid: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut lut = vec![0u8; LUT_SIZE];
        let mut idx = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            let val = (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32 - 1.0;
            while idx < mid.len() && mid[idx] < val {
                idx += 1;
            }
            *slot = idx as u8;
        }
        lut
    })
}

/// The LUT index of a value scaled into [-1, 1], as bitsandbytes' x86-64 build computes it:
/// clamp, then `(uint16)((v + 1) * 0.5 * 65535 + 0.5)` with the last multiply-add fused
/// (the shipped `libbitsandbytes_cpu.so` uses `vfmadd213ss` there).
#[inline]
pub fn dynamic_lut_index(scaled: f32) -> usize {
    let v = scaled.clamp(-1.0, 1.0);
    let t = (v + 1.0) * 0.5;
    t.mul_add((LUT_SIZE - 1) as f32, 0.5) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_is_sorted_and_fp4_order_is_stable() {
        assert_eq!(
            QuantType::Nf4.codebook().order,
            std::array::from_fn(|i| i as u8)
        );
        // Sorted FP4 codes: -1, -2/3, -1/2, -1/3, -1/4, -1/6, -1/192, +0, "-0", ...
        assert_eq!(
            QuantType::Fp4.codebook().order,
            [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]
        );
        assert_eq!(QuantType::Fp4.codebook().midpoints[7], 0.0);
    }

    #[test]
    fn encode_ties_go_to_the_lower_code() {
        let nf4 = QuantType::Nf4.codebook();
        for (i, &m) in nf4.midpoints.iter().enumerate() {
            assert_eq!(nf4.encode(m), i as u8);
            assert_eq!(
                nf4.encode(f32::from_bits(m.to_bits()).next_up_compat()),
                i as u8 + 1
            );
        }
        let fp4 = QuantType::Fp4.codebook();
        assert_eq!(fp4.encode(0.0), 0);
        assert_eq!(fp4.encode(-0.0), 0);
        assert_eq!(fp4.encode(1e-9), 8);
        assert_eq!(fp4.encode(-1e-9), 0);
        assert_eq!(fp4.encode(1.0), 3);
        assert_eq!(fp4.encode(-1.0), 11);
    }

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
        assert_eq!(dynamic_lut()[dynamic_lut_index(1.0)], 255);
        assert_eq!(dynamic_lut()[dynamic_lut_index(-1.0)], 0);
    }

    trait NextUp {
        fn next_up_compat(self) -> f32;
    }
    impl NextUp for f32 {
        fn next_up_compat(self) -> f32 {
            if self == 0.0 {
                f32::from_bits(1)
            } else if self > 0.0 {
                f32::from_bits(self.to_bits() + 1)
            } else {
                f32::from_bits(self.to_bits() - 1)
            }
        }
    }
}
