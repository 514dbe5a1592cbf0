//! A 4-bit code table looked up with byte shuffles (AVX2): the decoder of the kernels that
//! read NF4/FP4 weights in registers, exact to the bit (it moves the table's f32 bytes).

#![cfg(target_arch = "x86_64")]

/// A 16-entry f32 table as four byte planes (byte p of every entry, in both 128-bit lanes),
/// so that a lookup is byte shuffles: 32 codes cost one shuffle to spread their bytes, four to
/// look up the planes and eight to interleave the planes back into f32s, where a permute of
/// f32 lanes would take four shuffles per sixteen.
pub struct Planes {
    planes: [std::arch::x86_64::__m256i; 4],
    /// Which packed byte each lane's byte n reads: lane 0 holds codes 0–3, 8–11, 16–19 and
    /// 24–27, lane 1 the others, so that the interleaves come out in order.
    spread: std::arch::x86_64::__m256i,
}

impl Planes {
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn new(code: &[f32; 16]) -> Self {
        use std::arch::x86_64::*;
        let planes = std::array::from_fn(|p| {
            let bytes: [u8; 16] = std::array::from_fn(|i| (code[i].to_bits() >> (8 * p)) as u8);
            _mm256_broadcastsi128_si256(_mm_loadu_si128(bytes.as_ptr().cast()))
        });
        #[rustfmt::skip]
        let spread = _mm256_setr_epi8(
            0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13,
            2, 2, 3, 3, 6, 6, 7, 7, 10, 10, 11, 11, 14, 14, 15, 15,
        );
        Planes { planes, spread }
    }

    /// The values of the 32 codes in the 16 bytes at `packed` (code 2j the high nibble of byte
    /// j, code 2j + 1 its low one), in order, eight per vector.
    ///
    /// # Safety
    /// The CPU must have AVX2; 16 bytes must be readable at `packed`.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn decode(&self, packed: *const u8) -> [std::arch::x86_64::__m256; 4] {
        use std::arch::x86_64::*;
        let bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(packed.cast()));
        let doubled = _mm256_shuffle_epi8(bytes, self.spread);
        // Even bytes take the high nibble, odd bytes the low one.
        let high = _mm256_and_si256(_mm256_srli_epi16::<4>(doubled), _mm256_set1_epi16(0x000f));
        let low = _mm256_and_si256(doubled, _mm256_set1_epi16(0x0f00));
        let idx = _mm256_or_si256(high, low);
        let [p0, p1, p2, p3] = [
            _mm256_shuffle_epi8(self.planes[0], idx),
            _mm256_shuffle_epi8(self.planes[1], idx),
            _mm256_shuffle_epi8(self.planes[2], idx),
            _mm256_shuffle_epi8(self.planes[3], idx),
        ];
        let (low_a, high_a) = (_mm256_unpacklo_epi8(p0, p1), _mm256_unpacklo_epi8(p2, p3));
        let (low_b, high_b) = (_mm256_unpackhi_epi8(p0, p1), _mm256_unpackhi_epi8(p2, p3));
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(low_a, high_a)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(low_a, high_a)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(low_b, high_b)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(low_b, high_b)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::Planes;

    #[test]
    fn decode_equals_the_table_in_code_order() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let code: [f32; 16] = std::array::from_fn(|i| (i as f32 - 7.3) / 7.7);
        let packed: [u8; 16] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        // SAFETY: the CPU has AVX2; 16 bytes are readable at `packed`.
        let got: [[f32; 8]; 4] = unsafe {
            let planes = Planes::new(&code);
            planes
                .decode(packed.as_ptr())
                .map(|v| std::mem::transmute(v))
        };
        for (i, &byte) in packed.iter().enumerate() {
            let (hi, lo) = (code[(byte >> 4) as usize], code[(byte & 15) as usize]);
            assert_eq!(
                got[2 * i / 8][2 * i % 8].to_bits(),
                hi.to_bits(),
                "code {}",
                2 * i
            );
            assert_eq!(
                got[(2 * i + 1) / 8][(2 * i + 1) % 8].to_bits(),
                lo.to_bits(),
                "code {}",
                2 * i + 1
            );
        }
    }
}
