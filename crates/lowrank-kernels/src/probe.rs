//! The machine's read bandwidth, as benchmarks quote it for their roofline: every thread of
//! the pool sums a buffer of its own (allocated and first touched by that thread, so its pages
//! are local) at the same time, with SIMD loads and enough independent sums that neither the
//! add latency nor the instruction rate, only memory, bounds the loop.

use rayon::prelude::*;

/// Bytes each thread reads per pass: far past any cache.
const PER_THREAD: usize = 256 << 20;

/// Bytes per second all the pool's threads together read from memory, best of `passes`.
pub fn read_bandwidth(passes: usize) -> f64 {
    let threads = rayon::current_num_threads();
    let buffers: Vec<Vec<f32>> = rayon::broadcast(|_| vec![1f32; PER_THREAD / 4]);
    let mut best = f64::INFINITY;
    for _ in 0..passes.max(1) {
        let start = std::time::Instant::now();
        let total: f32 = buffers
            .par_iter()
            .with_max_len(1)
            .map(|b| stream_sum(b))
            .sum();
        std::hint::black_box(total);
        best = best.min(start.elapsed().as_secs_f64());
    }
    (threads * PER_THREAD) as f64 / best
}

/// Σ data, read once front to back.
fn stream_sum(data: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA; the loop reads whole 32-value runs inside `data`.
            return unsafe { stream_sum_avx2(data) };
        }
    }
    data.iter().sum()
}

/// [`stream_sum`] with four 8-lane sums of 32 values per step.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn stream_sum_avx2(data: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 4];
    let runs = data.chunks_exact(32);
    let rest: f32 = runs.remainder().iter().sum();
    for run in runs {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_ps(*a, _mm256_loadu_ps(run.as_ptr().add(8 * j)));
        }
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    crate::cpu::sum_lanes(sum) + rest
}

#[cfg(test)]
mod tests {
    #[test]
    fn stream_sum_adds_every_value() {
        let data: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        let want: f32 = data.iter().sum();
        assert_eq!(super::stream_sum(&data), want);
    }
}
