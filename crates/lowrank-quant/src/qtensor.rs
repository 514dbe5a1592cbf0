//! [`Quantized4Bit`]: a frozen weight kept packed (4 bits a value + its absmax state), and its
//! bitsandbytes / transformers tensors.
//!
//! transformers saves a `Linear4bit` weight `<m>.weight` as (`QuantState.as_dict(packed=True)`):
//! - `<m>.weight`: uint8 `[ceil(n/2), 1]`, the packed codes;
//! - `<m>.weight.absmax`: f32 `[blocks]`, or with double quant uint8 `[blocks]` (8-bit codes);
//! - `<m>.weight.quant_map`: f32 `[16]`, the 4-bit table in code order;
//! - with double quant `<m>.weight.nested_absmax`: f32 `[ceil(blocks/256)]` and
//!   `<m>.weight.nested_quant_map`: f32 `[256]`, the dynamic map;
//! - `<m>.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): uint8 bytes of the JSON
//!   `{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [16, 32]}` plus, with
//!   double quant, `"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.78…`
//!   (Python `json.dumps`: `", "` / `": "` separators, floats in `repr` form).

use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use crate::blockwise::{
    self, code_at, double_quantize, num_blocks, restore_absmax, validate_block_size,
    NESTED_BLOCK_SIZE,
};
use crate::codebook::{dynamic_map, QuantType};
use crate::error::{Error, Result};

/// The per-block scales of a 4-bit weight.
#[derive(Debug, Clone, PartialEq)]
pub enum AbsmaxState {
    /// One f32 per block (32 bits per block).
    Plain(Vec<f32>),
    /// Double quantization: one 8-bit code per block, one f32 per `nested_block_size` codes,
    /// and the mean that was subtracted.
    Double {
        codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        offset: f32,
        nested_block_size: usize,
        /// The 8-bit map (shared with every weight when it is bitsandbytes' standard one).
        nested_map: Arc<[f32; 256]>,
    },
}

/// [`AbsmaxState::restore_range`]'s restore of double-quantized absmax, sixteen blocks at a time: the codes
/// widened, their values looked up in the 256-entry map by permutes (a gather was slower on
/// Zen 5), then the same multiply and add (not fused, so the values are the scalar loop's, bit
/// for bit). Appends to `out` and returns the codes it took, a multiple of sixteen.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn restore_avx512(
    codes: &[u8],
    map: &[f32; 256],
    (scale, offset): (f32, f32),
    out: &mut Vec<f32>,
) -> usize {
    use std::arch::x86_64::*;
    let whole = codes.len() / 16 * 16;
    out.reserve(whole);
    let (s, o) = (_mm512_set1_ps(scale), _mm512_set1_ps(offset));
    let to = out.spare_capacity_mut().as_mut_ptr().cast::<f32>();
    let table: [__m512; 16] = std::array::from_fn(|t| _mm512_loadu_ps(map.as_ptr().add(16 * t)));
    for i in (0..whole).step_by(16) {
        let index = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(i).cast()));
        // The map held in sixteen registers: each pair looked up by the index's low five bits,
        // then the pairs chosen by bits 5, 6 and 7.
        let pairs: [__m512; 8] =
            std::array::from_fn(|p| _mm512_permutex2var_ps(table[2 * p], index, table[2 * p + 1]));
        let bit = |b: i32| _mm512_test_epi32_mask(index, _mm512_set1_epi32(1 << b));
        let (b5, b6, b7) = (bit(5), bit(6), bit(7));
        let quads: [__m512; 4] =
            std::array::from_fn(|q| _mm512_mask_blend_ps(b5, pairs[2 * q], pairs[2 * q + 1]));
        let halves: [__m512; 2] =
            std::array::from_fn(|h| _mm512_mask_blend_ps(b6, quads[2 * h], quads[2 * h + 1]));
        let values = _mm512_mask_blend_ps(b7, halves[0], halves[1]);
        _mm512_storeu_ps(to.add(i), _mm512_add_ps(_mm512_mul_ps(values, s), o));
    }
    // SAFETY: the loop wrote `whole` values past the old length, inside the reserved room.
    out.set_len(out.len() + whole);
    whole
}

/// The standard dynamic map, shared.
fn shared_dynamic_map() -> Arc<[f32; 256]> {
    static MAP: OnceLock<Arc<[f32; 256]>> = OnceLock::new();
    MAP.get_or_init(|| Arc::new(*dynamic_map())).clone()
}

impl AbsmaxState {
    pub fn num_blocks(&self) -> usize {
        match self {
            AbsmaxState::Plain(a) => a.len(),
            AbsmaxState::Double { codes, .. } => codes.len(),
        }
    }

