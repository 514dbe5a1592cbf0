//! Moving attention heads between the projections' layout (b, t, n·d) and the attention
//! kernel's (b, n, t, d), one autograd node each way.
//!
//! The composed form (reshape, transpose, contiguous; transpose, reshape on the way back) is
//! two or three nodes, and candle's backward materialises a zeroed gradient plus an add for
//! every node, the transpose's add going through its slow strided path. Both directions are
//! permutations, so each is the other's backward.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{slice, view};

const NAME: &str = "lowrank-heads";

/// (b, t, n·d) → (b, n, t, d) for `heads` = n: the query, key or value heads of a projection.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (_, _, nd) = x.dims3()?;
    if heads == 0 || nd % heads != 0 {
        bail!(
            "split_heads: {nd} features do not split into {heads} heads (x {:?})",
            x.dims()
        )
    }
    x.contiguous()?.apply_op1(Heads { heads, split: true })
}

/// (b, n, t, d) → (b, t, n·d): the attention output back in the projections' layout.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (_, heads, _, _) = x.dims4()?;
    x.contiguous()?.apply_op1(Heads {
        heads,
        split: false,
    })
}

struct Heads {
    heads: usize,
    /// (b, t, n·d) → (b, n, t, d) when true, the reverse when false.
    split: bool,
}

/// x (b, t, n, d) → (b, n, t, d): one parallel task per (batch, head) output slab.
fn to_heads(x: &[f32], (b, n, t, d): (usize, usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; b * n * t * d];
    if t * d > 0 {
        out.par_chunks_mut(t * d).enumerate().for_each(|(slab, o)| {
            let (bi, h) = (slab / n, slab % n);
            for (ti, row) in o.chunks_mut(d).enumerate() {
                let src = ((bi * t + ti) * n + h) * d;
                row.copy_from_slice(&x[src..src + d]);
            }
        });
    }
    out
}

/// x (b, n, t, d) → (b, t, n, d): one parallel task per (batch, position) output row.
fn from_heads(x: &[f32], (b, n, t, d): (usize, usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; b * n * t * d];
    if n * d > 0 {
        out.par_chunks_mut(n * d).enumerate().for_each(|(r, o)| {
            let (bi, ti) = (r / t, r % t);
            for (h, part) in o.chunks_mut(d).enumerate() {
                let src = ((bi * n + h) * t + ti) * d;
                part.copy_from_slice(&x[src..src + d]);
            }
        });
    }
    out
}

impl Heads {
    /// (b, n, t, d) of the split side, from the shape of either side.
    fn dims(&self, shape: &Shape, split_side: bool) -> Result<(usize, usize, usize, usize)> {
        if split_side {
            shape.dims4()
        } else {
            let (b, t, nd) = shape.dims3()?;
            Ok((b, self.heads, t, nd / self.heads))
        }
    }

    /// Applies the permutation (`forward`) or its inverse to contiguous data of `shape`.
    fn permute(&self, x: &[f32], shape: &Shape, forward: bool) -> Result<(Vec<f32>, Shape)> {
        let to_split = self.split == forward;
        let dims @ (b, n, t, d) = self.dims(shape, !to_split)?;
        Ok(if to_split {
            (to_heads(x, dims), Shape::from((b, n, t, d)))
        } else {
            (from_heads(x, dims), Shape::from((b, t, n * d)))
        })
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.permute(slice(s, l, NAME)?, l.shape(), true)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        let g = grad.contiguous()?;
        let (dx, _) = self.permute(view(&g, NAME)?.get(), g.shape(), false)?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    /// Both directions equal the composed reshape/transpose path exactly, forward and backward,
    /// and undo each other.
    #[test]
    fn match_composed_path() {
        for (b, n, t, d) in [(2, 3, 5, 4), (1, 1, 7, 8), (3, 4, 1, 2)] {
            let x = randt(&[b, t, n * d], 7, 1.0);
            let r = randt(&[b, n, t, d], 8, 1.0);
            let fused = |ts: &[Tensor]| split_heads(&ts[0], n).unwrap();
            let composed = |ts: &[Tensor]| {
                ts[0]
                    .reshape((b, t, n, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (yf, gf) = autograd(&fused, std::slice::from_ref(&x), &[true], &r);
            let (yc, gc) = autograd(&composed, std::slice::from_ref(&x), &[true], &r);
            assert_eq!(vals(&yf), vals(&yc));
            assert_eq!(yf.dims(), [b, n, t, d]);
            let (gf, gc) = (gf[0].as_ref().unwrap(), gc[0].as_ref().unwrap());
            assert_eq!(gf.dims(), x.dims());
            assert_eq!(vals(gf), vals(gc));

            let r2 = randt(&[b, t, n * d], 9, 1.0);
            let fused = |ts: &[Tensor]| merge_heads(&ts[0]).unwrap();
            let composed = |ts: &[Tensor]| {
                ts[0]
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, t, n * d))
                    .unwrap()
            };
            let (mf, gf) = autograd(&fused, std::slice::from_ref(&yc), &[true], &r2);
            let (mc, gc) = autograd(&composed, std::slice::from_ref(&yc), &[true], &r2);
            assert_eq!(vals(&mf), vals(&mc));
            assert_eq!(vals(&mf), vals(&x), "merge undoes split");
            assert_eq!(vals(gf[0].as_ref().unwrap()), vals(gc[0].as_ref().unwrap()));
        }
    }

    #[test]
    fn refuses_features_that_do_not_split() {
        let x = randt(&[1, 2, 10], 1, 1.0);
        let err = split_heads(&x, 3).unwrap_err().to_string();
        assert!(
            err.contains("10 features") && err.contains("3 heads"),
            "{err}"
        );
    }
}
