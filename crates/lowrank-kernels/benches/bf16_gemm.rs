//! The bf16 GEMM of `--compute-dtype bf16` against the f32 GEMM (candle's matmul, the `gemm`
//! crate) at the training shapes of a SmolLM-135M-like layer: 4 × 256 rows, hidden 576,
//! intermediate 1536. Forward x·Wᵀ and backward dy·W, as `Bf16Frozen` runs them.
//!
//! `cargo bench -p lowrank-kernels --bench bf16_gemm` (BENCH_ITERS repetitions, minimum
//! reported; BENCH_ROWS rows, 1024 unless set). Prints whether this CPU has AVX512-BF16; without it the bf16 path is the f32 GEMM
//! on widened weights and is expected to be a little slower than plain f32.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lowrank_kernels::{Bf16Frozen, FrozenMatmul};

type R<T> = candle_core::Result<T>;

fn time(iters: usize, mut f: impl FnMut() -> R<()>) -> R<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> R<()> {
    let iters = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    #[cfg(target_arch = "x86_64")]
    let bf16_dot = std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    let bf16_dot = false;
    println!(
        "threads: {}, AVX512-BF16: {bf16_dot}; GFLOP/s, ratio = f32 time / bf16 time",
        rayon::current_num_threads()
    );
    let dev = Device::Cpu;
    // BENCH_ROWS=256: a 256-token prefill's shapes (`--bf16-activations`).
    let rows = std::env::var("BENCH_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    for (out_f, in_f) in [(1536, 576), (576, 1536), (576, 576)] {
        let w = Tensor::randn(0f32, 0.05, (out_f, in_f), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (rows, in_f), &dev)?;
        let dy = Tensor::randn(0f32, 1.0, (rows, out_f), &dev)?;
        let base = Bf16Frozen::new(&w.to_dtype(DType::BF16)?)?;
        let (xv, dyv) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            dy.flatten_all()?.to_vec1::<f32>()?,
        );
        let wt = w.t()?;
        let flop = 2.0 * (rows * out_f * in_f) as f64 * 1e-9;
        let f32_fwd = time(iters, || x.matmul(&wt).map(|_| ()))?;
        let bf16_fwd = time(iters, || base.forward(&xv, rows).map(|_| ()))?;
        let f32_bwd = time(iters, || dy.matmul(&w).map(|_| ()))?;
        let bf16_bwd = time(iters, || base.grad_input(&dyv, rows).map(|_| ()))?;
        println!(
            "W {out_f}x{in_f}, {rows} rows: x·Wᵀ f32 {:7.1} bf16 {:7.1} ({:4.2}x) | dy·W f32 {:7.1} bf16 {:7.1} ({:4.2}x)",
            flop / f32_fwd,
            flop / bf16_fwd,
            f32_fwd / bf16_fwd,
            flop / f32_bwd,
            flop / bf16_bwd,
            f32_bwd / bf16_bwd
        );
    }
    Ok(())
}
