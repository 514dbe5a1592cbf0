//! Rotary embedding in transformers' `rotate_half` layout:
//! y = x·cos + rotate_half(x)·sin, rotate_half([x1, x2]) = [−x2, x1].
//!
//! The op is linear in x, so backward needs only cos and sin: dx = g·cos + rotate_halfᵀ(g·sin).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{slice, view};

const NAME: &str = "lowrank-rope";

/// Rotary embedding of `x` (b, h, t, d) with `cos`, `sin` of shape (t, d) (shared by the batch)
/// or (b, t, d) / (b, 1, t, d) (per-row positions, e.g. packed sequences).
/// Only x receives a gradient: the tables are constants.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _h, t, d) = x.dims4()?;
    if d % 2 != 0 {
        bail!("rope: head_dim {d} is odd")
    }
    if cos.dims() != sin.dims() {
        bail!("rope: cos {:?} and sin {:?} differ", cos.dims(), sin.dims())
    }
    let n = cos.elem_count();
    if cos.dims().last() != Some(&d) || (n != t * d && n != b * t * d) {
        bail!(
            "rope: tables of shape {:?} do not fit x of shape {:?}",
            cos.dims(),
            x.dims()
        )
    }
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope {
            per_batch: n != t * d,
        },
    )
}

struct Rope {
    per_batch: bool,
}

/// Applies the rotation (or its transpose, `inverse`) to every (t, d) slab of `x`.
fn rotate(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    dims: (usize, usize, usize, usize),
    per_batch: bool,
    inverse: bool,
) -> Vec<f32> {
    let (_b, h, t, d) = dims;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(t * d)
        .zip(x.par_chunks(t * d))
        .enumerate()
        .for_each(|(slab, (o, x))| {
            let table0 = if per_batch { slab / h * t * d } else { 0 };
            for ti in 0..t {
                let base = ti * d;
                let (c, s) = (
                    &cos[table0 + base..table0 + base + d],
                    &sin[table0 + base..table0 + base + d],
                );
                rotate_head(&x[base..base + d], c, s, &mut o[base..base + d], inverse);
            }
        });
    out
}

/// One head's rotation (or its transpose) of x (d) into o with its position's cos and sin.
#[inline]
fn rotate_head(x: &[f32], c: &[f32], s: &[f32], o: &mut [f32], inverse: bool) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = o.split_at_mut(half);
    if inverse {
        for j in 0..half {
            o1[j] = x1[j] * c[j] + x2[j] * s[j + half];
            o2[j] = x2[j] * c[j + half] - x1[j] * s[j];
        }
    } else {
        for j in 0..half {
            o1[j] = x1[j] * c[j] - x2[j] * s[j];
            o2[j] = x2[j] * c[j + half] + x1[j] * s[j + half];
        }
    }
}

