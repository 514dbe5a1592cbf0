//! Adapters applied unmerged in a forward call, and how decoding finds their modules fast.
//!
//! Batch-1 decoding streams the whole model through the caches every token, so whatever it
//! touches besides the weights is cold each time. Two things about the adapters were costly
//! there and are done once per [`ActiveAdapter`] instead:
//! - finding a projection's module: a `BTreeMap<String, _>` lookup compares key strings, a
//!   chain of memory misses; a table by projection slot is one read;
//! - reaching a module's factors: each candle tensor is a lock, a shape and a stride on the
//!   heap, a few misses in a row for every A and every B; the factors copied into one plain
//!   buffer are slices.
//!
//! On the SmolLM-135M-shaped model the two took 0.9% of an unmerged token (`decode_pair`,
//! measured against the same path with its factors' tensors kept in cache).

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Tensor, TensorId};
use lowrank_core::lora::{LoraAdapter, LoraModule};
use lowrank_kernels::RowLora;

/// The module key suffixes of the seven linears of a layer, in `Layer::projs` order.
pub(crate) const PROJ_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The slot of module key `model.layers.{layer}.{suffix}`: 7 × layer + the suffix's place in
/// [`PROJ_NAMES`], as the model numbers its projections; `None` for a key that names no
/// decoder projection.
pub(crate) fn proj_slot(key: &str) -> Option<usize> {
    let (layer, suffix) = key.strip_prefix("model.layers.")?.split_once('.')?;
    // `usize::from_str` takes a leading '+', which no key written by `format!` has.
    if !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let k = PROJ_NAMES.iter().position(|&name| name == suffix)?;
    Some(7 * layer.parse::<usize>().ok()? + k)
}

/// An adapter applied in a forward call, with a multiplier on its ΔW (1.0 = as trained).
#[derive(Debug)]
pub struct ActiveAdapter<'a> {
    pub adapter: &'a LoraAdapter,
    pub weight: f64,
    /// The adapter's modules by projection slot, built on first use.
    by_slot: OnceLock<Vec<Option<&'a LoraModule>>>,
    /// Its plain-LoRA factors copied out for decoding, built on the first decoding step.
    packed: OnceLock<PackedFactors>,
}

impl<'a> ActiveAdapter<'a> {
    pub fn new(adapter: &'a LoraAdapter) -> Self {
        Self::weighted(adapter, 1.0)
    }

    /// `adapter` with its ΔW multiplied by `weight`.
    pub fn weighted(adapter: &'a LoraAdapter, weight: f64) -> Self {
        ActiveAdapter {
            adapter,
            weight,
            by_slot: OnceLock::new(),
            packed: OnceLock::new(),
        }
    }

    /// The adapter's module for the projection in `slot`, if it has one.
    pub(crate) fn module(&self, slot: usize) -> Option<&'a LoraModule> {
        self.modules_by_slot().get(slot).copied().flatten()
    }

    fn modules_by_slot(&self) -> &[Option<&'a LoraModule>] {
        self.by_slot.get_or_init(|| {
            let mut by_slot = Vec::new();
            for (name, module) in &self.adapter.modules {
                if let Some(slot) = proj_slot(name) {
                    if by_slot.len() <= slot {
                        by_slot.resize(slot + 1, None);
                    }
                    by_slot[slot] = Some(module);
                }
            }
            by_slot
        })
    }

    /// The first projection slot whose module has factors copied out for decoding (see
    /// [`Self::decode_lora`]), if any.
    pub(crate) fn first_decode_slot(&self) -> Option<usize> {
        self.packed().by_slot.iter().position(Option::is_some)
    }

    fn packed(&self) -> &PackedFactors {
        self.packed
            .get_or_init(|| PackedFactors::pack(self.modules_by_slot()))
    }

    /// The module in `slot` as plain slices for a one-row pass, when it is a plain LoRA
    /// module whose factors are frozen f32 CPU tensors. The first call copies every such
    /// module's factors into one buffer (as much memory again as those factors, for as long
    /// as this `ActiveAdapter` lives).
    pub(crate) fn decode_lora(&self, slot: usize) -> Option<RowLora<'_>> {
        let packed = self.packed();
        let span = packed.by_slot.get(slot).copied().flatten()?;
        Some(RowLora::Slices {
            a: &packed.data[span.a.0..span.a.0 + span.a.1],
            b: &packed.data[span.b.0..span.b.0 + span.b.1],
            scale: span.scale * self.weight,
        })
    }
}

/// (start, length) of a factor in [`PackedFactors::data`].
type Span = (usize, usize);

#[derive(Debug, Clone, Copy)]
struct ModuleSpans {
    a: Span,
    b: Span,
    scale: f64,
}

/// Plain-LoRA factors of an adapter in one buffer (on 2 MiB pages where the kernel allows),
/// by projection slot.
struct PackedFactors {
    data: Vec<f32>,
    by_slot: Vec<Option<ModuleSpans>>,
}

impl std::fmt::Debug for PackedFactors {
    // Not the values: millions of them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedFactors")
            .field("values", &self.data.len())
            .field("modules", &self.by_slot.iter().flatten().count())
            .finish()
    }
}

