//! Combining several adapters into one (`lowrank combine`).
//!
//! Every method is defined on the updates the adapters make, ΔWᵢ = sᵢ·BᵢAᵢ (a DoRA adapter's
//! effective update W' − W against the base, see [`dora`]), weighted by wᵢ (negative weights
//! subtract). A module missing from an adapter contributes zero there; the same module name
//! with different shapes is an error.
//!
//! - `linear`: Σ wᵢ·ΔWᵢ exactly, computed in the span of the stacked factors (QR of
//!   [w₁B₁ … wₙBₙ] and [A₁ … Aₙ]ᵀ, SVD of the small core) and stored at its numerical rank
//!   (≤ Σ rᵢ; the same adapter twice stays rank r).
//! - `cat`: the same sum with the factors stacked as they are (rank Σ rᵢ).
//! - `svd`: the same sum truncated to its best approximation of rank ≤ `--rank` (default:
//!   the largest input rank at that module).
//! - `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: prune each dense ΔWᵢ entrywise
//!   (top round(density·n) by magnitude, or DARE's seeded keep-with-probability-density and
//!   rescale), weight, then sum or (TIES) elect a sign per entry and take the disjoint mean.
//!   The merged update is generally of full rank: stored exactly (numerical rank, up to
//!   min(d, k)). Their `_svd` variants truncate it to `--rank` like `svd`.
//!
//! PEFT differs: its `linear`/`ties`/`dare_*`/`magnitude_prune` combine the A and B factors
//! separately (√(wᵢ·sᵢ) on A, √wᵢ on B), so the product has cross terms Bᵢ·Aⱼ and the pruning
//! is of factor entries, not of ΔW's; its `svd` paths weight by wᵢ·sᵢ on top of ΔWᵢ = sᵢ·BᵢAᵢ,
//! applying the scale twice; and its TIES elects signs from the unweighted updates, so a
//! negatively weighted adapter votes with the sign it is not added with. Here the vote is over
//! the weighted contributions wᵢ·ΔWᵢ — the values that are then averaged.

pub mod dora;
pub mod method;
pub mod output;
pub mod prune;

use std::collections::BTreeMap;

use lowrank_core::lora::{LoraAdapter, LoraVariant};
use nalgebra::DMatrix;

pub use method::{MajoritySign, Merge, Method, Pruning};

use crate::{Error, Factored, LowRankSvd, Result};

/// Singular values below this fraction of Σ|wᵢ|·‖ΔWᵢ‖_F are round-off, not rank: far below
/// the f32 precision the adapter is saved in (relative 6e-8).
const RANK_TOLERANCE: f64 = 1e-10;

/// One adapter to combine, with its weight; `label` names it in messages (its folder).
pub struct Input<'a> {
    pub label: String,
    pub adapter: &'a LoraAdapter,
    pub weight: f64,
}

/// The method and its parameters. A parameter the method does not use is an error rather than
/// silently ignored.
#[derive(Debug, Clone)]
pub struct Options {
    pub method: Method,
    /// Fraction of entries kept, in (0, 1]: TIES, DARE and magnitude pruning.
    pub density: Option<f64>,
    /// TIES' sign election; total by default.
    pub majority_sign: Option<MajoritySign>,
    /// Output rank of the truncating methods; default the largest input rank per module.
    pub rank: Option<usize>,
    /// DARE's random masks; default 0.
    pub seed: Option<u64>,
}

/// The base weight (out × in) of a module, for DoRA inputs.
pub type BaseWeights<'a> = &'a dyn Fn(&str) -> Result<DMatrix<f64>>;

/// The combined adapter and, per module, what was done.
#[derive(Debug)]
pub struct Combined {
    pub adapter: LoraAdapter,
    pub modules: Vec<ModuleReport>,
}

#[derive(Debug, Clone)]
pub struct ModuleReport {
    pub name: String,
    pub rank: usize,
    /// How many of the inputs adapt this module.
    pub inputs: usize,
    /// ‖saved − target‖_F / ‖target‖_F, with the saved (f32) factors; the target is Σ wᵢ·ΔWᵢ
    /// for `linear`/`cat`/`svd` and the pruned merge for the entrywise methods (so it is the
    /// truncation error for the `_svd` variants and round-off otherwise).
    pub relative_error: f64,
    /// Entrywise methods: ‖merge − Σ wᵢ·ΔWᵢ‖_F / ‖Σ wᵢ·ΔWᵢ‖_F, how far pruning moved the
    /// result from plain task arithmetic.
    pub change_from_sum: Option<f64>,
}