    /// The absmax of one block (restored on the fly with double quant).
    #[inline]
    pub fn get(&self, block: usize) -> f32 {
        match self {
            AbsmaxState::Plain(a) => a[block],
            AbsmaxState::Double {
                codes,
                nested_absmax,
                offset,
                nested_block_size,
                nested_map,
            } => restore_absmax(
                nested_map,
                codes,
                nested_absmax,
                *nested_block_size,
                *offset,
                block,
            ),
        }
    }

    /// All absmax values as f32 (what bitsandbytes passes to its dequantize kernel).
    pub fn restore(&self) -> Vec<f32> {
        self.restore_range(0..self.num_blocks())
    }

    /// The absmax of blocks `blocks` (the values of [`AbsmaxState::get`] bit for bit),
    /// restored in one loop: without a division per block, and with AVX-512 sixteen blocks at
    /// a time.
    pub fn restore_range(&self, blocks: std::ops::Range<usize>) -> Vec<f32> {
        match self {
            AbsmaxState::Plain(a) => a[blocks].to_vec(),
            AbsmaxState::Double {
                codes,
                nested_absmax,
                offset,
                nested_block_size,
                nested_map,
            } => {
                let mut out = Vec::with_capacity(blocks.len());
                let mut b = blocks.start;
                while b < blocks.end {
                    let nested = b / nested_block_size;
                    let end = ((nested + 1) * nested_block_size).min(blocks.end);
                    let scale = nested_absmax[nested];
                    let mut from = b;
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU has AVX-512F.
                        from += unsafe {
                            restore_avx512(&codes[b..end], nested_map, (scale, *offset), &mut out)
                        };
                    }
                    out.extend(
                        codes[from..end]
                            .iter()
                            .map(|&c| nested_map[c as usize] * scale + offset),
                    );
                    b = end;
                }
                out
            }
        }
    }

    /// Bytes held (maps excluded: they are shared tables).
    pub fn bytes(&self) -> usize {
        match self {
            AbsmaxState::Plain(a) => a.len() * 4,
            AbsmaxState::Double {
                codes,
                nested_absmax,
                ..
            } => codes.len() + nested_absmax.len() * 4 + 4,
        }
    }
}

/// A weight quantized to 4 bits, kept packed. `shape` is the original shape (out × in for a
/// linear layer); values are the row-major flattening.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4Bit {
    shape: Vec<usize>,
    kind: QuantType,
    block_size: usize,
    packed: Vec<u8>,
    absmax: AbsmaxState,
    /// The 4-bit table in code order (the `quant_map` tensor).
    code: Arc<[f32; 16]>,
    /// The dtype name recorded in `quant_state` (`float32`, `bfloat16`, `float16`).
    dtype: String,
}

