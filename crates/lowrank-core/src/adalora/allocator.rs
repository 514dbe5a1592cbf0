//! PEFT's `RankAllocator` (tuners/adalora/layer.py) and `AdaLoraModel.update_and_allocate` /
//! the orthogonality regularizer of `AdaLoraModel.forward` (tuners/adalora/model.py).
//!
//! Importance of every entry of A, E and B: the sensitivity I = |p·∇p| smoothed by an EMA
//! (β1), Ī ← β1·Ī + (1−β1)·I, and its uncertainty Ū ← β2·Ū + (1−β2)·|I − Ī|; the entry's score
//! is Ī·Ū. A triplet's score is score(Eᵢ) + mean score of A's row i + mean score of B's
//! column i. Every `deltaT` steps of the budget phase the lowest triplets (all with a score
//! ≤ the (init_bgt − budget)-th smallest, as `torch.kthvalue`) are masked by zeroing Eᵢ.
//! Everything is computed in f32 as PEFT does.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, D};

use super::config::AdaloraSchedule;
use crate::error::{Error, Result};

/// PEFT's `budget_schedule`: the total rank budget at a step and whether to mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetSchedule {
    /// Σ initial ranks (PEFT: Σ `lora_A.size(0)`).
    pub init_bgt: usize,
    /// `target_r` × number of modules.
    pub target_bgt: usize,
    pub tinit: usize,
    pub tfinal: usize,
    pub delta_t: usize,
    pub total_step: usize,
}

impl BudgetSchedule {
    pub fn new(s: &AdaloraSchedule, init_bgt: usize, modules: usize, total_step: usize) -> Self {
        BudgetSchedule {
            init_bgt,
            target_bgt: s.target_r * modules,
            tinit: s.tinit,
            tfinal: s.tfinal,
            delta_t: s.delta_t.max(1),
            total_step,
        }
    }

    /// The step from which the pattern is final: T − tfinal.
    pub fn final_step(&self) -> usize {
        self.total_step.saturating_sub(self.tfinal)
    }

    /// (budget, mask now): `init_bgt` up to `tinit`, `target_bgt` after T − tfinal, in between
    /// the cubic decay ⌊(init − target)·(1 − (t − tinit)/(T − tfinal − tinit))³ + target⌋,
    /// masking when t is a multiple of `deltaT`.
    pub fn budget(&self, step: usize) -> (usize, bool) {
        if step <= self.tinit {
            (self.init_bgt, false)
        } else if step > self.final_step() {
            (self.target_bgt, true)
        } else {
            let span = (self.total_step - self.tfinal - self.tinit) as f64;
            let mul = 1.0 - (step - self.tinit) as f64 / span;
            let (init, target) = (self.init_bgt as f64, self.target_bgt as f64);
            // Python's int(): truncation toward zero.
            let budget = ((init - target) * mul.powi(3) + target).trunc();
            // `%` rather than `is_multiple_of`, which needs Rust 1.87 (the workspace says 1.85).
            #[allow(clippy::manual_is_multiple_of)]
            let mask = step % self.delta_t == 0;
            (budget.max(0.0) as usize, mask)
        }
    }
}

/// One module's parameters (A, E, B) and their gradients, for the importance update.
pub struct ModuleGrads<'a> {
    pub name: &'a str,
    /// [A, E, B]
    pub params: [&'a Tensor; 3],
    /// [∂L/∂A, ∂L/∂E, ∂L/∂B]
    pub grads: [&'a Tensor; 3],
}

/// What one `update_and_allocate` call decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub budget: usize,
    /// Mask E with this pattern now (module → kept triplets).
    pub mask: Option<BTreeMap<String, Vec<bool>>>,
    /// The score threshold when the allocator ranked triplets this step.
    pub threshold: Option<f32>,
}

/// Smoothed sensitivity (Ī) and uncertainty (Ū) of one parameter tensor.
#[derive(Debug, Clone)]
struct Ema {
    ipt: Tensor,
    unc: Tensor,
}

#[derive(Debug, Clone)]
pub struct RankAllocator {
    pub schedule: BudgetSchedule,
    pub beta1: f64,
    pub beta2: f64,
    /// module → [A, E, B]
    state: BTreeMap<String, [Ema; 3]>,
    /// The last pattern (PEFT's `config.rank_pattern`); `None` before the first masking.
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
}

impl RankAllocator {
    pub fn new(schedule: BudgetSchedule, beta1: f64, beta2: f64) -> Result<Self> {
        if !(beta1 > 0.0 && beta1 < 1.0 && beta2 > 0.0 && beta2 < 1.0) {
            return Err(Error::Msg(format!(
                "AdaLoRA: beta1 and beta2 must be in (0, 1), found {beta1}, {beta2}"
            )));
        }
        Ok(RankAllocator {
            schedule,
            beta1,
            beta2,
            state: BTreeMap::new(),
            rank_pattern: None,
        })
    }