/// One adapter's update at one module.
struct Part {
    adapter_index: usize,
    weight: f64,
    update: Factored,
    rank: usize,
}

impl Options {
    /// `method` with no parameters set.
    pub fn new(method: Method) -> Self {
        Options {
            method,
            density: None,
            majority_sign: None,
            rank: None,
            seed: None,
        }
    }

    /// The method, with every parameter checked against it.
    fn validated(&self) -> Result<Method> {
        let method = self.method;
        let unused = |flag: &str, who: &str| {
            Error::Invalid(format!(
                "{flag}: not used by method {method} (only by {who})"
            ))
        };
        match (method.pruning(), self.density) {
            (Some(_), None) => {
                return Err(Error::Invalid(format!(
                    "--density: method {method} needs the fraction of entries to keep, in (0, 1]"
                )))
            }
            (Some(_), Some(d)) if !(d > 0.0 && d <= 1.0) => {
                return Err(Error::Invalid(format!("--density: {d} is outside (0, 1]")))
            }
            (None, Some(_)) => {
                return Err(unused(
                    "--density",
                    "ties, dare_* and magnitude_prune methods",
                ))
            }
            _ => {}
        }
        if self.majority_sign.is_some() && !method.elects_sign() {
            return Err(unused("--majority-sign", "ties and dare_ties methods"));
        }
        match self.rank {
            Some(0) => return Err(Error::Invalid("--rank: must be at least 1".into())),
            Some(_) if !method.truncates() => {
                return Err(unused("--rank", "svd and *_svd methods"))
            }
            _ => {}
        }
        if self.seed.is_some() && method.pruning() != Some(Pruning::Random) {
            return Err(unused("--seed", "dare_* methods"));
        }
        Ok(method)
    }
}

