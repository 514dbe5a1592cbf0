//! exp over f32 slices for the softmax, cross-entropy and SiLU loops.
//!
//! libm's `expf` is a scalar call, so on
//! x86-64 with AVX2+FMA eight lanes at a time use the classic range reduction
//! exp(x) = 2ⁿ·eʳ, n = round(x·log₂e), r = x − n·ln 2 (ln 2 split in two so r is exact),
//! and a degree-7 polynomial for eʳ on |r| ≤ ln 2 / 2 (the Cephes `expf` coefficients), within
//! a few ulp of the exact value; with AVX-512F sixteen lanes at a time by the same operations,
//! summed in the same order (each half added in turn to the eight-lane sum), so results are the
//! same bit for bit on either path. Elsewhere the scalar `f32::exp` runs.
//!
//! Edge cases the callers rely on: exp(−∞) and anything below ln(f32::MIN_POSITIVE) is exactly
//! 0 (masked attention scores), NaN stays NaN. Above 88.02 the result saturates at ≈ 1.7e38
//! instead of overflowing (only the sigmoid's exp(−x) goes there, where 1/(1 + e) is 0 either way).

/// xs[i] ← exp(xs[i] − shift); returns Σ of the new values. `shift` = +∞ gives zeros (a row
/// that sees nothing); it must not be −∞ or NaN.
pub(crate) fn exp_shifted(xs: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma() {
            // SAFETY: the CPU supports the features `exp_shifted_avx2` is compiled for.
            return unsafe { exp_shifted_avx2(xs, shift, crate::cpu::has_avx512f()) };
        }
    }
    let mut sum = 0f32;
    for x in xs.iter_mut() {
        *x = (*x - shift).exp();
        sum += *x;
    }
    sum
}

/// out[i] = 1 / (1 + exp(−x[i])), the logistic sigmoid.
pub(crate) fn sigmoid_into(x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), out.len());
    for (o, &x) in out.iter_mut().zip(x) {
        *o = -x;
    }
    exp_shifted(out, 0.0);
    for o in out.iter_mut() {
        *o = 1.0 / (1.0 + *o);
    }
}

/// With `wide` (the CPU must have AVX-512F), the runs of sixteen at the front go through
/// [`exp_shifted_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(xs: &mut [f32], shift: f32, wide: bool) -> f32 {
    use std::arch::x86_64::*;
    let n = xs.len();
    let p = xs.as_mut_ptr();
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    if wide {
        // SAFETY: the caller checked for AVX-512F; the loop stays inside `xs`.
        (acc, i) = exp_shifted_avx512(xs, shift);
    }
    let shift = _mm256_set1_ps(shift);
    // SAFETY (loads and stores): i + 8 ≤ n keeps them inside `xs`.
    while i + 8 <= n {
        let y = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), shift));
        _mm256_storeu_ps(p.add(i), y);
        acc = _mm256_add_ps(acc, y);
        i += 8;
    }
    if i < n {
        // The tail goes through the same lanes (padding with −∞, which adds 0 to the sum), so
        // every element gets the same rounding whatever its position.
        let mut tail = [f32::NEG_INFINITY; 8];
        tail[..n - i].copy_from_slice(&xs[i..]);
        let y = exp8(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), shift));
        _mm256_storeu_ps(tail.as_mut_ptr(), y);
        xs[i..].copy_from_slice(&tail[..n - i]);
        acc = _mm256_add_ps(acc, y);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    lanes.iter().sum()
}

/// xs[i] ← exp(xs[i] − shift) for the whole runs of sixteen at the front of `xs`: the
/// eight-lane sum of the new values (low half, then high half, added in turn) and how many
/// were done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_shifted_avx512(xs: &mut [f32], shift: f32) -> (std::arch::x86_64::__m256, usize) {
    use std::arch::x86_64::*;
    let p = xs.as_mut_ptr();
    let shift = _mm512_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (loads and stores): i + 16 ≤ len keeps them inside `xs`.
    while i + 16 <= xs.len() {
        let y = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), shift));
        _mm512_storeu_ps(p.add(i), y);
        acc = _mm256_add_ps(acc, _mm512_castps512_ps256(y));
        acc = _mm256_add_ps(
            acc,
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(y))),
        );
        i += 16;
    }
    (acc, i)
}

/// Below ln(f32::MIN_POSITIVE) the result is flushed to 0; above 88.02, n would reach 128.
#[cfg(target_arch = "x86_64")]
const LOWEST: f32 = -87.336_55;
#[cfg(target_arch = "x86_64")]
const HIGHEST: f32 = 88.02;
/// ln 2 = 0.693359375 − 2.12194440e-4: the first part has few mantissa bits, so n·it is exact.
#[cfg(target_arch = "x86_64")]
const LN2_HIGH: f32 = 0.693_359_4;
#[cfg(target_arch = "x86_64")]
const LN2_LOW: f32 = -2.121_944_4e-4;
/// eʳ ≈ 1 + r + r²·p(r), p's coefficients from the highest power down (Cephes `expf`).
#[cfg(target_arch = "x86_64")]
const POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// [`exp8`] on sixteen lanes, operation for operation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let set = |v: f32| _mm512_set1_ps(v);
    let lo = set(LOWEST);
    let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo);
    let x = _mm512_max_ps(lo, _mm512_min_ps(set(HIGHEST), x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, set(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, set(LN2_HIGH), x);
    let r = _mm512_fnmadd_ps(n, set(LN2_LOW), r);
    let mut poly = set(POLY[0]);
    for c in &POLY[1..] {
        poly = _mm512_fmadd_ps(poly, r, set(*c));
    }
    let er = _mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), _mm512_add_ps(r, set(1.0)));
    let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    _mm512_maskz_mul_ps(!underflow, er, _mm512_castsi512_ps(two_n))
}