impl Quantized4Bit {
    /// Quantize a row-major f32 weight of `shape`.
    pub fn quantize(
        data: &[f32],
        shape: &[usize],
        kind: QuantType,
        block_size: usize,
        double_quant: bool,
    ) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::tensor(
                "weight",
                format!("shape {shape:?} has {n} values, data has {}", data.len()),
            ));
        }
        let (packed, absmax) = blockwise::quantize_4bit(data, block_size, kind)?;
        let absmax = if double_quant {
            let dq = double_quantize(&absmax);
            AbsmaxState::Double {
                codes: dq.codes,
                nested_absmax: dq.nested_absmax,
                offset: dq.offset,
                nested_block_size: NESTED_BLOCK_SIZE,
                nested_map: shared_dynamic_map(),
            }
        } else {
            AbsmaxState::Plain(absmax)
        };
        Ok(Quantized4Bit {
            shape: shape.to_vec(),
            kind,
            block_size,
            packed,
            absmax,
            code: Arc::new(*kind.table()),
            dtype: "float32".into(),
        })
    }

    /// Quantize a candle tensor (any float dtype; computed in f32).
    pub fn from_tensor(
        w: &candle_core::Tensor,
        kind: QuantType,
        block_size: usize,
        double_quant: bool,
    ) -> Result<Self> {
        let data = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut q = Self::quantize(&data, w.dims(), kind, block_size, double_quant)?;
        q.dtype = dtype_name(w.dtype()).to_string();
        Ok(q)
    }

    /// Assemble from stored parts, checking that the lengths agree.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        name: &str,
        shape: Vec<usize>,
        kind: QuantType,
        block_size: usize,
        packed: Vec<u8>,
        absmax: AbsmaxState,
        code: [f32; 16],
        dtype: String,
    ) -> Result<Self> {
        validate_block_size(block_size)
            .map_err(|e| Error::field(name, "blocksize", e.to_string()))?;
        let n = shape
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .ok_or_else(|| {
                Error::field(
                    name,
                    "shape",
                    format!("{shape:?} has more elements than fit in memory"),
                )
            })?;
        if packed.len() != n.div_ceil(2) {
            return Err(Error::tensor(
                name,
                format!(
                    "{} packed bytes, shape {shape:?} needs {}",
                    packed.len(),
                    n.div_ceil(2)
                ),
            ));
        }
        let blocks = num_blocks(n, block_size);
        if absmax.num_blocks() != blocks {
            return Err(Error::tensor(
                format!("{name}.absmax"),
                format!(
                    "{} values, shape {shape:?} in blocks of {block_size} needs {blocks}",
                    absmax.num_blocks()
                ),
            ));
        }
        if let AbsmaxState::Double {
            nested_absmax,
            nested_block_size,
            ..
        } = &absmax
        {
            let want = num_blocks(blocks, *nested_block_size);
            if nested_absmax.len() != want {
                return Err(Error::tensor(
                    format!("{name}.nested_absmax"),
                    format!("{} values, expected {want}", nested_absmax.len()),
                ));
            }
        }
        // A NaN or infinite scale or table entry makes the whole block (or weight) non-finite.
        let finite =
            |part: &str, values: &[f32]| match values.iter().filter(|x| !x.is_finite()).count() {
                0 => Ok(()),
                bad => Err(Error::tensor(
                    format!("{name}.{part}"),
                    format!(
                        "{bad} non-finite value(s) (NaN or ±inf) of {}",
                        values.len()
                    ),
                )),
            };
        finite("quant_map", &code)?;
        match &absmax {
            AbsmaxState::Plain(a) => finite("absmax", a)?,
            AbsmaxState::Double {
                nested_absmax,
                offset,
                nested_map,
                ..
            } => {
                finite("nested_absmax", nested_absmax)?;
                finite("nested_quant_map", &nested_map[..])?;
                finite("quant_state offset", &[*offset])?;
            }
        }
        let code = if code == *kind.table() {
            shared_table(kind)
        } else {
            Arc::new(code)
        };
        Ok(Quantized4Bit {
            shape,
            kind,
            block_size,
            packed,
            absmax,
            code,
            dtype,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn kind(&self) -> QuantType {
        self.kind
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }
    pub fn absmax(&self) -> &AbsmaxState {
        &self.absmax
    }
    pub fn code(&self) -> &[f32; 16] {
        &self.code
    }
    pub fn dtype(&self) -> &str {
        &self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_double_quant(&self) -> bool {
        matches!(self.absmax, AbsmaxState::Double { .. })
    }

    /// (out, in) of a 2-D weight.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.shape[..] {
            [o, i] => Ok((o, i)),
            _ => Err(Error::tensor(
                "weight",
                format!("expected a 2-D weight, got shape {:?}", self.shape),
            )),
        }
    }

    /// The 4-bit code of element `i`.
    #[inline]
    pub fn code_at(&self, i: usize) -> u8 {
        code_at(&self.packed, i)
    }

    /// Dequantize elements `start..start + out.len()` of the flattened weight into `out`.
    /// Used by the fused matmul on tiles; runs of whole bytes go through a byte → value-pair
    /// table so that each packed byte costs one lookup. Element i (= row·in + column) takes
    /// the absmax of block i / block_size, as in bitsandbytes: a block may end mid-row or
    /// span several rows (tests: fixtures/quant-straddle).
    pub fn dequantize_range(&self, pairs: &PairLut, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        if end == start {
            return;
        }
        let table = simd_lookup::Table::new(&self.code);
        // Restored once for the range: one at a time, the double-quantized absmax (a division
        // and a lookup per block) took more than the lookups of the block's 64 codes.
        let first = start / self.block_size;
        let scales = self
            .absmax
            .restore_range(first..(end - 1) / self.block_size + 1);
        let mut i = start;
        while i < end {
            let block = i / self.block_size;
            let seg_end = ((block + 1) * self.block_size).min(end);
            let s = scales[block - first];
            let mut o = i - start;
            let mut j = i;
            if j % 2 == 1 {
                out[o] = self.code[(self.packed[j / 2] & 0x0f) as usize] * s;
                o += 1;
                j += 1;
            }
            let whole = (seg_end - j) / 2;
            let bytes = &self.packed[j / 2..j / 2 + whole];
            // Whole 16-byte runs through the SIMD table lookup where the CPU has it.
            let simd = table.dequantize(s, bytes, &mut out[o..o + 2 * whole]);
            for (dst, &b) in out[o + simd..o + 2 * whole]
                .chunks_exact_mut(2)
                .zip(&bytes[simd / 2..])
            {
                let [a, c] = pairs.0[b as usize];
                dst[0] = a * s;
                dst[1] = c * s;
            }
            o += 2 * whole;
            j += 2 * whole;
            if j < seg_end {
                out[o] = self.code[(self.packed[j / 2] >> 4) as usize] * s;
            }
            i = seg_end;
        }
    }

    /// The byte → (high, low) value table of this weight's code.
    pub fn pair_lut(&self) -> PairLut {
        PairLut(std::array::from_fn(|b| {
            [self.code[b >> 4], self.code[b & 0x0f]]
        }))
    }

    /// The whole weight as f32 (for tests, merging and export only: the model keeps it packed).
    pub fn dequantize(&self) -> Vec<f32> {
        let table = &*self.code;
        blockwise::dequantize_4bit(
            &self.packed,
            |b| self.absmax.get(b),
            self.numel(),
            self.block_size,
            table,
        )
    }

    /// The dequantized weight as a candle tensor of the original shape.
    pub fn dequantize_tensor(&self, device: &candle_core::Device) -> Result<candle_core::Tensor> {
        Ok(candle_core::Tensor::from_vec(
            self.dequantize(),
            self.shape.clone(),
            device,
        )?)
    }

    /// Bytes resident for this weight: packed codes + absmax state (tables are shared).
    pub fn resident_bytes(&self) -> usize {
        self.packed.len() + self.absmax.bytes()
    }

    /// Memory per parameter in bits (≈ 4.5 at block 64, ≈ 4.127 with double quant).
    pub fn bits_per_param(&self) -> f64 {
        self.resident_bytes() as f64 * 8.0 / self.numel() as f64
    }

    /// The `quant_state.bitsandbytes__<kind>` JSON, byte-identical to bitsandbytes'
    /// `json.dumps` of the non-tensor items.
    pub fn quant_state_json(&self) -> String {
        let shape = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.kind, self.block_size, self.dtype, shape
        );
        if let AbsmaxState::Double {
            offset,
            nested_block_size,
            ..
        } = &self.absmax
        {
            s.push_str(&format!(
                ", \"nested_blocksize\": {nested_block_size}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(*offset as f64)
            ));
        }
        s.push('}');
        s
    }

    /// The tensors transformers saves for this weight, named from `weight_name`
    /// (e.g. `model.layers.0.mlp.down_proj.weight`), in bitsandbytes' order.
    pub fn to_bnb_tensors(&self, weight_name: &str) -> Vec<(String, RawTensor)> {
        let mut out = vec![(
            weight_name.to_string(),
            RawTensor::u8(self.packed.clone(), vec![self.packed.len(), 1]),
        )];
        let key = |k: &str| format!("{weight_name}.{k}");
        match &self.absmax {
            AbsmaxState::Plain(a) => out.push((key("absmax"), RawTensor::f32(a, vec![a.len()]))),
            AbsmaxState::Double {
                codes,
                nested_absmax,
                nested_map,
                ..
            } => {
                out.push((
                    key("absmax"),
                    RawTensor::u8(codes.clone(), vec![codes.len()]),
                ));
                out.push((
                    key("nested_absmax"),
                    RawTensor::f32(nested_absmax, vec![nested_absmax.len()]),
                ));
                out.push((
                    key("nested_quant_map"),
                    RawTensor::f32(&nested_map[..], vec![256]),
                ));
            }
        }
        out.push((key("quant_map"), RawTensor::f32(&self.code[..], vec![16])));
        let json = self.quant_state_json().into_bytes();
        let len = json.len();
        out.push((
            key(&format!("quant_state.bitsandbytes__{}", self.kind)),
            RawTensor::u8(json, vec![len]),
        ));
        out
    }

    /// Rebuild from the tensors of one weight; `get` looks a full tensor name up.
    pub fn from_bnb_tensors<'a>(
        weight_name: &str,
        get: impl Fn(&str) -> Option<RawTensorRef<'a>>,
    ) -> Result<Self> {
        let key = |k: &str| format!("{weight_name}.{k}");
        let need = |name: String| get(&name).ok_or_else(|| Error::tensor(name, "missing"));
        let (kind, blob_name) = [QuantType::Nf4, QuantType::Fp4]
            .into_iter()
            .map(|k| (k, key(&format!("quant_state.bitsandbytes__{k}"))))
            .find(|(_, n)| get(n).is_some())
            .ok_or_else(|| {
                Error::tensor(
                    key("quant_state.bitsandbytes__nf4"),
                    "missing (no quant_state.bitsandbytes__nf4 or __fp4)",
                )
            })?;
        let blob = need(blob_name.clone())?.as_u8(&blob_name)?;
        let mut de = serde_json::Deserializer::from_slice(blob);
        let state: QuantStateJson = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| {
                let field = e.path().to_string();
                let source = e.into_inner();
                // A value of the wrong type is an error on its field; bad JSON on the blob.
                if source.is_data() && field != "." {
                    Error::field(&blob_name, &field, source.to_string())
                } else {
                    Error::Json {
                        name: blob_name.clone(),
                        source,
                    }
                }
            })
            .and_then(|state| {
                de.end().map_err(|source| Error::Json {
                    name: blob_name.clone(),
                    source,
                })?;
                Ok(state)
            })?;
        if state.quant_type != kind.as_str() {
            return Err(Error::field(
                &blob_name,
                "quant_type",
                format!(
                    "`{}` does not match the key suffix `{kind}`",
                    state.quant_type
                ),
            ));
        }
        let shape = state
            .shape
            .ok_or_else(|| Error::field(&blob_name, "shape", "missing"))?;
        let packed = need(weight_name.to_string())?.as_u8(weight_name)?.to_vec();
        let code_name = key("quant_map");
        let code = need(code_name.clone())?.as_f32(&code_name)?;
        let code: [f32; 16] = code
            .try_into()
            .map_err(|_| Error::tensor(&code_name, "expected 16 values"))?;
        let absmax_name = key("absmax");
        let absmax_t = need(absmax_name.clone())?;
        let absmax = match get(&key("nested_absmax")) {
            None => AbsmaxState::Plain(absmax_t.as_f32(&absmax_name)?),
            Some(nested) => {
                let nested_name = key("nested_absmax");
                let map_name = key("nested_quant_map");
                let map = need(map_name.clone())?.as_f32(&map_name)?;
                let map: [f32; 256] = map
                    .try_into()
                    .map_err(|_| Error::tensor(&map_name, "expected 256 values"))?;
                let offset = state
                    .nested_offset
                    .ok_or_else(|| Error::field(&blob_name, "nested_offset", "missing"))?;
                let nested_block_size = state
                    .nested_blocksize
                    .ok_or_else(|| Error::field(&blob_name, "nested_blocksize", "missing"))?;
                if nested_block_size == 0 {
                    return Err(Error::field(&blob_name, "nested_blocksize", "must be > 0"));
                }
                AbsmaxState::Double {
                    codes: absmax_t.as_u8(&absmax_name)?.to_vec(),
                    nested_absmax: nested.as_f32(&nested_name)?,
                    offset: offset as f32,
                    nested_block_size,
                    nested_map: if map == *dynamic_map() {
                        shared_dynamic_map()
                    } else {
                        Arc::new(map)
                    },
                }
            }
        };
        // The dtype the weight had before quantization, written back as read: bitsandbytes
        // reads it as a torch dtype name.
        let dtype = state.dtype.unwrap_or_else(|| "float32".into());
        if !["float32", "float16", "bfloat16", "float64"].contains(&dtype.as_str()) {
            return Err(Error::field(
                &blob_name,
                "dtype",
                format!("expected float32, float16, bfloat16 or float64, found {dtype:?}"),
            ));
        }
        Self::from_parts(
            weight_name,
            shape,
            kind,
            state.blocksize,
            packed,
            absmax,
            code,
            dtype,
        )
    }
}