/// Combines `inputs` into one plain LoRA adapter. `base` gives base weights for DoRA inputs.
pub fn combine(inputs: &[Input], options: &Options, base: Option<BaseWeights>) -> Result<Combined> {
    let method = options.validated()?;
    if inputs.is_empty() {
        return Err(Error::Invalid("--adapters: nothing to combine".into()));
    }
    for input in inputs {
        if !input.weight.is_finite() {
            return Err(Error::Invalid(format!(
                "--weights: {} for {} is not a finite number",
                input.weight, input.label
            )));
        }
        if input.adapter.config.variant == LoraVariant::Dora && base.is_none() {
            return Err(Error::Invalid(format!(
                "{}: use_dora is true; a DoRA adapter's update W' − W depends on the base weights: pass --base MODEL",
                input.label
            )));
        }
    }
    let names: std::collections::BTreeSet<&String> = inputs
        .iter()
        .flat_map(|i| i.adapter.modules.keys())
        .collect();
    let mut factors = BTreeMap::new();
    let mut reports = Vec::new();
    for name in names {
        let parts = module_parts(name, inputs, base)?;
        let (factored, report) = combine_module(name, &parts, method, options)?;
        factors.insert(name.clone(), factored);
        reports.push(report);
    }
    let device = inputs[0]
        .adapter
        .modules
        .values()
        .next()
        .map(|m| m.a.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let adapter = output::scale_one_adapter(&factors, common_base_model(inputs), &device)?;
    Ok(Combined {
        adapter,
        modules: reports,
    })
}

/// Each input's update at module `name`, checking that their shapes agree.
fn module_parts(name: &str, inputs: &[Input], base: Option<BaseWeights>) -> Result<Vec<Part>> {
    let mut parts: Vec<Part> = Vec::new();
    let mut first_label = "";
    for (adapter_index, input) in inputs.iter().enumerate() {
        let Some(module) = input.adapter.modules.get(name) else {
            continue;
        };
        let update = match (&module.magnitude, base) {
            (Some(_), Some(base)) => {
                Factored::from_dense(dora::effective_update(name, module, &base(name)?)?)
            }
            _ => Factored::from_module(module)?,
        };
        if let Some(first) = parts.first() {
            let (d, k) = (first.update.out_features(), first.update.in_features());
            if (update.out_features(), update.in_features()) != (d, k) {
                return Err(Error::Invalid(format!(
                    "module {name:?} is {d}×{k} in {first_label} but {}×{} in {}: adapters of different base models cannot be combined",
                    update.out_features(),
                    update.in_features(),
                    input.label
                )));
            }
        } else {
            first_label = &input.label;
        }
        parts.push(Part {
            adapter_index,
            weight: input.weight,
            rank: module.rank(),
            update,
        });
    }
    Ok(parts)
}

/// The combined factors of one module and its report.
fn combine_module(
    name: &str,
    parts: &[Part],
    method: Method,
    options: &Options,
) -> Result<(Factored, ModuleReport)> {
    let weighted: Vec<(f64, &Factored)> = parts.iter().map(|p| (p.weight, &p.update)).collect();
    let sum = Factored::weighted_sum(&weighted)?;
    let tolerance = RANK_TOLERANCE
        * parts
            .iter()
            .map(|p| p.weight.abs() * p.update.frobenius_norm())
            .sum::<f64>();
    let max_rank = |svd: &LowRankSvd| {
        let wanted = options
            .rank
            .unwrap_or_else(|| parts.iter().map(|p| p.rank).max().unwrap_or(1));
        svd.rank_above(tolerance).min(wanted)
    };
    let (factored, relative_error, change_from_sum) = match method {
        Method::Linear | Method::Svd => {
            let svd = sum.svd();
            let rank = if method.truncates() {
                max_rank(&svd)
            } else {
                svd.rank_above(tolerance)
            };
            let out = nonempty(svd.truncate(rank));
            let error = factored_relative_error(&out, &sum, &svd)?;
            (out, error, None)
        }
        Method::Cat => {
            let svd = sum.svd();
            let error = factored_relative_error(&sum, &sum, &svd)?;
            (sum, error, None)
        }
        Method::Entrywise { pruning, merge, .. } => {
            let merged = entrywise_merge(name, parts, pruning, merge, options);
            let svd = LowRankSvd::of_dense(merged.clone());
            let rank = if method.truncates() {
                max_rank(&svd)
            } else {
                svd.rank_above(tolerance)
            };
            let out = nonempty(svd.truncate(rank));
            let saved = out.rounded_to_f32().to_dense();
            let error = relative(&saved - &merged, merged.norm());
            let exact_sum = sum.to_dense();
            let change = relative(&merged - &exact_sum, exact_sum.norm());
            (out, error, Some(change))
        }
    };
    let report = ModuleReport {
        name: name.to_string(),
        rank: factored.rank(),
        inputs: parts.len(),
        relative_error,
        change_from_sum,
    };
    Ok((factored, report))
}

/// TIES / DARE / magnitude pruning on the dense updates of one module.
fn entrywise_merge(
    name: &str,
    parts: &[Part],
    pruning: Pruning,
    merge: Merge,
    options: &Options,
) -> DMatrix<f64> {
    // Validated: entrywise methods always have a density.
    let density = options.density.unwrap_or(1.0);
    let contributions: Vec<DMatrix<f64>> = parts
        .iter()
        .map(|p| {
            let dense = p.update.to_dense();
            let pruned = match pruning {
                Pruning::Magnitude => prune::magnitude_prune(&dense, density),
                Pruning::Random => {
                    let mut rng = prune::mask_rng(options.seed.unwrap_or(0), p.adapter_index, name);
                    prune::random_prune(&dense, density, &mut rng)
                }
            };
            pruned * p.weight
        })
        .collect();
    match merge {
        Merge::Sum => contributions
            .iter()
            .skip(1)
            .fold(contributions[0].clone(), |acc, c| acc + c),
        Merge::SignElection => {
            prune::elect_and_average(&contributions, options.majority_sign.unwrap_or_default())
        }
    }
}

/// ‖saved − target‖/‖target‖ in factored form, with `out` rounded to f32 as it is saved.
fn factored_relative_error(
    out: &Factored,
    target: &Factored,
    target_svd: &LowRankSvd,
) -> Result<f64> {
    let distance = out.rounded_to_f32().frobenius_distance(target)?;
    Ok(distance / nonzero(target_svd.frobenius_norm()))
}

fn relative(difference: DMatrix<f64>, norm: f64) -> f64 {
    difference.norm() / nonzero(norm)
}

/// A zero target has zero output (nothing is above the rank tolerance): report the absolute
/// error, 0, rather than 0/0.
fn nonzero(norm: f64) -> f64 {
    if norm > 0.0 {
        norm
    } else {
        1.0
    }
}

/// PEFT rejects rank 0: an update that is exactly zero is stored as rank-1 zero factors.
fn nonempty(f: Factored) -> Factored {
    if f.rank() > 0 {
        return f;
    }
    Factored {
        b: DMatrix::zeros(f.out_features(), 1),
        a: DMatrix::zeros(1, f.in_features()),
    }
}

/// `base_model_name_or_path` when every input names the same base.
fn common_base_model(inputs: &[Input]) -> Option<String> {
    let first = inputs.first()?.adapter.config.base_model.clone();
    inputs
        .iter()
        .all(|i| i.adapter.config.base_model == first)
        .then_some(first)
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use lowrank_core::lora::{LoraConfig, LoraModule};
    use lowrank_core::targets::ModuleSelector;

    /// An adapter from (module, B, A, scale), B and A given row-major with their shapes.
    fn adapter(modules: &[(&str, DMatrix<f64>, DMatrix<f64>, f64)]) -> LoraAdapter {
        let names = modules.iter().map(|(n, ..)| n.to_string()).collect();
        let tensor =
            |m: &DMatrix<f64>| crate::factored::tensor_from_matrix(m, &Device::Cpu).unwrap();
        LoraAdapter {
            config: LoraConfig::new(1, 1.0, ModuleSelector::Names(names)),
            modules: modules
                .iter()
                .map(|(name, b, a, scale)| {
                    let module = LoraModule {
                        a: tensor(a),
                        b: tensor(b),
                        magnitude: None,
                        scale: *scale,
                    };
                    (name.to_string(), module)
                })
                .collect(),
        }
    }

    fn m(rows: usize, cols: usize, row_major: &[f64]) -> DMatrix<f64> {
        DMatrix::from_row_slice(rows, cols, row_major)
    }

    fn run(adapters: &[&LoraAdapter], weights: &[f64], options: &Options) -> Result<Combined> {
        let inputs: Vec<Input> = adapters
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (adapter, weight))| Input {
                label: format!("adapter{i}"),
                adapter,
                weight: *weight,
            })
            .collect();
        combine(&inputs, options, None)
    }

    fn with(method: &str) -> Options {
        Options::new(method.parse().unwrap())
    }

    /// The update the combined adapter's module `name` makes.
    fn delta(combined: &Combined, name: &str) -> DMatrix<f64> {
        Factored::from_module(&combined.adapter.modules[name])
            .unwrap()
            .to_dense()
    }

    fn assert_close(got: &DMatrix<f64>, want: &DMatrix<f64>, tolerance: f64) {
        let diff = (got - want).abs().max();
        assert!(diff <= tolerance, "got {got} want {want} (max diff {diff})");
    }

    /// Two rank-1 adapters on a 2×2 module, worked by hand: 0.5·2·[1; 2]·[3 −1] −
    /// 1·[1; 0]·[0 1] = [[3, −2], [6, −2]].
    fn hand_pair() -> (LoraAdapter, LoraAdapter, DMatrix<f64>) {
        let x = adapter(&[("q", m(2, 1, &[1.0, 2.0]), m(1, 2, &[3.0, -1.0]), 2.0)]);
        let y = adapter(&[("q", m(2, 1, &[1.0, 0.0]), m(1, 2, &[0.0, 1.0]), 1.0)]);
        (x, y, m(2, 2, &[3.0, -2.0, 6.0, -2.0]))
    }

    #[test]
    fn cat_stacks_the_scaled_factors() {
        let (x, y, expected) = hand_pair();
        let out = run(&[&x, &y], &[0.5, -1.0], &with("cat")).unwrap();
        let module = &out.adapter.modules["q"];
        assert_eq!(module.scale, 1.0);
        let b: Vec<Vec<f32>> = module.b.to_vec2().unwrap();
        let a: Vec<Vec<f32>> = module.a.to_vec2().unwrap();
        assert_eq!(b, vec![vec![1.0, -1.0], vec![2.0, 0.0]]);
        assert_eq!(a, vec![vec![3.0, -1.0], vec![0.0, 1.0]]);
        assert_close(&delta(&out, "q"), &expected, 0.0);
        assert_eq!(out.modules[0].rank, 2);
        assert!(out.modules[0].relative_error < 1e-12);
    }

    #[test]
    fn linear_is_exact_and_keeps_only_the_numerical_rank() {
        let (x, y, expected) = hand_pair();
        let out = run(&[&x, &y], &[0.5, -1.0], &with("linear")).unwrap();
        assert_close(&delta(&out, "q"), &expected, 1e-6);
        assert_eq!(out.modules[0].rank, 2);
        assert!(out.modules[0].relative_error < 1e-7);
        // The same adapter twice is still rank 1 (cat would stack it to rank 2).
        let twice = run(&[&x, &x], &[0.25, 0.25], &with("linear")).unwrap();
        assert_eq!(twice.modules[0].rank, 1);
        assert_close(&delta(&twice, "q"), &m(2, 2, &[3.0, -1.0, 6.0, -2.0]), 1e-6);
        assert_eq!(
            run(&[&x, &x], &[0.25, 0.25], &with("cat")).unwrap().modules[0].rank,
            2
        );
        // A skill minus itself is nothing: stored as rank-1 zeros.
        let none = run(&[&x, &x], &[1.0, -1.0], &with("linear")).unwrap();
        assert_eq!(none.modules[0].rank, 1);
        assert_close(&delta(&none, "q"), &DMatrix::zeros(2, 2), 1e-12);
    }

    #[test]
    fn svd_truncation_error_is_the_dropped_singular_value() {
        let (x, y, expected) = hand_pair();
        let mut options = with("svd");
        options.rank = Some(1);
        let out = run(&[&x, &y], &[0.5, -1.0], &options).unwrap();
        // MᵀM = [[45, −18], [−18, 8]]: σ² are the roots of λ² − 53λ + 36, and ‖M‖² = 53.
        let sigma2_small = (53.0 - (53.0f64 * 53.0 - 4.0 * 36.0).sqrt()) / 2.0;
        let error = (sigma2_small / 53.0).sqrt();
        let report = &out.modules[0];
        assert_eq!(report.rank, 1);
        assert!(
            (report.relative_error - error).abs() < 1e-6,
            "{} vs {error}",
            report.relative_error
        );
        let got = (delta(&out, "q") - &expected).norm() / expected.norm();
        assert!((got - error).abs() < 1e-6, "{got} vs {error}");
        // Without --rank: the largest input rank (1 here).
        assert_eq!(
            run(&[&x, &y], &[0.5, -1.0], &with("svd")).unwrap().modules[0].rank,
            1
        );
    }

    /// Adapters whose update is their A (B = I, scale 1), so ΔW is the matrix written.
    fn dense_adapters() -> [LoraAdapter; 3] {
        let identity = DMatrix::identity(2, 2);
        [
            m(2, 2, &[3.0, -1.0, 2.0, 5.0]),
            m(2, 2, &[-4.0, 2.0, 1.0, -0.5]),
            m(2, 2, &[1.0, 0.0, 0.0, 3.0]),
        ]
        .map(|a| adapter(&[("q", identity.clone(), a, 1.0)]))
    }

    fn entrywise(
        method: &str,
        density: f64,
        sign: Option<MajoritySign>,
        weights: &[f64],
    ) -> DMatrix<f64> {
        let adapters = dense_adapters();
        let chosen: Vec<&LoraAdapter> = adapters.iter().take(weights.len()).collect();
        let mut options = with(method);
        options.density = Some(density);
        options.majority_sign = sign;
        delta(&run(&chosen, weights, &options).unwrap(), "q")
    }

    #[test]
    fn ties_trims_elects_and_takes_the_disjoint_mean() {
        // density 0.5 keeps two entries each: [[3, 0], [0, 5]], [[−4, 2], [0, 0]],
        // [[1, 0], [0, 3]].
        let total = Some(MajoritySign::Total);
        let frequency = Some(MajoritySign::Frequency);
        // (0,0): 3 − 4 + 1 = 0 elects +, mean of 3 and 1; (1,1): mean of 5 and 3.
        assert_close(
            &entrywise("ties", 0.5, None, &[1.0; 3]),
            &m(2, 2, &[2.0, 2.0, 0.0, 4.0]),
            1e-6,
        );
        // Two adapters at (0,0): the total −1 elects −; one vote each ties at 0 → +.
        assert_close(
            &entrywise("ties", 0.5, total, &[1.0, 1.0]),
            &m(2, 2, &[-4.0, 2.0, 0.0, 5.0]),
            1e-6,
        );
        assert_close(
            &entrywise("ties", 0.5, frequency, &[1.0, 1.0]),
            &m(2, 2, &[3.0, 2.0, 0.0, 5.0]),
            1e-6,
        );
        // Weights act before the vote: 3 − 0.5·4 = 1 elects +.
        assert_close(
            &entrywise("ties", 0.5, total, &[1.0, 0.5]),
            &m(2, 2, &[3.0, 1.0, 0.0, 5.0]),
            1e-6,
        );
        // A subtracted adapter votes with the sign it is added with: 3 + 4 elects +, mean 3.5;
        // (0,1) is −2. (PEFT would elect − from the unweighted 3 − 4 and return 4 there.)
        assert_close(
            &entrywise("ties", 0.5, total, &[1.0, -1.0]),
            &m(2, 2, &[3.5, -2.0, 0.0, 5.0]),
            1e-6,
        );
    }

    #[test]
    fn magnitude_prune_and_dare_at_density_one() {
        assert_close(
            &entrywise("magnitude_prune", 0.5, None, &[1.0, 1.0]),
            &m(2, 2, &[-1.0, 2.0, 0.0, 5.0]),
            1e-6,
        );
        // DARE keeping everything is plain task arithmetic …
        let linear = m(2, 2, &[-1.0, 1.0, 3.0, 4.5]);
        assert_close(
            &entrywise("dare_linear", 1.0, None, &[1.0, 1.0]),
            &linear,
            1e-6,
        );
        // … and dare_ties is TIES without trimming: (0,0) −1 elects −4; (1,0) mean of 2 and 1.
        assert_close(
            &entrywise("dare_ties", 1.0, None, &[1.0, 1.0]),
            &m(2, 2, &[-4.0, 2.0, 1.5, 5.0]),
            1e-6,
        );
    }

    #[test]
    fn svd_variants_truncate_the_entrywise_merge() {
        let adapters = dense_adapters();
        let mut options = with("ties_svd");
        options.density = Some(0.5);
        options.rank = Some(1);
        let all: Vec<&LoraAdapter> = adapters.iter().collect();
        let out = run(&all, &[1.0; 3], &options).unwrap();
        // The TIES merge [[2, 2], [0, 4]]: MᵀM = [[4, 4], [4, 20]], λ² − 24λ + 64 = 0.
        let merged = m(2, 2, &[2.0, 2.0, 0.0, 4.0]);
        let error = ((12.0 - 80f64.sqrt()) / 24.0).sqrt();
        let report = &out.modules[0];
        assert_eq!(report.rank, 1);
        assert!((report.relative_error - error).abs() < 1e-6);
        let got = (delta(&out, "q") - &merged).norm() / merged.norm();
        assert!((got - error).abs() < 1e-6);
        // The plain sum is [[0, 1], [3, 7.5]]: pruning moved the result this far from it.
        let sum = m(2, 2, &[0.0, 1.0, 3.0, 7.5]);
        let change = (&merged - &sum).norm() / sum.norm();
        assert!((report.change_from_sum.unwrap() - change).abs() < 1e-12);
        // `ties` stores the same merge exactly, at rank 2.
        options.method = "ties".parse().unwrap();
        options.rank = None;
        let exact = run(&all, &[1.0; 3], &options).unwrap();
        assert_eq!(exact.modules[0].rank, 2);
        assert_close(&delta(&exact, "q"), &merged, 1e-6);
    }

    /// The other `_svd` forms: the hand-computed merges of `magnitude_prune_and_dare_at_density_one`
    /// truncated to rank 1, with the error from the 2×2 spectrum: σ₂² is the smaller root of
    /// λ² − ‖M‖²_F·λ + det(M)² = 0.
    #[test]
    fn other_svd_variants_truncate_their_hand_computed_merges() {
        for (method, density, merged) in [
            ("magnitude_prune_svd", 0.5, m(2, 2, &[-1.0, 2.0, 0.0, 5.0])),
            ("dare_linear_svd", 1.0, m(2, 2, &[-1.0, 1.0, 3.0, 4.5])),
            ("dare_ties_svd", 1.0, m(2, 2, &[-4.0, 2.0, 1.5, 5.0])),
        ] {
            let adapters = dense_adapters();
            let mut options = with(method);
            options.density = Some(density);
            options.rank = Some(1);
            let out = run(&[&adapters[0], &adapters[1]], &[1.0, 1.0], &options).unwrap();
            let total = merged.norm_squared();
            let det = merged[(0, 0)] * merged[(1, 1)] - merged[(0, 1)] * merged[(1, 0)];
            let smaller = (total - (total * total - 4.0 * det * det).sqrt()) / 2.0;
            let error = (smaller / total).sqrt();
            let report = &out.modules[0];
            assert_eq!(report.rank, 1, "{method}");
            assert!((report.relative_error - error).abs() < 1e-6, "{method}");
            let got = (delta(&out, "q") - &merged).norm() / merged.norm();
            assert!((got - error).abs() < 1e-6, "{method}: {got} vs {error}");
        }
    }

    #[test]
    fn dare_masks_are_seeded_and_rescale_the_survivors() {
        // One adapter with a 20×30 rank-2 update: every entry is dropped or doubled.
        let b = DMatrix::from_fn(20, 2, |r, c| 1.0 + (r * 2 + c) as f64 * 0.1);
        let a = DMatrix::from_fn(2, 30, |r, c| 0.5 + (r * 30 + c) as f64 * 0.01);
        let x = adapter(&[("q", b.clone(), a.clone(), 1.0)]);
        let full = &b * &a;
        let mut options = with("dare_linear");
        options.density = Some(0.5);
        options.seed = Some(3);
        let first = delta(&run(&[&x], &[1.0], &options).unwrap(), "q");
        let again = delta(&run(&[&x], &[1.0], &options).unwrap(), "q");
        assert_eq!(first, again);
        let mut kept = 0;
        for (got, value) in first.iter().zip(full.iter()) {
            // Dropped entries are 0 up to the f32 rounding of the stored factors.
            if got.abs() > 1e-3 {
                kept += 1;
                assert!(
                    (got - 2.0 * value).abs() < 1e-4 * value.abs(),
                    "{got} vs 2·{value}"
                );
            }
        }
        // Binomial(600, 0.5): standard deviation ≈ 12.
        assert!((kept as i64 - 300).abs() < 60, "kept {kept} of 600");
        options.seed = Some(4);
        assert_ne!(delta(&run(&[&x], &[1.0], &options).unwrap(), "q"), first);
    }

    fn pseudo_random(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        DMatrix::from_fn(rows, cols, |_, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2001) as f64 / 1000.0 - 1.0
        })
    }

    #[test]
    fn combined_adapters_add_the_weighted_deltas_across_ranks_and_target_sets() {
        // x adapts q and v at rank 2; y adapts v (rank 3) and o (rank 1), with other scales.
        let x = adapter(&[
            ("q", pseudo_random(6, 2, 1), pseudo_random(2, 5, 2), 2.0),
            ("v", pseudo_random(4, 2, 3), pseudo_random(2, 5, 4), 2.0),
        ]);
        let y = adapter(&[
            (
                "v",
                pseudo_random(4, 3, 5),
                pseudo_random(3, 5, 6),
                16.0 / 3f64.sqrt(),
            ),
            ("o", pseudo_random(5, 1, 7), pseudo_random(1, 6, 8), 0.5),
        ]);
        let weights = [0.7, -1.3];
        let update = |a: &LoraAdapter, name: &str| {
            Factored::from_module(&a.modules[name]).unwrap().to_dense()
        };
        let expected = [
            ("q", update(&x, "q") * 0.7),
            ("v", update(&x, "v") * 0.7 - update(&y, "v") * 1.3),
            ("o", update(&y, "o") * -1.3),
        ];
        let tmp = tempfile::tempdir().unwrap();
        for method in ["linear", "cat", "svd"] {
            let mut options = with(method);
            if method == "svd" {
                options.rank = Some(2);
            }
            let out = run(&[&x, &y], &weights, &options).unwrap();
            // Written and read back as a PEFT folder, the adapter makes the same updates.
            let dir = tmp.path().join(method);
            output::save_to_new_dir(&out.adapter, &dir).unwrap();
            let loaded = LoraAdapter::load_standalone(&dir, &Device::Cpu).unwrap();
            for (name, want) in &expected {
                let got = Factored::from_module(&loaded.modules[*name])
                    .unwrap()
                    .to_dense();
                let report = out.modules.iter().find(|r| r.name == *name).unwrap();
                let error = (&got - want).norm() / want.norm();
                if method == "svd" {
                    // v has rank 5 and is cut to 2; the printed error is the real one.
                    assert!(
                        (error - report.relative_error).abs() < 1e-6,
                        "{method} {name}: {error} vs {}",
                        report.relative_error
                    );
                } else {
                    assert!(
                        error < 1e-6 && report.relative_error < 1e-6,
                        "{method} {name}: {error}"
                    );
                }
            }
            let rank = |name: &str| out.modules.iter().find(|r| r.name == name).unwrap().rank;
            // v is 4×5: exactly rank 4 at most, though cat stacks 2 + 3 factors.
            let expected_v = match method {
                "svd" => 2,
                "linear" => 4,
                _ => 5,
            };
            assert_eq!(
                (rank("q"), rank("v"), rank("o")),
                (2, expected_v, 1),
                "{method}"
            );
            assert!(out.modules.iter().find(|r| r.name == "v").unwrap().inputs == 2);
        }
    }

    #[test]
    fn bad_parameters_and_inputs_are_named() {
        let (x, y, _) = hand_pair();
        let err = |options: &Options, weights: &[f64]| {
            run(&[&x, &y], weights, options).unwrap_err().to_string()
        };
        let ties = with("ties");
        assert!(err(&ties, &[1.0, 1.0]).contains("--density"));
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let mut o = with("dare_ties");
            o.density = Some(bad);
            let e = err(&o, &[1.0, 1.0]);
            assert!(e.contains("--density") && e.contains("(0, 1]"), "{e}");
        }
        let mut o = with("linear");
        o.density = Some(0.5);
        assert!(err(&o, &[1.0, 1.0]).contains("--density: not used by method linear"));
        let mut o = with("cat");
        o.rank = Some(2);
        assert!(err(&o, &[1.0, 1.0]).contains("--rank"));
        let mut o = with("svd");
        o.rank = Some(0);
        assert!(err(&o, &[1.0, 1.0]).contains("--rank: must be at least 1"));
        let mut o = with("magnitude_prune");
        o.density = Some(0.5);
        o.majority_sign = Some(MajoritySign::Total);
        assert!(err(&o, &[1.0, 1.0]).contains("--majority-sign"));
        let mut o = with("ties");
        o.density = Some(0.5);
        o.seed = Some(1);
        assert!(err(&o, &[1.0, 1.0]).contains("--seed"));
        let e = err(&with("linear"), &[1.0, f64::INFINITY]);
        assert!(e.contains("--weights") && e.contains("adapter1"), "{e}");

        let other = adapter(&[("q", pseudo_random(3, 1, 1), pseudo_random(1, 2, 2), 1.0)]);
        let e = run(&[&x, &other], &[1.0, 1.0], &with("linear"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"q\"") && e.contains("2×2 in adapter0") && e.contains("3×2 in adapter1"),
            "{e}"
        );

        let mut dora = x.clone();
        dora.config.variant = LoraVariant::Dora;
        let module = dora.modules.get_mut("q").unwrap();
        module.magnitude = Some(Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap());
        let e = run(&[&dora], &[1.0], &with("linear"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("adapter0") && e.contains("use_dora") && e.contains("--base"),
            "{e}"
        );
    }

    #[test]
    fn dora_inputs_combine_by_their_effective_update() {
        // W = [[3, 0], [0, 1]], s·BA = I, m = [2, 4]: ΔW = [[−1, 0], [0, 3]] (see dora.rs).
        let dev = Device::Cpu;
        let mut dora = adapter(&[(
            "q",
            m(2, 2, &[0.5, 0.0, 0.0, 0.5]),
            DMatrix::identity(2, 2),
            2.0,
        )]);
        dora.config.variant = LoraVariant::Dora;
        dora.modules.get_mut("q").unwrap().magnitude =
            Some(Tensor::new(&[2f32, 4.0], &dev).unwrap());
        let (x, _, _) = hand_pair();
        let base = |name: &str| -> Result<DMatrix<f64>> {
            assert_eq!(name, "q");
            Ok(m(2, 2, &[3.0, 0.0, 0.0, 1.0]))
        };
        let inputs = [
            Input {
                label: "dora".into(),
                adapter: &dora,
                weight: 0.5,
            },
            Input {
                label: "lora".into(),
                adapter: &x,
                weight: 1.0,
            },
        ];
        let out = combine(&inputs, &with("linear"), Some(&base)).unwrap();
        // 0.5·[[−1, 0], [0, 3]] + 2·[[3, −1], [6, −2]]
        assert_close(&delta(&out, "q"), &m(2, 2, &[5.5, -2.0, 12.0, -2.5]), 1e-6);
        assert!(out.adapter.modules["q"].magnitude.is_none());
    }
}
