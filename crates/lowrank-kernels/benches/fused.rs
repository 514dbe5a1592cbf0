//! Fused kernels vs the composed candle path, at SmolLM-135M-like sizes (hidden 576, 9 heads,
//! 3 kv heads, head_dim 64, seq 256, batch 4, vocab 49152, intermediate 1536, LoRA rank 8).
//!
//! `cargo bench -p lowrank-kernels` (set BENCH_ITERS to change the repetitions; the minimum is
//! reported, which is the least noisy figure on a shared machine).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use lowrank_kernels as k;

type R<T> = candle_core::Result<T>;

fn iters() -> usize {
    std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

fn time(mut f: impl FnMut() -> R<()>) -> R<f64> {
    f()?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..iters() {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best * 1e3)
}

fn randn(shape: &[usize], scale: f64) -> R<Tensor> {
    Tensor::randn(0f32, scale as f32, shape, &Device::Cpu)
}

/// Forward alone (inputs plain tensors) and forward + backward (inputs made `Var`s).
fn fwd_bwd(inputs: &[Tensor], train: &[bool], f: &dyn Fn(&[Tensor]) -> R<Tensor>) -> R<(f64, f64)> {
    let fwd = time(|| f(inputs).map(|_| ()))?;
    let vars: Vec<Tensor> = inputs
        .iter()
        .zip(train)
        .map(|(t, &tr)| {
            if tr {
                Ok(Var::from_tensor(t)?.as_tensor().clone())
            } else {
                Ok(t.clone())
            }
        })
        .collect::<R<_>>()?;
    let both = time(|| {
        let y = f(&vars)?;
        let _grads = y.sum_all()?.backward()?;
        Ok(())
    })?;
    Ok((fwd, both))
}

fn report(name: &str, fused: (f64, f64), composed: (f64, f64)) {
    println!(
        "{name:<28} fwd {:>8.2} ms vs {:>8.2} ms ({:>5.2}x)   fwd+bwd {:>8.2} ms vs {:>8.2} ms ({:>5.2}x)",
        fused.0,
        composed.0,
        composed.0 / fused.0,
        fused.1,
        composed.1,
        composed.1 / fused.1
    );
}

fn softmax(x: &Tensor) -> R<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn main() -> R<()> {
    let (b, t, hid, nh, nkv, hd, vocab, inter, rank) = (4, 256, 576, 9, 3, 64, 49152, 1536, 8);
    println!(
        "threads: {}, iterations: {} (min reported); ratio = composed / fused",
        rayon::current_num_threads(),
        iters()
    );

    // RMSNorm
    let x = randn(&[b, t, hid], 1.0)?;
    let w = randn(&[hid], 1.0)?;
    let fused = fwd_bwd(&[x.clone(), w.clone()], &[true, true], &|v| {
        k::rms_norm(&v[0], &v[1], 1e-5)
    })?;
    let comp = fwd_bwd(&[x, w], &[true, true], &|v| {
        let var = v[0].sqr()?.mean_keepdim(D::Minus1)?;
        v[0].broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&v[1])
    })?;
    report("rms_norm (4,256,576)", fused, comp);

    // RoPE
    let q = randn(&[b, nh, t, hd], 1.0)?;
    let ang = Tensor::arange(0f32, (t * hd) as f32, &Device::Cpu)?.reshape((t, hd))?;
    let (cos, sin) = (ang.cos()?, ang.sin()?);
    let fused = fwd_bwd(
        &[q.clone(), cos.clone(), sin.clone()],
        &[true, false, false],
        &|v| k::rope(&v[0], &v[1], &v[2]),
    )?;
    let comp = fwd_bwd(&[q.clone(), cos, sin], &[true, false, false], &|v| {
        let x1 = v[0].narrow(D::Minus1, 0, hd / 2)?;
        let x2 = v[0].narrow(D::Minus1, hd / 2, hd / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        v[0].broadcast_mul(&v[1])? + rot.broadcast_mul(&v[2])?
    })?;
    report("rope (4,9,256,64)", fused, comp);

    // Attention
    let kk = randn(&[b, nkv, t, hd], 1.0)?;
    let vv = randn(&[b, nkv, t, hd], 1.0)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let fused = fwd_bwd(
        &[q.clone(), kk.clone(), vv.clone()],
        &[true, true, true],
        &|v| k::causal_attention(&v[0], &v[1], &v[2], scale as f32, 0, None),
    )?;
    let mask: Vec<f32> = (0..(nh / nkv) * t)
        .flat_map(|r| (0..t).map(move |j| if j <= r % t { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, ((nh / nkv) * t, t), &Device::Cpu)?;
    let comp = fwd_bwd(&[q, kk, vv], &[true, true, true], &|v| {
        let qg = v[0].reshape((b, nkv, (nh / nkv) * t, hd))?;
        let att = (qg.matmul(&v[1].t()?)? * scale)?.broadcast_add(&mask)?;
        softmax(&att)?.matmul(&v[2])?.reshape((b, nh, t, hd))
    })?;
    report("attention (4,9/3,256,64)", fused, comp);

    // SwiGLU
    let g = randn(&[b, t, inter], 1.0)?;
    let u = randn(&[b, t, inter], 1.0)?;
    let fused = fwd_bwd(&[g.clone(), u.clone()], &[true, true], &|v| {
        k::swiglu(&v[0], &v[1])
    })?;
    let comp = fwd_bwd(&[g, u], &[true, true], &|v| v[0].silu()? * &v[1])?;
    report("swiglu (4,256,1536)", fused, comp);

    // LoRA linear (gate_proj shape)
    let x = randn(&[b * t, hid], 1.0)?;
    let w = randn(&[inter, hid], 0.05)?;
    let a = randn(&[rank, hid], 0.05)?;
    let bb = randn(&[inter, rank], 0.05)?;
    let fused = fwd_bwd(
        &[x.clone(), w.clone(), a.clone(), bb.clone()],
        &[true, false, true, true],
        &|v| k::lora_linear(&v[0], &v[1], None, &v[2], &v[3], 2.0),
    )?;
    let comp = fwd_bwd(
        &[x.clone(), w.clone(), a.clone(), bb.clone()],
        &[true, false, true, true],
        &|v| v[0].matmul(&v[1].t()?)? + (v[0].matmul(&v[2].t()?)?.matmul(&v[3].t()?)? * 2.0)?,
    )?;
    report("lora_linear (1024,576->1536)", fused, comp);
    let m = k::dora_row_norm(&w, &a, &bb, 2.0)?;
    let fused = fwd_bwd(
        &[x.clone(), w.clone(), a.clone(), bb.clone(), m.clone()],
        &[true, false, true, true, true],
        &|v| k::dora_linear(&v[0], &v[1], None, &v[2], &v[3], &v[4], 2.0),
    )?;
    let comp = fwd_bwd(
        &[x, w.clone(), a.clone(), bb.clone(), m],
        &[true, false, true, true, true],
        &|v| {
            let norm = (&v[1] + (v[3].matmul(&v[2])? * 2.0)?)?
                .sqr()?
                .sum(D::Minus1)?
                .sqrt()?
                .detach();
            let y =
                (v[0].matmul(&v[1].t()?)? + (v[0].matmul(&v[2].t()?)?.matmul(&v[3].t()?)? * 2.0)?)?;
            y.broadcast_mul(&v[4].broadcast_div(&norm)?)
        },
    )?;
    report("dora_linear (1024,576->1536)", fused, comp);

    // Cross-entropy with the LM head
    let n = b * t;
    let hidden = randn(&[n, hid], 1.0)?;
    let head = randn(&[vocab, hid], 0.05)?;
    let ids: Vec<u32> = (0..n)
        .map(|i| {
            if i % 4 == 0 {
                u32::MAX
            } else {
                ((i * 7919) % vocab) as u32
            }
        })
        .collect();
    let targets = Tensor::from_vec(ids.clone(), n, &Device::Cpu)?;
    for (label, head_trained) in [
        ("cross_entropy head frozen", false),
        ("cross_entropy head trained", true),
    ] {
        let fused = fwd_bwd(
            &[hidden.clone(), head.clone()],
            &[true, head_trained],
            &|v| Ok(k::chunked_cross_entropy(&v[0], &v[1], &targets, u32::MAX)?.0),
        )?;
        let safe: Vec<u32> = ids
            .iter()
            .map(|&i| if i == u32::MAX { 0 } else { i })
            .collect();
        let mask: Vec<f32> = ids
            .iter()
            .map(|&i| if i == u32::MAX { 0.0 } else { 1.0 })
            .collect();
        let safe = Tensor::from_vec(safe, (n, 1), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, n, &Device::Cpu)?;
        let comp = fwd_bwd(
            &[hidden.clone(), head.clone()],
            &[true, head_trained],
            &|v| {
                let logits = v[0].matmul(&v[1].t()?)?;
                let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                (logp.gather(&safe, 1)?.squeeze(1)? * &mask)?
                    .sum_all()?
                    .neg()
            },
        )?;
        report(&format!("{label} ({n}x{vocab})"), fused, comp);
    }

    // AdamW over 1M parameters
    let np = 1 << 20;
    let p = Var::from_tensor(&randn(&[np], 1.0)?)?;
    let grad = randn(&[np], 1.0)?;
    let (mut m, mut v) = (
        Tensor::zeros(np, DType::F32, &Device::Cpu)?,
        Tensor::zeros(np, DType::F32, &Device::Cpu)?,
    );
    let mut step = 0;
    let fused = time(|| {
        step += 1;
        k::adamw_step(
            &p,
            &grad,
            &mut m,
            &mut v,
            step,
            1e-3,
            (0.9, 0.999),
            1e-8,
            0.01,
        )
    })?;
    let mut opt = candle_nn::AdamW::new(
        vec![p.clone()],
        candle_nn::ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )?;
    let loss = (p.as_tensor() * &grad)?.sum_all()?;
    let grads = loss.backward()?;
    use candle_nn::Optimizer;
    let comp = time(|| opt.step(&grads))?;
    println!(
        "{:<28} step {fused:>8.2} ms vs {comp:>8.2} ms ({:>5.2}x)",
        "adamw (1M params)",
        comp / fused
    );

    // Batch-1 decode: bf16 weights vs candle's f32 matmul (+ LoRA path).
    for (label, out_f) in [("decode gate_proj", inter), ("decode lm_head", vocab)] {
        let w32 = randn(&[out_f, hid], 0.05)?;
        let w16 = w32.to_dtype(DType::BF16)?;
        let a = randn(&[rank, hid], 0.05)?;
        let bb = randn(&[out_f, rank], 0.05)?;
        let x = randn(&[1, hid], 1.0)?;
        let bf16 = time(|| k::lora_linear_decode_bf16(&x, &w16, None, &a, &bb, 2.0).map(|_| ()))?;
        let f32_fused = time(|| k::lora_linear(&x, &w32, None, &a, &bb, 2.0).map(|_| ()))?;
        let comp = time(|| {
            (x.matmul(&w32.t()?)? + (x.matmul(&a.t()?)?.matmul(&bb.t()?)? * 2.0)?).map(|_| ())
        })?;
        println!(
            "{label:<28} lora bf16 {bf16:>7.3} ms, lora f32 fused {f32_fused:>7.3} ms, composed f32 {comp:>7.3} ms ({:>5.2}x / {:>5.2}x)",
            comp / bf16,
            comp / f32_fused
        );
    }
    Ok(())
}