fn shared_table(kind: QuantType) -> Arc<[f32; 16]> {
    static NF4: OnceLock<Arc<[f32; 16]>> = OnceLock::new();
    static FP4: OnceLock<Arc<[f32; 16]>> = OnceLock::new();
    let cell = match kind {
        QuantType::Nf4 => &NF4,
        QuantType::Fp4 => &FP4,
    };
    cell.get_or_init(|| Arc::new(*kind.table())).clone()
}

/// Byte → (high-nibble value, low-nibble value).
pub struct PairLut(pub [[f32; 2]; 256]);

/// The non-tensor items of a `quant_state` blob.
#[derive(Debug, Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: Option<String>,
    shape: Option<Vec<usize>>,
    nested_blocksize: Option<usize>,
    #[allow(dead_code)]
    nested_dtype: Option<String>,
    nested_offset: Option<f64>,
}

/// torch dtype name as bitsandbytes writes it (`str(dtype).strip("torch.")`).
pub fn dtype_name(dtype: candle_core::DType) -> &'static str {
    match dtype {
        candle_core::DType::BF16 => "bfloat16",
        candle_core::DType::F16 => "float16",
        _ => "float32",
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 or from 1e16.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let e = format!("{x:e}"); // e.g. "-7.858167886734009e-1"
    let (mant, exp) = e.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    }
}

