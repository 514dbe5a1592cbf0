//! The batched step's linears (`lowrank_kernels::batch::apply`) at the shapes of a
//! SmolLM-135M-like layer's MLP (gate and up 1536×576 in one call, down 576×1536), for 1 to
//! 128 rows over f32, bf16 and NF4 (double-quantized) weights: time per call, weight bytes read
//! per second and GFLOP/s, against the `gemm` crate's f32 GEMM (candle's matmul) on the same
//! rows, and against the rows one at a time.
//!
//! `cargo bench --workspace --bench step_linears` (BENCH_ITERS repetitions, minimum reported).
//! Times are the process's CPU time per call (all threads), so a busy host slows the figures
//! less than wall time would; with `RAYON_NUM_THREADS=1` they are one core's cost.
//!
//! Those weights stay in the last-level cache between calls. A second table streams them
//! from memory, as a decoding step does: the gate and up weights of 64 layers (453 MB at f32),
//! each layer's once per pass, wall time per pass (BENCH_STREAM_PASSES, least reported).

use candle_core::{Device, Tensor};
use half::bf16;
use lowrank_kernels::batch::{apply, kernel_for, BaseWeights, StepLinear};
use lowrank_quant::{QuantType, Quantized4Bit};

/// CPU seconds this process has used, all threads.
fn cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// The least CPU time of one call over `iters` calls.
fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..iters {
        let t = cpu_seconds();
        f();
        best = best.min(cpu_seconds() - t);
    }
    best
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 0.05)
        .collect()
}

fn main() -> candle_core::Result<()> {
    // The allocator and thread settings the `lowrank` binary runs with.
    lowrank_kernels::process::set_up();
    let iters = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    println!(
        "threads: {}; per call: CPU ms, weight GB per CPU second, GFLOP per CPU second; gemm = candle's f32 matmul; alone = the rows one at a time",
        rayon::current_num_threads()
    );
    let (h, i) = (576, 1536);
    // (name, (out, in) of each linear, in)
    type Shapes<'a> = [(&'a str, Vec<(usize, usize)>, usize); 2];
    let shapes: Shapes = [
        ("gate+up", vec![(i, h), (i, h)], h),
        ("down", vec![(h, i)], i),
    ];
    for (name, parts, in_f) in shapes {
        let ws: Vec<Vec<f32>> = parts
            .iter()
            .enumerate()
            .map(|(k, &(o, n))| values(o * n, k + 1))
            .collect();
        let bs: Vec<Vec<bf16>> = ws
            .iter()
            .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
            .collect();
        let qs: Vec<Quantized4Bit> = ws
            .iter()
            .zip(&parts)
            .map(|(w, &(o, n))| Quantized4Bit::quantize(w, &[o, n], QuantType::Nf4, 64, true))
            .collect::<Result<_, _>>()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let params: usize = parts.iter().map(|(o, n)| o * n).sum();
        let wts: Vec<Tensor> = ws
            .iter()
            .zip(&parts)
            .map(|(w, &(o, n))| Tensor::from_vec(w.clone(), (o, n), &Device::Cpu)?.t())
            .collect::<candle_core::Result<_>>()?;
        for rows in [1, 2, 4, 8, 16, 24, 32, 48, 64, 128] {
            let x = values(rows * in_f, 9);
            let xt = Tensor::from_vec(x.clone(), (rows, in_f), &Device::Cpu)?;
            let flop = 2.0 * (params * rows) as f64;
            let gemm = time(iters, || {
                for wt in &wts {
                    xt.matmul(wt).expect("matmul");
                }
            });
            let mut line = format!(
                "{name:8} {rows:4} rows | gemm {:7.3} ms {:6.1} GFLOP/s",
                gemm * 1e3,
                flop / gemm * 1e-9
            );
            for kind in ["f32", "bf16", "nf4-dq"] {
                let linears: Vec<StepLinear> = (0..parts.len())
                    .map(|k| StepLinear {
                        weight: match kind {
                            "f32" => BaseWeights::F32(&ws[k]),
                            "bf16" => BaseWeights::Bf16(&bs[k]),
                            _ => BaseWeights::FourBit(&qs[k]),
                        },
                        bias: None,
                        segments: Vec::new(),
                    })
                    .collect();
                let bytes: f64 = match kind {
                    "f32" => 4.0 * params as f64,
                    "bf16" => 2.0 * params as f64,
                    _ => qs.iter().map(|q| q.resident_bytes()).sum::<usize>() as f64,
                };
                let t = time(iters, || {
                    apply(&x, in_f, &linears).expect("apply");
                });
                let alone = time(iters.div_ceil(4), || {
                    for row in x.chunks_exact(in_f) {
                        apply(row, in_f, &linears).expect("apply");
                    }
                });
                line += &format!(
                    " | {kind} {:?} {:7.3} ms {:6.1} GB/s {:6.1} GFLOP/s alone x{:4.1}",
                    kernel_for(rows, &linears),
                    t * 1e3,
                    bytes / t * 1e-9,
                    flop / t * 1e-9,
                    alone / t
                );
            }
            println!("{line}");
        }
    }
    streamed()
}

/// The gate and up weights of 64 layers, each layer's pair once per pass: wall ms per pass,
/// weight GB/s and GFLOP/s, f32 and bf16, for 1 to 64 rows.
fn streamed() -> candle_core::Result<()> {
    let passes = std::env::var("BENCH_STREAM_PASSES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let (h, i, layers) = (576, 1536, 64);
    let ws: Vec<Vec<f32>> = (0..2 * layers).map(|k| values(i * h, k)).collect();
    let bs: Vec<Vec<bf16>> = ws
        .iter()
        .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
        .collect();
    let params = (2 * layers * i * h) as f64;
    println!(
        "streamed: gate+up of {layers} layers ({:.0} MB at f32), wall ms per pass",
        4.0 * params * 1e-6
    );
    for rows in [1, 4, 8, 16, 32, 64] {
        let x = values(rows * h, 9);
        let mut line = format!("{rows:4} rows");
        for kind in ["f32", "bf16"] {
            let pass = || {
                for pair in 0..layers {
                    let linears: Vec<StepLinear> = (2 * pair..2 * pair + 2)
                        .map(|k| StepLinear {
                            weight: if kind == "f32" {
                                BaseWeights::F32(&ws[k])
                            } else {
                                BaseWeights::Bf16(&bs[k])
                            },
                            bias: None,
                            segments: Vec::new(),
                        })
                        .collect();
                    apply(&x, h, &linears).expect("apply");
                }
            };
            let mut best = f64::INFINITY;
            for _ in 0..passes {
                let t = std::time::Instant::now();
                pass();
                best = best.min(t.elapsed().as_secs_f64());
            }
            let bytes = params * if kind == "f32" { 4.0 } else { 2.0 };
            line += &format!(
                " | {kind} {:7.2} ms {:5.1} GB/s {:6.1} GFLOP/s",
                best * 1e3,
                bytes / best * 1e-9,
                2.0 * params * rows as f64 / best * 1e-9
            );
        }
        println!("{line}");
    }
    Ok(())
}
