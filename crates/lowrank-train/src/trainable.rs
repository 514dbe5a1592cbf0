//! What a run trains: named `Var`s (every weight, or an adapter's tensors) and the adapter
//! they make, set up fresh (PEFT's initialisations) or from `--init-adapter`.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use lowrank_core::lora::{LoraAdapter, LoraConfig, LoraModule, LoraVariant, PEFT_PREFIX};
use lowrank_core::{Error, Result};
use lowrank_models::Llama;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::adalora::{self, AdaloraTraining};
use crate::options::{bad, parse_targets};
use crate::{Init, Method, TrainOptions};

/// PiSSA/OLoRA: each module's initial (A₀, B₀).
pub type InitialFactors = BTreeMap<String, (Tensor, Tensor)>;

/// What is being trained: named `Var`s, and for LoRA/DoRA the adapter built from them.
pub struct Trainable {
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    /// Weight decay applies (not to norms and biases of a full fine-tune).
    pub decay: Vec<bool>,
    /// The adapter whose tensors are the `Var`s (None for `full`).
    pub adapter: Option<LoraAdapter>,
    /// PiSSA/OLoRA: each module's initial (A₀, B₀), subtracted when saving a plain LoRA adapter.
    pub initial: Option<InitialFactors>,
    /// `--method adalora`: the A/E/B bookkeeping, regularizer and rank allocator.
    pub adalora: Option<AdaloraTraining>,
}

impl Trainable {
    /// Rebuilds `adapter` from the `Var`s where it is a product of them (AdaLoRA's a = A ⊙ E):
    /// call after every update.
    pub fn refresh(&mut self) -> Result<()> {
        if let Some(ada) = &self.adalora {
            self.adapter = Some(ada.forward_adapter(&self.vars)?);
        }
        Ok(())
    }

    pub fn num_parameters(&self) -> usize {
        self.vars.iter().map(|v| v.as_tensor().elem_count()).sum()
    }

    /// The adapter to save, usable with the original base: for PiSSA/OLoRA converted as PEFT's
    /// `path_initial_model_for_weight_conversion` does (ΔW = BA − B₀A₀ as a rank-2r LoRA with
    /// A' = [A; A₀], B' = [B, −B₀], α doubled, or ×√2 with rsLoRA).
    pub fn export_adapter(&self) -> Result<Option<LoraAdapter>> {
        let Some(adapter) = &self.adapter else {
            return Ok(None);
        };
        let mut out = LoraAdapter {
            config: adapter.config.clone(),
            modules: BTreeMap::new(),
        };
        for (name, m) in &adapter.modules {
            let (a, b) = (m.a.detach().copy()?, m.b.detach().copy()?);
            let (a, b) = match self.initial.as_ref().and_then(|i| i.get(name)) {
                Some((a0, b0)) => (
                    Tensor::cat(&[&a, a0], 0)?,
                    Tensor::cat(&[&b, &b0.neg()?], 1)?,
                ),
                None => (a, b),
            };
            let magnitude = m
                .magnitude
                .as_ref()
                .map(|t| t.detach().copy())
                .transpose()?;
            out.modules.insert(
                name.clone(),
                LoraModule {
                    a,
                    b,
                    magnitude,
                    scale: m.scale,
                },
            );
        }
        if self.initial.is_some() {
            let c = &mut out.config;
            c.rank *= 2;
            c.alpha *= if c.use_rslora { 2f64.sqrt() } else { 2.0 };
        }
        Ok(Some(out))
    }
}

/// Wraps a tensor as a trainable `Var` (a copy).
fn var(t: &Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
}

/// Sets up the trainable tensors: every weight for `full`, else a new adapter (or
/// `--init-adapter`) whose tensors are `Var`s; PiSSA/OLoRA rewrite the base weights.
pub fn setup_trainable(model: &mut Llama, o: &TrainOptions) -> Result<Trainable> {
    if o.method == Method::Full {
        let named = model.make_trainable()?;
        let decay = named
            .iter()
            .map(|(n, _)| !(n.contains("norm") || n.ends_with(".bias")))
            .collect();
        let (names, vars) = named.into_iter().unzip();
        return Ok(Trainable {
            names,
            vars,
            decay,
            adapter: None,
            initial: None,
            adalora: None,
        });
    }
    if o.method == Method::Adalora {
        let (names, vars, training) = adalora::setup_trainable(model, o)?;
        let adapter = training.forward_adapter(&vars)?;
        let decay = vec![true; vars.len()];
        return Ok(Trainable {
            names,
            vars,
            decay,
            adapter: Some(adapter),
            initial: None,
            adalora: Some(training),
        });
    }
    let (config, modules, initial) = match &o.init_adapter {
        Some(dir) => {
            let want = variant_of(o.method);
            let adapter = model.load_adapter(dir)?;
            if adapter.config.variant != want {
                return Err(Error::file(
                    dir,
                    format!(
                        "the adapter is {} but --method is {}",
                        if adapter.config.variant == LoraVariant::Dora {
                            "DoRA"
                        } else {
                            "LoRA"
                        },
                        o.method
                    ),
                ));
            }
            (adapter.config, adapter.modules, None)
        }
        None => new_modules(model, o)?,
    };
    lora_trainable(config, modules, initial)
}