/// Element type of a [`RawTensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawDtype {
    U8,
    F32,
}

/// An owned little-endian tensor buffer to write with safetensors.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: RawDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn u8(data: Vec<u8>, shape: Vec<usize>) -> Self {
        RawTensor {
            dtype: RawDtype::U8,
            shape,
            data,
        }
    }
    pub fn f32(values: &[f32], shape: Vec<usize>) -> Self {
        RawTensor {
            dtype: RawDtype::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
    pub fn as_ref(&self) -> RawTensorRef<'_> {
        RawTensorRef {
            dtype: self.dtype,
            shape: &self.shape,
            data: &self.data,
        }
    }
}

/// A borrowed tensor buffer (from a safetensors file or a [`RawTensor`]).
#[derive(Debug, Clone, Copy)]
pub struct RawTensorRef<'a> {
    pub dtype: RawDtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl<'a> RawTensorRef<'a> {
    pub fn as_u8(&self, name: &str) -> Result<&'a [u8]> {
        match self.dtype {
            RawDtype::U8 => Ok(self.data),
            other => Err(Error::tensor(
                name,
                format!("expected uint8, got {other:?}"),
            )),
        }
    }
    pub fn as_f32(&self, name: &str) -> Result<Vec<f32>> {
        match self.dtype {
            RawDtype::F32 => Ok(self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            other => Err(Error::tensor(
                name,
                format!("expected float32, got {other:?}"),
            )),
        }
    }
}