    /// PEFT's `reset_ipt`.
    pub fn reset_ipt(&mut self) {
        self.state.clear();
    }

    /// PEFT's `update_ipt`: I = |p·∇p|, Ī ← β1·Ī + (1−β1)·I, Ū ← β2·Ū + (1−β2)·|I − Ī| (new Ī).
    pub fn update_ipt(&mut self, modules: &[ModuleGrads]) -> Result<()> {
        for m in modules {
            let entry = match self.state.get(m.name) {
                Some(e) => e.clone(),
                None => {
                    let zero = |t: &Tensor| -> Result<Ema> {
                        Ok(Ema {
                            ipt: t.zeros_like()?.to_dtype(DType::F32)?,
                            unc: t.zeros_like()?.to_dtype(DType::F32)?,
                        })
                    };
                    [zero(m.params[0])?, zero(m.params[1])?, zero(m.params[2])?]
                }
            };
            let mut next = entry.clone();
            for i in 0..3 {
                let p = m.params[i].detach().to_dtype(DType::F32)?;
                let g = m.grads[i].detach().to_dtype(DType::F32)?;
                let ipt = (p * g)?.abs()?;
                let avg = ((&entry[i].ipt * self.beta1)? + (&ipt * (1.0 - self.beta1))?)?;
                let unc = ((&entry[i].unc * self.beta2)?
                    + ((&ipt - &avg)?.abs()? * (1.0 - self.beta2))?)?;
                next[i] = Ema { ipt: avg, unc };
            }
            self.state.insert(m.name.to_string(), next);
        }
        Ok(())
    }

