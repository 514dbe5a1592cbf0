//! Adapters applied unmerged in a forward call, and their factors packed for inference.
//!
//! Decoding streams the whole model through the caches every step, so whatever it touches
//! besides the weights is cold each time. Two things about the adapters were costly there and
//! are done once per adapter instead:
//! - finding a projection's module: a `BTreeMap<String, _>` lookup compares key strings, a
//!   chain of memory misses; a table by projection slot is one read;
//! - reaching a module's factors: each candle tensor is a lock, a shape and a stride on the
//!   heap, a few misses in a row for every A and every B; the factors copied into one plain
//!   buffer ([`AdapterPack`]) are slices.
//!
//! The pack also
//! holds each DoRA module's column scale m/‖W + s·BA‖, which depends on the base weight only,
//! so a step never recomputes it. The model keeps the packs of the adapters its steps use
//! ([`AdapterPacks`]), so a server's tenants are packed once, not once per step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Tensor, TensorId};
use lowrank_core::lora::{LoraAdapter, LoraModule};
use lowrank_core::{BaseWeight, Error, Result};

/// The module key suffixes of the linears a decoder layer may have; a layer has q, k, v (or
/// the fused qkv), o, gate and up (or the fused gate_up) and down. A projection's kind is its
/// place here.
pub(crate) const PROJ_NAMES: [&str; 9] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    // Phi-3's fused projections: [q; k; v] and [gate; up] stacked by rows.
    "self_attn.qkv_proj",
    "mlp.gate_up_proj",
];

/// The kinds of projection (places in [`PROJ_NAMES`]).
pub(crate) mod kind {
    pub const Q: usize = 0;
    pub const K: usize = 1;
    pub const V: usize = 2;
    pub const O: usize = 3;
    pub const GATE: usize = 4;
    pub const UP: usize = 5;
    pub const DOWN: usize = 6;
    pub const QKV: usize = 7;
    pub const GATE_UP: usize = 8;
}

/// Projection slots per layer: a projection's slot is `SLOTS_PER_LAYER` × layer + its kind.
pub(crate) const SLOTS_PER_LAYER: usize = PROJ_NAMES.len();

/// The slot of module key `model.layers.{layer}.{suffix}`: [`SLOTS_PER_LAYER`] × layer + the suffix's place in
/// [`PROJ_NAMES`], as the model numbers its projections; `None` for a key that names no
/// decoder projection.
pub(crate) fn proj_slot(key: &str) -> Option<usize> {
    let (layer, suffix) = key.strip_prefix("model.layers.")?.split_once('.')?;
    // `usize::from_str` takes a leading '+', which no key written by `format!` has.
    if !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let k = PROJ_NAMES.iter().position(|&name| name == suffix)?;
    Some(SLOTS_PER_LAYER * layer.parse::<usize>().ok()? + k)
}

/// An adapter applied in a forward call, with a coefficient on its ΔW (1.0 = as trained).
#[derive(Debug)]
pub struct ActiveAdapter<'a> {
    pub adapter: &'a LoraAdapter,
    pub coefficient: f64,
    /// The adapter's modules by projection slot, built on first use.
    by_slot: OnceLock<Vec<Option<&'a LoraModule>>>,
    /// Its pack and the generation of the model's pack cache it came from, kept so that a
    /// generation's steps skip the cache's lookup.
    pack: Mutex<Option<(u64, Arc<AdapterPack>)>>,
}

impl<'a> ActiveAdapter<'a> {
    pub fn new(adapter: &'a LoraAdapter) -> Self {
        Self::with_coefficient(adapter, 1.0)
    }

    /// `adapter` with its ΔW multiplied by `coefficient`.
    pub fn with_coefficient(adapter: &'a LoraAdapter, coefficient: f64) -> Self {
        ActiveAdapter {
            adapter,
            coefficient,
            by_slot: OnceLock::new(),
            pack: Mutex::new(None),
        }
    }

    /// The adapter's module for the projection in `slot`, if it has one.
    pub(crate) fn module(&self, slot: usize) -> Option<&'a LoraModule> {
        self.modules_by_slot().get(slot).copied().flatten()
    }

    fn modules_by_slot(&self) -> &[Option<&'a LoraModule>] {
        self.by_slot.get_or_init(|| modules_by_slot(self.adapter))
    }

    /// This adapter's pack from `packs`, remembered for the next step; `None` when its factors
    /// cannot be packed (see [`AdapterPacks::get`]).
    pub(crate) fn pack<'m>(
        &self,
        packs: &AdapterPacks,
        base: &dyn Fn(usize) -> Option<&'m BaseWeight>,
    ) -> Result<Option<Arc<AdapterPack>>> {
        let mut kept = self.pack.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((generation, pack)) = kept.as_ref() {
            if *generation == packs.generation {
                return Ok(Some(pack.clone()));
            }
        }
        let pack = packs.get(self.adapter, base)?;
        *kept = pack.clone().map(|p| (packs.generation, p));
        Ok(pack)
    }
}