impl PackedFactors {
    /// Copies the factors of every module that qualifies; the others get no spans (and
    /// decoding takes their tensors). A tensor shared by several modules is copied once, so
    /// they keep sharing it.
    fn pack(modules: &[Option<&LoraModule>]) -> Self {
        let packable = |t: &Tensor| {
            t.device().is_cpu() && t.dtype() == DType::F32 && !t.is_variable() && !t.track_op()
        };
        let mut data = Vec::new();
        let mut copied: HashMap<TensorId, Span> = HashMap::new();
        let mut copy = |t: &Tensor, data: &mut Vec<f32>| -> Option<Span> {
            if let Some(&span) = copied.get(&t.id()) {
                return Some(span);
            }
            let values = t.flatten_all().ok()?.to_vec1::<f32>().ok()?;
            let span = (data.len(), values.len());
            data.extend_from_slice(&values);
            copied.insert(t.id(), span);
            Some(span)
        };
        let by_slot = modules
            .iter()
            .map(|m| {
                let m = (*m)?;
                if m.magnitude.is_some() || !packable(&m.a) || !packable(&m.b) {
                    return None;
                }
                Some(ModuleSpans {
                    a: copy(&m.a, &mut data)?,
                    b: copy(&m.b, &mut data)?,
                    scale: m.scale,
                })
            })
            .collect();
        lowrank_kernels::back_slice_with_huge_pages(&data);
        Self { data, by_slot }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use lowrank_core::lora::LoraConfig;
    use lowrank_core::targets::ModuleSelector;

    /// Every decoder projection's key maps to its own slot, 7 × layer + its place, the way
    /// the model numbers them; other keys map to none.
    #[test]
    fn module_keys_map_to_projection_slots() {
        let mut seen = std::collections::BTreeSet::new();
        for layer in [0, 1, 9, 10, 31] {
            for (k, name) in PROJ_NAMES.iter().enumerate() {
                let slot = proj_slot(&format!("model.layers.{layer}.{name}"));
                assert_eq!(slot, Some(7 * layer + k), "layer {layer}, {name}");
                assert!(seen.insert(slot), "slot {slot:?} given twice");
            }
        }
        for key in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.+1.self_attn.q_proj",
            "model.layers.x.mlp.up_proj",
            "model.layers.3",
            "model.layers..mlp.up_proj",
            "model.embed_tokens",
            "lm_head",
            "layers.0.self_attn.q_proj",
        ] {
            assert_eq!(proj_slot(key), None, "{key}");
        }
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 13 + seed * 7) % 29) as f32 - 14.0)
            .collect()
    }

    fn module(a: Tensor, b: Tensor, scale: f64) -> LoraModule {
        LoraModule {
            a,
            b,
            magnitude: None,
            scale,
        }
    }

    /// Decoding slices hold each module's own A and B with its scale times the adapter's
    /// weight; DoRA modules, trainable factors and keys that name no projection get none,
    /// and a tensor two modules share is copied once.
    #[test]
    fn decode_slices_are_the_modules_factors() {
        let dev = Device::Cpu;
        let t = |n: usize, shape: (usize, usize), seed| {
            Tensor::from_vec(values(n, seed), shape, &dev).unwrap()
        };
        let shared_a = t(2 * 3, (2, 3), 1);
        let mut modules = std::collections::BTreeMap::new();
        let q = module(shared_a.clone(), t(4 * 2, (4, 2), 2), 0.5);
        let v = module(shared_a.clone(), t(5 * 2, (5, 2), 3), 2.0);
        let mut dora = module(t(2 * 3, (2, 3), 4), t(4 * 2, (4, 2), 5), 1.0);
        dora.magnitude = Some(t(4, (4, 1), 6).flatten_all().unwrap());
        let trained = Var::from_tensor(&t(2 * 3, (2, 3), 7)).unwrap();
        let trainable = module(trained.as_tensor().clone(), t(4 * 2, (4, 2), 8), 1.0);
        modules.insert("model.layers.0.self_attn.q_proj".to_string(), q);
        modules.insert("model.layers.1.self_attn.v_proj".to_string(), v);
        modules.insert("model.layers.1.mlp.up_proj".to_string(), dora);
        modules.insert("model.layers.2.mlp.down_proj".to_string(), trainable);
        modules.insert(
            "lm_head".to_string(),
            module(t(6, (2, 3), 9), t(4, (2, 2), 10), 1.0),
        );
        let adapter = LoraAdapter {
            config: LoraConfig::new(2, 4.0, ModuleSelector::Names(vec!["q_proj".into()])),
            modules,
        };
        let active = ActiveAdapter::weighted(&adapter, 3.0);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (slot, name) in [
            (0, "model.layers.0.self_attn.q_proj"),
            (9, "model.layers.1.self_attn.v_proj"),
        ] {
            let m = &adapter.modules[name];
            let Some(RowLora::Slices { a, b, scale }) = active.decode_lora(slot) else {
                panic!("{name} has no decoding slices")
            };
            assert_eq!(a, flat(&m.a), "{name}");
            assert_eq!(b, flat(&m.b), "{name}");
            assert_eq!(scale, m.scale * 3.0, "{name}");
        }
        // up_proj of layer 1 (DoRA), down_proj of layer 2 (a Var), and slots with no module.
        for slot in [7 + 5, 14 + 6, 1, 100] {
            assert!(active.decode_lora(slot).is_none(), "slot {slot}");
        }
        let packed = active.packed.get().unwrap();
        // The shared A once, and the two B's.
        assert_eq!(packed.data.len(), 6 + 8 + 10);
    }
}