/// Rotary embedding in place over token rows: x is (tokens, heads · head_dim), token-major as
/// a projection gives it, and cos, sin are (tokens, d), each token's own position's tables (the
/// [`rope`] layout); the leading d of each head are rotated (partial rotary when d < head_dim).
/// Inference only.
pub fn rope_rows(
    x: &mut [f32],
    tokens: usize,
    heads: usize,
    cos: &[f32],
    sin: &[f32],
) -> Result<()> {
    let d = cos.len().checked_div(tokens).unwrap_or(0);
    let head_dim = x.len().checked_div(tokens * heads).unwrap_or(0);
    if !d.is_multiple_of(2)
        || cos.len() != tokens * d
        || sin.len() != cos.len()
        || x.len() != tokens * heads * head_dim
        || d > head_dim
    {
        bail!(
            "rope_rows: {} values of x, {} of cos and {} of sin do not fit {tokens} tokens of {heads} heads",
            x.len(),
            cos.len(),
            sin.len()
        )
    }
    let mut rotated = vec![0f32; d];
    for (t, row) in x.chunks_exact_mut((heads * head_dim).max(1)).enumerate() {
        let (c, s) = (&cos[t * d..(t + 1) * d], &sin[t * d..(t + 1) * d]);
        for head in row.chunks_exact_mut(head_dim.max(1)) {
            let head = &mut head[..d];
            rotate_head(head, c, s, &mut rotated, false);
            head.copy_from_slice(&rotated);
        }
    }
    Ok(())
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (
            slice(s1, l1, NAME)?,
            slice(s2, l2, NAME)?,
            slice(s3, l3, NAME)?,
        );
        let dims = l1.shape().dims4()?;
        Ok((
            CpuStorage::F32(rotate(x, cos, sin, dims, self.per_batch, false)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let g = grad.contiguous()?;
        let (gv, cv, sv) = (view(&g, NAME)?, view(cos, NAME)?, view(sin, NAME)?);
        let dx = rotate(
            gv.get(),
            cv.get(),
            sv.get(),
            x.dims4()?,
            self.per_batch,
            true,
        );
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None,
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use candle_core::D;

    /// Token rows rotated in place, each with its own position's tables, equal the op over
    /// (1, heads, tokens, d).
    #[test]
    fn token_rows_equal_the_op() {
        let (tokens, heads, d) = (5, 3, 8);
        let (cos, sin) = tables(1, tokens, d, 0.0);
        let x = randt(&[tokens, heads, d], 7, 1.0);
        let want = rope(
            &x.transpose(0, 1).unwrap().unsqueeze(0).unwrap(),
            &cos,
            &sin,
        )
        .unwrap();
        let want = vals(&want.squeeze(0).unwrap().transpose(0, 1).unwrap());
        let mut got = vals(&x);
        rope_rows(&mut got, tokens, heads, &vals(&cos), &vals(&sin)).unwrap();
        assert_eq!(got, want);
        assert!(rope_rows(&mut got, tokens, heads + 1, &vals(&cos), &vals(&sin)).is_err());
    }

    fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let d = x.dim(D::Minus1).unwrap();
        let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
        let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
        let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        (x.broadcast_mul(cos).unwrap() + rot.broadcast_mul(sin).unwrap()).unwrap()
    }

    fn tables(rows: usize, t: usize, d: usize, offset: f32) -> (Tensor, Tensor) {
        let ang: Vec<f32> = (0..rows * t * d)
            .map(|i| {
                let (p, j) = ((i / d) % t, i % (d / 2));
                (p as f32 + offset * (i / (t * d)) as f32)
                    / 10000f32.powf(2.0 * j as f32 / d as f32)
            })
            .collect();
        let a = Tensor::from_vec(ang, (rows, t, d), &candle_core::Device::Cpu).unwrap();
        (a.cos().unwrap(), a.sin().unwrap())
    }

    #[test]
    fn matches_composed_and_finite_differences() {
        for (b, h, t, d, per_batch) in [
            (2, 3, 5, 8, false),
            (2, 2, 4, 16, true),
            (1, 1, 1, 4, false),
        ] {
            let x = randt(&[b, h, t, d], 11, 1.0);
            let r = randt(&[b, h, t, d], 12, 1.0);
            let (cos, sin) = if per_batch {
                let (c, s) = tables(b, t, d, 3.0);
                (c.unsqueeze(1).unwrap(), s.unsqueeze(1).unwrap())
            } else {
                let (c, s) = tables(1, t, d, 0.0);
                (c.squeeze(0).unwrap(), s.squeeze(0).unwrap())
            };
            let fused = |ts: &[Tensor]| rope(&ts[0], &ts[1], &ts[2]).unwrap();
            let comp = |ts: &[Tensor]| composed(&ts[0], &ts[1], &ts[2]);
            let ins = [x.clone(), cos.clone(), sin.clone()];
            let (yf, gf) = autograd(&fused, &ins, &[true, false, false], &r);
            let (yc, gc) = autograd(&comp, &ins, &[true, false, false], &r);
            let e_fwd = rel_err(&yf, &yc);
            let e_g = rel_err(gf[0].as_ref().unwrap(), gc[0].as_ref().unwrap());
            let fd = fd_err(&fused, &ins, 0, gf[0].as_ref().unwrap(), &r, 1e-2, 40);
            println!("rope b{b} h{h} t{t} d{d} per_batch={per_batch}: fwd {e_fwd:.2e} gx {e_g:.2e} fd {fd:.2e}");
            assert!(e_fwd < 1e-5 && e_g < 1e-5 && fd < 1e-2);
        }
    }
}