/// An adapter's modules by projection slot (keys that name no projection left out).
fn modules_by_slot(adapter: &LoraAdapter) -> Vec<Option<&LoraModule>> {
    let mut by_slot = Vec::new();
    for (name, module) in &adapter.modules {
        if let Some(slot) = proj_slot(name) {
            if by_slot.len() <= slot {
                by_slot.resize(slot + 1, None);
            }
            by_slot[slot] = Some(module);
        }
    }
    by_slot
}

/// (start, length) of a factor in [`AdapterPack`]'s buffer.
type Span = (usize, usize);

#[derive(Debug, Clone, Copy)]
struct ModuleSpans {
    a: Span,
    b: Span,
    scale: f64,
    /// DoRA's m/‖W + s·BA‖ per output.
    column_scale: Option<Span>,
}

/// One module of a pack as slices: A (r × in), B (out × r), the scale and DoRA's column scale.
#[derive(Clone, Copy)]
pub(crate) struct PackedModule<'p> {
    pub a: &'p [f32],
    pub b: &'p [f32],
    pub scale: f64,
    pub column_scale: Option<&'p [f32]>,
}

/// An adapter's factors (and DoRA column scales) in one buffer, on 2 MiB pages where the
/// kernel allows, by projection slot.
pub(crate) struct AdapterPack {
    data: Vec<f32>,
    by_slot: Vec<Option<ModuleSpans>>,
}

impl std::fmt::Debug for AdapterPack {
    // Not the values: millions of them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterPack")
            .field("values", &self.data.len())
            .field("modules", &self.by_slot.iter().flatten().count())
            .finish()
    }
}

impl AdapterPack {
    /// Copies every module's factors, and computes each DoRA module's column scale against
    /// `base(slot)`, the base weight of the projection. `None` when a factor cannot be packed
    /// (trained, off the CPU or not f32): those adapters take the candle layer loop. A tensor
    /// shared by several modules is copied once, so they keep sharing it.
    fn build<'m>(
        adapter: &LoraAdapter,
        base: &dyn Fn(usize) -> Option<&'m BaseWeight>,
    ) -> Result<Option<Self>> {
        let packable = |t: &Tensor| {
            t.device().is_cpu() && t.dtype() == DType::F32 && !t.is_variable() && !t.track_op()
        };
        let modules = modules_by_slot(adapter);
        let fits = modules
            .iter()
            .flatten()
            .all(|m| packable(&m.a) && packable(&m.b) && m.magnitude.as_ref().is_none_or(packable));
        if !fits {
            return Ok(None);
        }
        let mut data = Vec::new();
        let mut copied: HashMap<TensorId, Span> = HashMap::new();
        let mut copy = |t: &Tensor, data: &mut Vec<f32>| -> Result<Span> {
            if let Some(&span) = copied.get(&t.id()) {
                return Ok(span);
            }
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            let span = (data.len(), values.len());
            data.extend_from_slice(&values);
            copied.insert(t.id(), span);
            Ok(span)
        };
        let mut by_slot = Vec::with_capacity(modules.len());
        for (slot, m) in modules.iter().enumerate() {
            let Some(m) = m else {
                by_slot.push(None);
                continue;
            };
            let column_scale = match &m.magnitude {
                Some(magnitude) => {
                    let base = base(slot).ok_or_else(|| {
                        Error::Msg(format!("a DoRA module of slot {slot} has no base weight"))
                    })?;
                    let norm = base.row_norm(&m.delta_weight()?)?;
                    let values = (magnitude.flatten_all()? / norm)?.to_vec1::<f32>()?;
                    let span = (data.len(), values.len());
                    data.extend_from_slice(&values);
                    Some(span)
                }
                None => None,
            };
            by_slot.push(Some(ModuleSpans {
                a: copy(&m.a, &mut data)?,
                b: copy(&m.b, &mut data)?,
                scale: m.scale,
                column_scale,
            }));
        }
        lowrank_kernels::back_slices_with_huge_pages(&[&data]);
        Ok(Some(AdapterPack { data, by_slot }))
    }

    /// The module in `slot`, if the adapter has one.
    pub fn module(&self, slot: usize) -> Option<PackedModule<'_>> {
        let spans = self.by_slot.get(slot).copied().flatten()?;
        let at = |(start, len): Span| &self.data[start..start + len];
        Some(PackedModule {
            a: at(spans.a),
            b: at(spans.b),
            scale: spans.scale,
            column_scale: spans.column_scale.map(at),
        })
    }

    /// Whether any module is DoRA (such an adapter is applied alone and at weight 1).
    pub fn has_dora(&self) -> bool {
        self.by_slot
            .iter()
            .flatten()
            .any(|m| m.column_scale.is_some())
    }

    /// Whether any module is plain LoRA.
    pub fn has_lora(&self) -> bool {
        self.by_slot
            .iter()
            .flatten()
            .any(|m| m.column_scale.is_none())
    }
}