/// Dequantizing packed codes with AVX2: the 16-entry code table lives in two registers, and
/// each group of 8 nibbles becomes 8 floats through two in-register permutes and a blend.
mod simd_lookup {
    /// A code table ready for SIMD lookups where the CPU has them (built once per range).
    pub struct Table {
        #[cfg(target_arch = "x86_64")]
        kernel: Option<Kernel>,
    }

    /// The lookup a CPU runs: with AVX-512, sixteen lanes index the table in one permute;
    /// with AVX2, [`crate::planes::Planes`]' shuffles.
    #[cfg(target_arch = "x86_64")]
    enum Kernel {
        Avx512([f32; 16]),
        Avx2(crate::planes::Planes),
    }

    impl Table {
        pub fn new(code: &[f32; 16]) -> Self {
            Self::with_avx512(code, true)
        }

        /// As [`Table::new`], with AVX-512 only if `avx512` (the tests compare both paths).
        fn with_avx512(code: &[f32; 16], avx512: bool) -> Self {
            let _ = (code, avx512);
            Table {
                #[cfg(target_arch = "x86_64")]
                kernel: if avx512 && std::is_x86_feature_detected!("avx512f") {
                    Some(Kernel::Avx512(*code))
                } else if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: built only where the CPU has AVX2.
                    Some(Kernel::Avx2(unsafe { crate::planes::Planes::new(code) }))
                } else {
                    None
                },
            }
        }