/// exp of eight lanes; see the module comment for the method and the edge cases.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let set = |v: f32| _mm256_set1_ps(v);
    let lo = set(LOWEST);
    let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
    // MINPS/MAXPS return their second operand when either is NaN, so NaN passes through.
    let x = _mm256_max_ps(lo, _mm256_min_ps(set(HIGHEST), x));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        set(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, set(LN2_HIGH), x);
    let r = _mm256_fnmadd_ps(n, set(LN2_LOW), r);
    let mut poly = set(POLY[0]);
    for c in &POLY[1..] {
        poly = _mm256_fmadd_ps(poly, r, set(*c));
    }
    let er = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, set(1.0)));
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_andnot_ps(underflow, _mm256_mul_ps(er, _mm256_castsi256_ps(two_n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 4 ulp of the f64 exp over the softmax range and beyond, at every length around
    /// the 8-lane boundary; the returned sum is the sum of the outputs.
    #[test]
    fn matches_f64_exp() {
        for len in [0, 1, 5, 7, 8, 9, 15, 16, 17, 1000] {
            let xs: Vec<f32> = (0..len)
                .map(|i| -84.0 + 164.0 * i as f32 / len.max(1) as f32 + 0.37 * (i % 3) as f32)
                .collect();
            for shift in [0.0f32, 3.5, -2.25] {
                let mut got = xs.clone();
                let sum = exp_shifted(&mut got, shift);
                let mut want_sum = 0f64;
                for (&x, &g) in xs.iter().zip(&got) {
                    let want = ((x - shift) as f64).exp();
                    want_sum += want;
                    if want > f32::MIN_POSITIVE as f64 && want < 1e38 {
                        let rel = (g as f64 - want).abs() / want;
                        assert!(
                            rel < 4.0 * f32::EPSILON as f64,
                            "exp({x} - {shift}): {g} vs {want}"
                        );
                    }
                }
                let tol = 1e-6 * want_sum.abs() + 1e-30;
                assert!(
                    (sum as f64 - want_sum).abs() <= tol,
                    "len {len}: sum {sum} vs {want_sum}"
                );
            }
        }
    }

    /// The sixteen-lane path gives the eight-lane path's values and sum bit for bit, over
    /// every edge case and lengths around both widths.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_lanes_equal_eight() {
        if !crate::cpu::has_avx512f() {
            return;
        }
        let specials = [
            f32::NEG_INFINITY,
            -1000.0,
            -87.5,
            0.0,
            f32::NAN,
            200.0,
            88.5,
        ];
        for len in [15, 16, 17, 31, 33, 100] {
            let xs: Vec<f32> = (0..len)
                .map(|i| {
                    if i % 4 == 0 {
                        specials[(i / 4) % specials.len()]
                    } else {
                        -90.0 + 185.0 * i as f32 / len as f32 + 0.013 * i as f32
                    }
                })
                .collect();
            let (mut eight, mut sixteen) = (xs.clone(), xs.clone());
            // SAFETY: AVX-512F (checked above) implies AVX2 and FMA.
            let (s8, s16) = unsafe {
                (
                    exp_shifted_avx2(&mut eight, 1.25, false),
                    exp_shifted_avx2(&mut sixteen, 1.25, true),
                )
            };
            assert_eq!(s8.to_bits(), s16.to_bits(), "len {len}: sums differ");
            for (a, b) in eight.iter().zip(&sixteen) {
                assert_eq!(a.to_bits(), b.to_bits(), "len {len}: {a} vs {b}");
            }
        }
    }

    /// −∞ and deep underflow give exactly 0, 0 gives exactly 1, NaN stays NaN, large inputs
    /// saturate to a finite value.
    #[test]
    fn edge_cases() {
        let mut xs = vec![
            f32::NEG_INFINITY,
            -1000.0,
            -88.0,
            0.0,
            f32::NAN,
            200.0,
            1.0,
            -1.0,
            f32::NEG_INFINITY,
        ];
        exp_shifted(&mut xs, 0.0);
        assert_eq!(xs[0], 0.0);
        assert_eq!(xs[1], 0.0);
        assert_eq!(xs[2], 0.0);
        assert_eq!(xs[3], 1.0);
        assert!(xs[4].is_nan());
        assert!(xs[5].is_finite() && xs[5] > 1e38);
        assert!((xs[6] - std::f32::consts::E).abs() < 2e-6);
        assert_eq!(xs[8], 0.0);
    }

    #[test]
    fn sigmoid_matches_formula() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 1.7).collect();
        let mut s = vec![0f32; x.len()];
        sigmoid_into(&x, &mut s);
        for (&x, &s) in x.iter().zip(&s) {
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!(
                (s as f64 - want).abs() < 1e-6 * want.max(1e-30) + 1e-38,
                "σ({x}) = {s}, want {want}"
            );
        }
    }
}
