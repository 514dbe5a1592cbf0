//! Helpers for the gradient tests: deterministic inputs, errors, autograd and finite differences.

use candle_core::{DType, Device, Tensor, Var};

/// n deterministic values in [-1, 1), spread by `seed`.
pub fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
        .collect()
}

/// Deterministic pseudo-normal values (sum of uniforms), times `scale`.
pub fn randt(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let v: Vec<f32> = (0..n)
        .map(|_| (next() + next() + next() - 1.5) * 2.0 * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| / max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (vals(a), vals(b));
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-20);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Output and gradients of L = Σ f(inputs)·r with respect to the inputs marked in `train`.
pub fn autograd(
    f: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    train: &[bool],
    r: &Tensor,
) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(train)
        .map(|(t, &tr)| tr.then(|| Var::from_tensor(t).unwrap()))
        .collect();
    let ts: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let out = f(&ts);
    let loss = (&out * r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = vars
        .iter()
        .map(|v| v.as_ref().and_then(|v| grads.get(v.as_tensor()).cloned()))
        .collect();
    (out, g)
}

fn loss64(out: &Tensor, r: &Tensor) -> f64 {
    vals(out)
        .iter()
        .zip(vals(r))
        .map(|(a, b)| *a as f64 * b as f64)
        .sum()
}

/// Worst |fd − grad| / max |grad| over `n` coordinates of input `which`, with central finite
/// differences of L = Σ f(inputs)·r (step h) evaluated through `f` itself.
pub fn fd_err(
    f: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    which: usize,
    grad: &Tensor,
    r: &Tensor,
    h: f32,
    n: usize,
) -> f32 {
    let base = vals(&inputs[which]);
    let g = vals(grad);
    let scale = g.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let mut worst = 0f32;
    let count = base.len();
    for c in 0..n.min(count) {
        // Spread the probed coordinates over the whole tensor.
        let idx = (c * 7919 + 13) % count;
        let eval = |delta: f32| {
            let mut v = base.clone();
            v[idx] += delta;
            let t = Tensor::from_vec(v, inputs[which].dims(), &Device::Cpu).unwrap();
            let mut ins = inputs.to_vec();
            ins[which] = t;
            loss64(&f(&ins), r)
        };
        let fd = ((eval(h) - eval(-h)) / (2.0 * h as f64)) as f32;
        worst = worst.max((fd - g[idx]).abs() / scale);
    }
    worst
}