        /// Writes 2·n values for the first n = 16·k bytes of `bytes` (high nibble first),
        /// scaled by `scale`; returns how many values it wrote (0 without AVX2).
        pub fn dequantize(&self, scale: f32, bytes: &[u8], out: &mut [f32]) -> usize {
            #[cfg(target_arch = "x86_64")]
            if let Some(kernel) = &self.kernel {
                let n = bytes.len() / 16 * 16;
                let (bytes, out) = (&bytes[..n], &mut out[..2 * n]);
                // SAFETY: each kernel exists only where the CPU has its features; the loops
                // read bytes[..n] and write out[..2n], both within their slices.
                match kernel {
                    Kernel::Avx512(code) => unsafe { avx512(code, scale, bytes, out) },
                    Kernel::Avx2(planes) => unsafe { avx2(planes, scale, bytes, out) },
                }
                return 2 * n;
            }
            let _ = (scale, bytes, out);
            0
        }
    }

    /// Each byte's two codes spread to two lanes (high nibble first), looked up in the table
    /// times `scale`: the products `code[c] * scale` of the scalar loop, bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(code: &[f32; 16], scale: f32, bytes: &[u8], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let scaled = _mm512_mul_ps(_mm512_loadu_ps(code.as_ptr()), _mm512_set1_ps(scale));
        // Lane 2j holds byte j's high nibble, lane 2j + 1 its low one (the permute reads only
        // the low four bits of each lane).
        let shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
        for (chunk, dst) in bytes.chunks_exact(16).zip(out.chunks_exact_mut(32)) {
            let v = _mm_loadu_si128(chunk.as_ptr().cast());
            let at = dst.as_mut_ptr();
            for (half, pairs) in [_mm_unpacklo_epi8(v, v), _mm_unpackhi_epi8(v, v)]
                .into_iter()
                .enumerate()
            {
                let index = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(pairs), shifts);
                _mm512_storeu_ps(at.add(16 * half), _mm512_permutexvar_ps(index, scaled));
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(planes: &crate::planes::Planes, scale: f32, bytes: &[u8], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let scale = _mm256_set1_ps(scale);
        for (chunk, dst) in bytes.chunks_exact(16).zip(out.chunks_exact_mut(32)) {
            let [a, b, c, d] = planes.decode(chunk.as_ptr());
            let at = dst.as_mut_ptr();
            _mm256_storeu_ps(at, _mm256_mul_ps(a, scale));
            _mm256_storeu_ps(at.add(8), _mm256_mul_ps(b, scale));
            _mm256_storeu_ps(at.add(16), _mm256_mul_ps(c, scale));
            _mm256_storeu_ps(at.add(24), _mm256_mul_ps(d, scale));
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn simd_lookup_equals_the_scalar_table() {
            let code: [f32; 16] = std::array::from_fn(|i| (i as f32 - 7.5) / 7.5);
            let bytes: Vec<u8> = (0..80u32)
                .map(|i| (i.wrapping_mul(97) % 256) as u8)
                .collect();
            // The AVX-512 path where the CPU has it, and AVX2's.
            for avx512 in [true, false] {
                let mut out = vec![0f32; 160];
                let table = super::Table::with_avx512(&code, avx512);
                let written = table.dequantize(0.37, &bytes, &mut out);
                if !std::is_x86_feature_detected!("avx2") {
                    assert_eq!(written, 0);
                    return;
                }
                assert_eq!(written, 160);
                for (i, &b) in bytes.iter().enumerate() {
                    let (high, low) = (code[(b >> 4) as usize], code[(b & 15) as usize]);
                    assert_eq!(out[2 * i], high * 0.37, "avx512 {avx512}: byte {i} high");
                    assert_eq!(out[2 * i + 1], low * 0.37, "avx512 {avx512}: byte {i} low");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn python_repr() {
        assert_eq!(python_float_repr(0.7858167886734009), "0.7858167886734009");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(1.5e-7), "1.5e-07");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(2.0), "2.0");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(123456.75), "123456.75");
    }

    #[test]
    fn bits_per_param() {
        let x = sample(4096 * 64);
        let plain = Quantized4Bit::quantize(&x, &[4096, 64], QuantType::Nf4, 64, false).unwrap();
        assert_eq!(plain.bits_per_param(), 4.5);
        let dq = Quantized4Bit::quantize(&x, &[4096, 64], QuantType::Nf4, 64, true).unwrap();
        let want = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0) + 32.0 / x.len() as f64;
        assert!(
            (dq.bits_per_param() - want).abs() < 1e-12,
            "{}",
            dq.bits_per_param()
        );
        assert!((dq.bits_per_param() - 4.127).abs() < 1e-3);
    }

    /// Double-quantized absmax restored over any range of blocks (across nested blocks, not a
    /// multiple of sixteen), bit for bit the values of the scalar restore.
    #[test]
    fn restore_range_restores_each_block_exactly() {
        // 300 rows of 64 in blocks of 64: 300 absmax, two nested blocks of 256 and a rest.
        let q = Quantized4Bit::quantize(&sample(300 * 64), &[300, 64], QuantType::Nf4, 64, true)
            .unwrap();
        assert!(matches!(q.absmax(), AbsmaxState::Double { .. }));
        for range in [0..300, 5..261, 250..257, 17..18, 0..16, 40..40] {
            let got = q.absmax().restore_range(range.clone());
            let want: Vec<f32> = range.clone().map(|b| q.absmax().get(b)).collect();
            assert_eq!(got, want, "{range:?}");
        }
    }

    #[test]
    fn dequantize_range_matches_whole() {
        for (n, cols, bs) in [(7 * 45, 45, 32), (10 * 64, 64, 64), (3 * 100, 100, 128)] {
            let x = sample(n);
            for dq in [false, true] {
                let q =
                    Quantized4Bit::quantize(&x, &[n / cols, cols], QuantType::Fp4, bs, dq).unwrap();
                let whole = q.dequantize();
                let lut = q.pair_lut();
                for (s, len) in [(0, n), (1, 10), (3, 64), (33, 97), (n - 5, 5)] {
                    let mut out = vec![0.0; len];
                    q.dequantize_range(&lut, s, &mut out);
                    assert_eq!(out, whole[s..s + len], "n {n} start {s} len {len}");
                }
            }
        }
    }

    #[test]
    fn bnb_tensors_round_trip() {
        let x = sample(3 * 100);
        for dq in [false, true] {
            for kind in [QuantType::Nf4, QuantType::Fp4] {
                let q = Quantized4Bit::quantize(&x, &[3, 100], kind, 64, dq).unwrap();
                let ts = q.to_bnb_tensors("m.weight");
                let get = |n: &str| ts.iter().find(|(k, _)| k == n).map(|(_, t)| t.as_ref());
                let back = Quantized4Bit::from_bnb_tensors("m.weight", get).unwrap();
                assert_eq!(back, q);
                let blob = ts.last().unwrap();
                assert_eq!(blob.0, format!("m.weight.quant_state.bitsandbytes__{kind}"));
            }
        }
    }

    /// Found by the fuzz suite: a value of the wrong type in a quant_state blob was reported
    /// with a line and column only.
    #[test]
    fn a_blob_field_of_the_wrong_type_is_named() {
        let q = Quantized4Bit::quantize(&sample(128), &[2, 64], QuantType::Nf4, 64, false).unwrap();
        let mut ts = q.to_bnb_tensors("m.weight");
        let blob = ts.last_mut().unwrap();
        let json = q
            .quant_state_json()
            .replace("\"blocksize\": 64", "\"blocksize\": [64]");
        assert!(json.contains("[64]"), "{json}");
        blob.1 = RawTensor::u8(json.into_bytes(), vec![0]);
        let get = |n: &str| ts.iter().find(|(k, _)| k == n).map(|(_, t)| t.as_ref());
        let err = Quantized4Bit::from_bnb_tensors("m.weight", get)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("quant_state.bitsandbytes__nf4") && err.contains("field `blocksize`"),
            "{err}"
        );
    }

    /// A dtype that is no torch float type was kept and written back into requantized files.
    #[test]
    fn a_blob_dtype_that_is_no_float_type_is_refused() {
        let q = Quantized4Bit::quantize(&sample(128), &[2, 64], QuantType::Nf4, 64, false).unwrap();
        let mut ts = q.to_bnb_tensors("m.weight");
        let blob = ts.last_mut().unwrap();
        let json = q
            .quant_state_json()
            .replace("\"dtype\": \"float32\"", "\"dtype\": \"NaN\"");
        assert!(json.contains("NaN"), "{json}");
        blob.1 = RawTensor::u8(json.into_bytes(), vec![0]);
        let get = |n: &str| ts.iter().find(|(k, _)| k == n).map(|(_, t)| t.as_ref());
        let err = Quantized4Bit::from_bnb_tensors("m.weight", get)
            .unwrap_err()
            .to_string();
        assert!(err.contains("dtype") && err.contains("\"NaN\""), "{err}");
    }

    /// A shape whose element count overflows was read modulo 2^64 (here as 0 elements, so an
    /// empty weight matched it) and accepted.
    #[test]
    fn a_shape_that_overflows_is_refused() {
        let q = Quantized4Bit::quantize(&sample(128), &[2, 64], QuantType::Nf4, 64, false).unwrap();
        let mut ts = q.to_bnb_tensors("m.weight");
        for (name, t) in ts.iter_mut() {
            if name == "m.weight" {
                *t = RawTensor::u8(vec![], vec![0, 1]);
            } else if name == "m.weight.absmax" {
                *t = RawTensor::f32(&[], vec![0]);
            } else if name.contains("quant_state") {
                let json = q
                    .quant_state_json()
                    .replace("\"shape\": [2, 64]", "\"shape\": [4294967296, 4294967296]");
                assert!(json.contains("4294967296"), "{json}");
                *t = RawTensor::u8(json.into_bytes(), vec![0]);
            }
        }
        let get = |n: &str| ts.iter().find(|(k, _)| k == n).map(|(_, t)| t.as_ref());
        let err = Quantized4Bit::from_bnb_tensors("m.weight", get)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.weight") && err.contains("more elements than fit"),
            "{err}"
        );
    }

    #[test]
    fn missing_and_bad_fields_are_named() {
        let q = Quantized4Bit::quantize(&sample(128), &[2, 64], QuantType::Nf4, 64, true).unwrap();
        let ts = q.to_bnb_tensors("m.weight");
        let without = |skip: &str| {
            let ts: Vec<_> = ts.iter().filter(|(k, _)| k != skip).cloned().collect();
            let get = |n: &str| ts.iter().find(|(k, _)| k == n).map(|(_, t)| t.as_ref());
            Quantized4Bit::from_bnb_tensors("m.weight", get)
                .unwrap_err()
                .to_string()
        };
        assert!(without("m.weight.nested_quant_map").contains("m.weight.nested_quant_map"));
        assert!(without("m.weight.quant_map").contains("m.weight.quant_map"));
        assert!(without("m.weight").contains("`m.weight`"));
        assert!(without("m.weight.quant_state.bitsandbytes__nf4").contains("quant_state"));
        // A blob with a bad blocksize names the blob and the field.
        let mut ts2 = ts.clone();
        let blob = ts2.last_mut().unwrap();
        blob.1 = RawTensor::u8(
            q.quant_state_json()
                .replace("\"blocksize\": 64", "\"blocksize\": 48")
                .into_bytes(),
            vec![0],
        );
        let get = |n: &str| ts2.iter().find(|(k, _)| k == n).map(|(_, t)| t.as_ref());
        let err = Quantized4Bit::from_bnb_tensors("m.weight", get)
            .unwrap_err()
            .to_string();
        assert!(err.contains("blocksize") && err.contains("48"), "{err}");
    }
}