    /// Each module's triplet scores: score(Eᵢ) + (mean_j score(A_ij) + mean_k score(B_ki)).
    pub fn triplet_scores(&self) -> Result<BTreeMap<String, Vec<f32>>> {
        let mut out = BTreeMap::new();
        for (name, [a, e, b]) in &self.state {
            let score = |m: &Ema| &m.ipt * &m.unc;
            let sa = score(a)?.mean(D::Minus1)?; // r
            let sb = score(b)?.mean(0)?; // r
            let se = score(e)?.flatten_all()?; // r
            let total = (se + (sa + sb)?)?;
            out.insert(name.clone(), total.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// PEFT's `mask_to_budget`: the threshold is the (init_bgt − budget)-th smallest triplet
    /// score (`torch.kthvalue`); triplets with a score ≤ it are masked.
    pub fn mask_to_budget(&self, budget: usize) -> Result<(f32, BTreeMap<String, Vec<bool>>)> {
        let scores = self.triplet_scores()?;
        let mut all: Vec<f32> = scores.values().flatten().copied().collect();
        all.sort_by(|a, b| a.total_cmp(b));
        let k = self.schedule.init_bgt.saturating_sub(budget);
        let threshold = if k == 0 {
            f32::NEG_INFINITY
        } else {
            *all.get(k - 1).ok_or_else(|| {
                Error::Msg(format!(
                    "AdaLoRA: budget {budget} needs {k} of {} triplets masked",
                    all.len()
                ))
            })?
        };
        let pattern = scores
            .into_iter()
            // PEFT masks `score <= threshold` (a NaN score is kept, as `~(nan <= t)` is true).
            .map(|(n, s)| {
                (
                    n,
                    s.iter()
                        .map(|&v| v.partial_cmp(&threshold).is_none_or(|o| o.is_gt()))
                        .collect(),
                )
            })
            .collect();
        Ok((threshold, pattern))
    }

    /// PEFT's `AdaLoraModel.update_and_allocate(global_step)`, to be called after the
    /// optimizer step with that step's gradients. Before T − tfinal: update the importance and,
    /// on a masking step, mask to the budget; at T − tfinal: mask to the final budget (without
    /// an importance update), keep that pattern and drop the importance state; after it:
    /// re-apply the final pattern.
    pub fn update_and_allocate(
        &mut self,
        step: usize,
        modules: &[ModuleGrads],
    ) -> Result<Allocation> {
        let final_step = self.schedule.final_step();
        if step < final_step {
            self.update_ipt(modules)?;
            let (budget, mask_now) = self.schedule.budget(step);
            if mask_now {
                let (threshold, pattern) = self.mask_to_budget(budget)?;
                self.rank_pattern = Some(pattern.clone());
                return Ok(Allocation {
                    budget,
                    mask: Some(pattern),
                    threshold: Some(threshold),
                });
            }
            Ok(Allocation {
                budget,
                mask: None,
                threshold: None,
            })
        } else if step == final_step {
            let (budget, _) = self.schedule.budget(step);
            let (threshold, pattern) = self.mask_to_budget(budget)?;
            self.rank_pattern = Some(pattern.clone());
            self.reset_ipt();
            Ok(Allocation {
                budget,
                mask: Some(pattern),
                threshold: Some(threshold),
            })
        } else {
            Ok(Allocation {
                budget: self.schedule.target_bgt,
                mask: self.rank_pattern.clone(),
                threshold: None,
            })
        }
    }

    /// The EMA state as named tensors (`<module>.<A|E|B>.{ipt,unc}`), for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, parts) in &self.state {
            for (p, ema) in ["A", "E", "B"].iter().zip(parts) {
                out.push((format!("{name}.{p}.ipt"), ema.ipt.clone()));
                out.push((format!("{name}.{p}.unc"), ema.unc.clone()));
            }
        }
        out
    }

    /// Restores `state_tensors` for the given modules (absent modules = no state yet).
    pub fn load_state(
        &mut self,
        modules: &[String],
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        self.state.clear();
        for name in modules {
            let get = |p: &str, w: &str| tensors.get(&format!("{name}.{p}.{w}")).cloned();
            let mut parts = Vec::new();
            for p in ["A", "E", "B"] {
                match (get(p, "ipt"), get(p, "unc")) {
                    (Some(ipt), Some(unc)) => parts.push(Ema { ipt, unc }),
                    _ => break,
                }
            }
            if let Ok(parts) = <[Ema; 3]>::try_from(parts) {
                self.state.insert(name.clone(), parts);
            }
        }
        Ok(())
    }
}

/// PEFT's orthogonality regularizer: the mean over all A and B matrices of ‖AAᵀ − I‖_F and
/// ‖BᵀB − I‖_F (masked triplets included), a graph for backward.
pub fn orth_regularizer(modules: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    let mut count = 0usize;
    for (a, b) in modules {
        for cov in [a.matmul(&a.t()?)?, b.t()?.matmul(b)?] {
            let n = cov.dim(0)?;
            let eye = Tensor::eye(n, cov.dtype(), cov.device())?;
            let norm = (cov - eye)?.sqr()?.sum_all()?.sqrt()?;
            total = Some(match total {
                Some(t) => (t + norm)?,
                None => norm,
            });
            count += 1;
        }
    }
    match total {
        Some(t) => Ok((t / count as f64)?),
        None => Err(Error::Msg(
            "AdaLoRA: no module for the orthogonality regularizer".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn schedule() -> BudgetSchedule {
        // 14 modules, init_r 4, target_r 2: the fixture run's schedule.
        let s = AdaloraSchedule {
            init_r: 4,
            target_r: 2,
            tinit: 2,
            tfinal: 3,
            delta_t: 2,
            ..Default::default()
        };
        BudgetSchedule::new(&s, 56, 14, 9)
    }

    #[test]
    fn budget_schedule_values() {
        let s = schedule();
        // Warmup up to and including tinit: the full budget, no masking.
        assert_eq!(s.budget(1), (56, false));
        assert_eq!(s.budget(2), (56, false));
        // t = 3: (1 − 1/4)³ = 0.421875 → ⌊28·0.421875 + 28⌋ = ⌊39.8125⌋ = 39, 3 % 2 ≠ 0.
        assert_eq!(s.budget(3), (39, false));
        // Midway (t = 4): 0.5³ → ⌊28/8 + 28⌋ = 31, masked (4 % 2 = 0).
        assert_eq!(s.budget(4), (31, true));
        assert_eq!(s.budget(5), (28, false)); // ⌊28·(1/64) + 28⌋
                                              // T − tfinal = 6: the coefficient is 0, the target budget.
        assert_eq!(s.budget(6), (28, true));
        assert_eq!(s.final_step(), 6);
        assert_eq!(s.budget(7), (28, true));
        assert_eq!(s.budget(9), (28, true));
    }

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn ema_updates_match_hand_computation() {
        let s = schedule();
        let mut alloc = RankAllocator::new(s, 0.85, 0.85).unwrap();
        let p = t(&[2.0], (1, 1));
        let one = t(&[1.0], (1, 1));
        for (g, want_ipt, want_unc) in [
            // I = |2·0.5| = 1: Ī = 0.15, Ū = 0.15·|1 − 0.15| = 0.1275
            (0.5f32, 0.15f32, 0.1275f32),
            // I = 3: Ī = 0.85·0.15 + 0.15·3 = 0.5775, Ū = 0.85·0.1275 + 0.15·|3 − 0.5775| = 0.47175
            (1.5, 0.5775, 0.47175),
        ] {
            let g = t(&[g], (1, 1));
            alloc
                .update_ipt(&[ModuleGrads {
                    name: "m",
                    params: [&p, &one, &one],
                    grads: [&g, &one, &one],
                }])
                .unwrap();
            let st = &alloc.state["m"][0];
            let ipt = st.ipt.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
            let unc = st.unc.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
            assert!((ipt - want_ipt).abs() < 1e-6, "{ipt} vs {want_ipt}");
            assert!((unc - want_unc).abs() < 1e-6, "{unc} vs {want_unc}");
        }
    }

    /// Two modules of rank 2 (in = out = 2), one update from zero with β1 = β2 = 0.5 and all
    /// parameters 1: Ī = I/2, Ū = I/4, so an entry's score is I²/8 with I = |∇|.
    fn two_modules() -> RankAllocator {
        let s = BudgetSchedule {
            init_bgt: 4,
            target_bgt: 2,
            tinit: 0,
            tfinal: 1,
            delta_t: 1,
            total_step: 4,
        };
        let mut alloc = RankAllocator::new(s, 0.5, 0.5).unwrap();
        let ones = t(&[1.0; 4], (2, 2));
        let ones_e = t(&[1.0; 2], (2, 1));
        let zeros = t(&[0.0; 4], (2, 2));
        // m1: A rows |∇| = [1,1] and [2,2] → means 1/8, 4/8; E ∇ = [1, 0] → 1/8, 0;
        //     B columns [1,1] and [0,0] → 1/8, 0. Triplets: 3/8, 4/8.
        let ga = t(&[1., 1., 2., 2.], (2, 2));
        let ge = t(&[1., 0.], (2, 1));
        let gb = t(&[1., 0., 1., 0.], (2, 2));
        // m2: only E ∇ = [2, 1] → triplets 4/8, 1/8.
        let ge2 = t(&[2., 1.], (2, 1));
        alloc
            .update_ipt(&[
                ModuleGrads {
                    name: "m1",
                    params: [&ones, &ones_e, &ones],
                    grads: [&ga, &ge, &gb],
                },
                ModuleGrads {
                    name: "m2",
                    params: [&ones, &ones_e, &ones],
                    grads: [&zeros, &ge2, &zeros],
                },
            ])
            .unwrap();
        alloc
    }

    #[test]
    fn triplet_scores_and_masking_threshold() {
        let alloc = two_modules();
        let s = alloc.triplet_scores().unwrap();
        assert_eq!(s["m1"], vec![0.375, 0.5]);
        assert_eq!(s["m2"], vec![0.5, 0.125]);
        // Budget 2 of 4: k = 2, the 2nd smallest score 0.375 is the threshold; ≤ is masked.
        let (th, p) = alloc.mask_to_budget(2).unwrap();
        assert_eq!(th, 0.375);
        assert_eq!(p["m1"], vec![false, true]);
        assert_eq!(p["m2"], vec![true, false]);
        // Budget 3: k = 1, threshold 0.125.
        let (th, p) = alloc.mask_to_budget(3).unwrap();
        assert_eq!(th, 0.125);
        assert_eq!(p["m1"], vec![true, true]);
        assert_eq!(p["m2"], vec![true, false]);
        // Nothing to mask at the full budget.
        let (_, p) = alloc.mask_to_budget(4).unwrap();
        assert!(p.values().flatten().all(|k| *k));
    }

    #[test]
    fn update_and_allocate_phases() {
        let mut alloc = two_modules();
        let ones = t(&[1.0; 4], (2, 2));
        let ones_e = t(&[1.0; 2], (2, 1));
        let m = [ModuleGrads {
            name: "m1",
            params: [&ones, &ones_e, &ones],
            grads: [&ones, &ones_e, &ones],
        }];
        // T = 4, tfinal = 1: steps 1..2 budget phase, 3 final allocation, 4 enforced.
        let a = alloc.update_and_allocate(3, &m).unwrap();
        assert_eq!(a.budget, 2);
        let pattern = a.mask.unwrap();
        assert_eq!(pattern.values().flatten().filter(|k| **k).count(), 2);
        assert!(
            alloc.state.is_empty(),
            "the importance is reset after the final allocation"
        );
        let a = alloc.update_and_allocate(4, &m).unwrap();
        assert_eq!(a.mask.as_ref(), Some(&pattern));
        assert!(alloc.state.is_empty());
    }

    #[test]
    fn orth_regularizer_is_the_mean_frobenius_distance() {
        // A = I (distance 0), B = 2·I (BᵀB − I = 3·I, ‖·‖ = 3√2): mean = 3√2 / 2.
        let a = t(&[1., 0., 0., 1.], (2, 2));
        let b = t(&[2., 0., 0., 2.], (2, 2));
        let r = orth_regularizer(&[(&a, &b)])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((r - 3.0 * 2f32.sqrt() / 2.0).abs() < 1e-6, "{r}");
    }
}