/// The LoRA variant `--method` trains.
fn variant_of(method: Method) -> LoraVariant {
    if method == Method::Dora {
        LoraVariant::Dora
    } else {
        LoraVariant::Lora
    }
}

/// Each module's initial A's and B's (PiSSA/OLoRA: the base weights rewritten, and (A₀, B₀)
/// kept for saving): a fresh adapter as `--init` says.
fn new_modules(
    model: &mut Llama,
    o: &TrainOptions,
) -> Result<(
    LoraConfig,
    BTreeMap<String, LoraModule>,
    Option<InitialFactors>,
)> {
    let mut config = LoraConfig::new(o.rank, o.alpha, parse_targets(&o.targets)?);
    config.variant = variant_of(o.method);
    config.use_rslora = o.rslora;
    config.dropout = o.dropout;
    config.base_model = Some(o.model.clone());
    let mut rng = StdRng::seed_from_u64(o.seed);
    let mut modules = BTreeMap::new();
    let mut initial = BTreeMap::new();
    for linear in model.linears() {
        if !config.targets_module(&linear.name) {
            continue;
        }
        let lin = model.linear(&linear.name).expect("listed");
        if lin.is_quantized() && matches!(o.init, Init::Pissa | Init::Olora) {
            return Err(bad(
                "init",
                format!(
                    "{} rewrites the base weights; it needs a dense base, not a 4-bit one",
                    o.init
                ),
            ));
        }
        // A 4-bit base: this one layer dequantized for the initialisation only (DoRA's
        // magnitude ‖W‖ is taken over the dequantized weight, as PEFT does).
        let weight = lin.base().to_dense(model.device())?;
        let scale = config.scale_for(&linear.name);
        let init = crate::init::init_module(
            o.init,
            &weight,
            config.rank_for(&linear.name),
            scale,
            o.method == Method::Dora,
            &mut rng,
        )
        .map_err(|e| Error::Msg(format!("{}: {e}", linear.name)))?;
        if let Some(residual) = init.residual {
            model
                .linear_mut(&linear.name)
                .expect("listed")
                .set_weight(residual)?;
            initial.insert(
                linear.name.clone(),
                (init.module.a.clone(), init.module.b.clone()),
            );
        }
        modules.insert(linear.name.clone(), init.module);
    }
    if modules.is_empty() {
        return Err(bad(
            "targets",
            format!(
                "{:?} matches no linear layer of the model (e.g. model.layers.0.self_attn.q_proj)",
                o.targets
            ),
        ));
    }
    let initial = (!initial.is_empty()).then_some(initial);
    Ok((config, modules, initial))
}

/// The adapter's tensors as `Var`s, named as PEFT names them.
fn lora_trainable(
    config: LoraConfig,
    modules: BTreeMap<String, LoraModule>,
    initial: Option<InitialFactors>,
) -> Result<Trainable> {
    let (mut names, mut vars) = (Vec::new(), Vec::new());
    let mut trainable_modules = BTreeMap::new();
    for (name, m) in modules {
        let a = var(&m.a)?;
        let b = var(&m.b)?;
        names.push(format!("{PEFT_PREFIX}{name}.lora_A.weight"));
        vars.push(a.clone());
        names.push(format!("{PEFT_PREFIX}{name}.lora_B.weight"));
        vars.push(b.clone());
        let magnitude = match &m.magnitude {
            Some(mag) => {
                let v = var(mag)?;
                names.push(format!("{PEFT_PREFIX}{name}.lora_magnitude_vector"));
                vars.push(v.clone());
                Some(v.as_tensor().clone())
            }
            None => None,
        };
        trainable_modules.insert(
            name,
            LoraModule {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                magnitude,
                scale: m.scale,
            },
        );
    }
    let decay = vec![true; vars.len()];
    Ok(Trainable {
        names,
        vars,
        decay,
        adapter: Some(LoraAdapter {
            config,
            modules: trainable_modules,
        }),
        initial,
        adalora: None,
    })
}