/// What identifies an adapter's factors: per module, its slot, the ids of its tensors (candle
/// never reuses one) and its scale.
type PackKey = Vec<(usize, TensorId, TensorId, Option<TensorId>, u64)>;

/// Steps an unused pack is kept for.
const UNUSED_STEPS: u64 = 64;

/// A model's packs of the adapters its steps apply, by their factors' identity. Packs unused
/// for [`UNUSED_STEPS`] steps are dropped; all are dropped when the model's weights change (DoRA
/// scales depend on them).
pub(crate) struct AdapterPacks {
    /// Unique to this cache and its contents: a new one after every clear.
    generation: u64,
    step: AtomicU64,
    entries: Mutex<HashMap<PackKey, (Arc<AdapterPack>, u64)>>,
}

/// The source of [`AdapterPacks`] generations.
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

impl Default for AdapterPacks {
    fn default() -> Self {
        AdapterPacks {
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            step: AtomicU64::new(0),
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl Clone for AdapterPacks {
    // A copy of the model may change its weights: it packs anew.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for AdapterPacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map_or(0, |e| e.len());
        f.debug_struct("AdapterPacks").field("packs", &n).finish()
    }
}

impl AdapterPacks {
    /// `adapter`'s pack, built on first use; `None` when its factors cannot be packed.
    pub fn get<'m>(
        &self,
        adapter: &LoraAdapter,
        base: &dyn Fn(usize) -> Option<&'m BaseWeight>,
    ) -> Result<Option<Arc<AdapterPack>>> {
        let key: PackKey = adapter
            .modules
            .iter()
            .filter_map(|(name, m)| {
                Some((
                    proj_slot(name)?,
                    m.a.id(),
                    m.b.id(),
                    m.magnitude.as_ref().map(Tensor::id),
                    m.scale.to_bits(),
                ))
            })
            .collect();
        let step = self.step.load(Ordering::Relaxed);
        if let Some(entry) = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&key)
        {
            entry.1 = step;
            return Ok(Some(entry.0.clone()));
        }
        let Some(pack) = AdapterPack::build(adapter, base)? else {
            return Ok(None);
        };
        let pack = Arc::new(pack);
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (pack.clone(), step));
        Ok(Some(pack))
    }

    /// Counts a step and drops the packs no step has used for [`UNUSED_STEPS`] steps.
    pub fn next_step(&self) {
        let step = self.step.fetch_add(1, Ordering::Relaxed) + 1;
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (_, used)| *used + UNUSED_STEPS >= step);
    }

    /// Drops every pack (the model's weights changed).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use lowrank_core::lora::LoraConfig;
    use lowrank_core::targets::ModuleSelector;

    /// Every decoder projection's key maps to its own slot, 9 × layer + its place, the way
    /// the model numbers them; other keys map to none.
    #[test]
    fn module_keys_map_to_projection_slots() {
        let mut seen = std::collections::BTreeSet::new();
        for layer in [0, 1, 9, 10, 31] {
            for (k, name) in PROJ_NAMES.iter().enumerate() {
                let slot = proj_slot(&format!("model.layers.{layer}.{name}"));
                assert_eq!(slot, Some(9 * layer + k), "layer {layer}, {name}");
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

    /// A pack holds each module's own A and B with its scale, and a DoRA module's column
    /// scale m/‖W + s·BA‖ against its projection's base; a tensor two modules share is copied
    /// once; an adapter with a trainable factor is not packed.
    #[test]
    fn packs_hold_the_modules_factors() {
        let dev = Device::Cpu;
        let t = |n: usize, shape: (usize, usize), seed| {
            Tensor::from_vec(values(n, seed), shape, &dev).unwrap()
        };
        let shared_a = t(2 * 3, (2, 3), 1);
        let mut modules = std::collections::BTreeMap::new();
        let q = module(shared_a.clone(), t(4 * 2, (4, 2), 2), 0.5);
        let v = module(shared_a.clone(), t(5 * 2, (5, 2), 3), 2.0);
        let mut dora = module(t(2 * 3, (2, 3), 4), t(4 * 2, (4, 2), 5), 1.5);
        dora.magnitude = Some(t(4, (4, 1), 6).flatten_all().unwrap().abs().unwrap());
        modules.insert("model.layers.0.self_attn.q_proj".to_string(), q);
        modules.insert("model.layers.1.self_attn.v_proj".to_string(), v);
        modules.insert("model.layers.1.mlp.up_proj".to_string(), dora.clone());
        let mut adapter = LoraAdapter {
            config: LoraConfig::new(2, 4.0, ModuleSelector::Names(vec!["q_proj".into()])),
            modules,
        };
        let up_base = BaseWeight::Dense(t(4 * 3, (4, 3), 7));
        let base = |slot: usize| (slot == SLOTS_PER_LAYER + kind::UP).then_some(&up_base);
        let pack = AdapterPack::build(&adapter, &base).unwrap().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (slot, name) in [
            (0, "model.layers.0.self_attn.q_proj"),
            (SLOTS_PER_LAYER + kind::V, "model.layers.1.self_attn.v_proj"),
            (SLOTS_PER_LAYER + kind::UP, "model.layers.1.mlp.up_proj"),
        ] {
            let m = &adapter.modules[name];
            let packed = pack.module(slot).unwrap();
            assert_eq!(packed.a, flat(&m.a), "{name}");
            assert_eq!(packed.b, flat(&m.b), "{name}");
            assert_eq!(packed.scale, m.scale, "{name}");
        }
        // ‖W + 1.5·B·A‖ per row, in f64.
        let (w, a, b) = (
            flat(up_base.as_dense().unwrap()),
            flat(&dora.a),
            flat(&dora.b),
        );
        let magnitude = flat(dora.magnitude.as_ref().unwrap());
        let column_scale = pack
            .module(SLOTS_PER_LAYER + kind::UP)
            .unwrap()
            .column_scale
            .unwrap();
        for o in 0..4 {
            let norm = (0..3)
                .map(|k| {
                    let delta: f64 = (0..2)
                        .map(|j| b[o * 2 + j] as f64 * a[j * 3 + k] as f64)
                        .sum();
                    (w[o * 3 + k] as f64 + 1.5 * delta).powi(2)
                })
                .sum::<f64>()
                .sqrt();
            let want = magnitude[o] as f64 / norm;
            assert!(
                (column_scale[o] as f64 - want).abs() < 1e-5 * want.abs(),
                "row {o}"
            );
        }
        assert!(pack.module(0).unwrap().column_scale.is_none());
        assert!(pack.has_dora() && pack.has_lora());
        for slot in [1, 100] {
            assert!(pack.module(slot).is_none(), "slot {slot}");
        }
        // The shared A once, the two B's, the DoRA module's A, B and column scale.
        assert_eq!(pack.data.len(), 6 + 8 + 10 + 6 + 8 + 4);
        let trained = Var::from_tensor(&t(2 * 3, (2, 3), 8)).unwrap();
        adapter.modules.insert(
            "model.layers.2.mlp.down_proj".to_string(),
            module(trained.as_tensor().clone(), t(4 * 2, (4, 2), 9), 1.0),
        );
        assert!(AdapterPack::build(&adapter, &base).unwrap().is_none());
    }

    /// The model's cache gives the same pack for the same factors until it is cleared, and a
    /// new one for other factors; unused packs leave after their steps.
    #[test]
    fn the_cache_keeps_packs_by_their_factors() {
        let dev = Device::Cpu;
        let adapter = |seed| {
            let mut modules = std::collections::BTreeMap::new();
            let a = Tensor::from_vec(values(6, seed), (2, 3), &dev).unwrap();
            let b = Tensor::from_vec(values(8, seed + 1), (4, 2), &dev).unwrap();
            modules.insert(
                "model.layers.0.self_attn.q_proj".to_string(),
                module(a, b, 1.0),
            );
            LoraAdapter {
                config: LoraConfig::new(2, 2.0, ModuleSelector::Names(vec!["q_proj".into()])),
                modules,
            }
        };
        let (one, two) = (adapter(1), adapter(2));
        let none = |_: usize| -> Option<&BaseWeight> { None };
        let mut packs = AdapterPacks::default();
        let first = packs.get(&one, &none).unwrap().unwrap();
        assert!(Arc::ptr_eq(
            &first,
            &packs.get(&one.clone(), &none).unwrap().unwrap()
        ));
        assert!(!Arc::ptr_eq(
            &first,
            &packs.get(&two, &none).unwrap().unwrap()
        ));
        for _ in 0..=UNUSED_STEPS {
            packs.next_step();
        }
        assert!(packs.entries.lock().unwrap().is_empty());
        let again = packs.get(&one, &none).unwrap().unwrap();
        packs.clear();
        assert!(!Arc::ptr_eq(
            &again,
            &packs.get(&one, &none).unwrap().unwrap()
        ));
    }
}
