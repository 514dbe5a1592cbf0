//! Bit-exactness against bitsandbytes 0.50.2 (CPU) on fixtures/quant/
//! (made by scripts/make_quant_fixtures.py).

use std::collections::HashMap;
use std::path::PathBuf;

use lowrank_quant::blockwise::{double_quantize, quantize_4bit};
use lowrank_quant::codebook::{dynamic_map, QuantType};
use lowrank_quant::{AbsmaxState, BnbCheckpoint, QuantizationConfig, Quantized4Bit};
use safetensors::tensor::{Dtype, SafeTensors};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/quant")
}

#[derive(Deserialize)]
struct Info {
    cases: Vec<Case>,
    llama: Llama,
}

#[derive(Deserialize)]
struct Case {
    key: String,
    input: String,
    quant_type: String,
    double_quant: bool,
    shape: Vec<usize>,
    packed_shape: Vec<usize>,
    blocksize: usize,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f64>,
}

#[derive(Deserialize)]
struct Llama {
    dir: String,
    quantized: Vec<String>,
}

struct Tensors {
    bytes: Vec<u8>,
}

impl Tensors {
    fn open(name: &str) -> Self {
        Tensors {
            bytes: std::fs::read(fixtures().join(name)).unwrap(),
        }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
    fn u8(&self, name: &str) -> (Vec<u8>, Vec<usize>) {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::U8, "{name}");
        (t.data().to_vec(), t.shape().to_vec())
    }
}

fn info() -> Info {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap()).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn tables_equal_bitsandbytes() {
    let t = Tensors::open("cases.safetensors");
    assert_eq!(bits(&t.f32("maps.nf4")), bits(QuantType::Nf4.table()));
    assert_eq!(bits(&t.f32("maps.fp4")), bits(QuantType::Fp4.table()));
    assert_eq!(bits(&t.f32("maps.dynamic")), bits(dynamic_map()));
}

#[test]
fn quantize_is_bit_exact_for_every_case() {
    let t = Tensors::open("cases.safetensors");
    let info = info();
    assert!(info.cases.len() >= 40);
    let mut seen = HashMap::new();
    for c in &info.cases {
        let k = &c.key;
        let kind = QuantType::parse(&c.quant_type).unwrap();
        let x = t.f32(&format!("{}.input", c.input));
        let n: usize = c.shape.iter().product();
        assert_eq!(x.len(), n);
        *seen
            .entry((c.quant_type.clone(), c.double_quant, c.blocksize))
            .or_insert(0) += 1;

        let (packed, absmax) = quantize_4bit(&x, c.blocksize, kind).unwrap();
        let (want_packed, want_shape) = t.u8(&format!("{k}.packed"));
        assert_eq!(want_shape, c.packed_shape, "{k}");
        assert_eq!(
            want_shape,
            vec![n.div_ceil(2), 1],
            "{k}: bnb stores [ceil(n/2), 1]"
        );
        assert_eq!(packed, want_packed, "{k}: packed codes");
        assert_eq!(
            bits(&t.f32(&format!("{k}.quant_map"))),
            bits(kind.table()),
            "{k}: quant_map"
        );

        let q = Quantized4Bit::quantize(&x, &c.shape, kind, c.blocksize, c.double_quant).unwrap();
        if c.double_quant {
            assert_eq!(
                bits(&absmax),
                bits(&t.f32(&format!("{k}.absmax_direct"))),
                "{k}"
            );
            let dq = double_quantize(&absmax);
            let want_offset = t.f32(&format!("{k}.offset"))[0];
            assert_eq!(
                dq.offset.to_bits(),
                want_offset.to_bits(),
                "{k}: offset (mean)"
            );
            // The JSON double is an f32 value; serde_json may parse it an f64 ulp off.
            assert_eq!(
                dq.offset,
                c.nested_offset.unwrap() as f32,
                "{k}: nested_offset"
            );
            assert_eq!(c.nested_blocksize, Some(256));
            assert_eq!(
                dq.codes,
                t.u8(&format!("{k}.absmax_q")).0,
                "{k}: 8-bit absmax codes"
            );
            assert_eq!(
                bits(&dq.nested_absmax),
                bits(&t.f32(&format!("{k}.nested_absmax"))),
                "{k}: nested_absmax"
            );
            assert_eq!(
                bits(&t.f32(&format!("{k}.nested_quant_map"))),
                bits(dynamic_map()),
                "{k}"
            );
            // Restored absmax: bnb's dequantize_blockwise + offset.
            assert_eq!(
                bits(&q.absmax().restore()),
                bits(&t.f32(&format!("{k}.absmax"))),
                "{k}: restored absmax"
            );
            match q.absmax() {
                AbsmaxState::Double { codes, .. } => assert_eq!(codes, &dq.codes),
                _ => panic!("{k}: expected double quant"),
            }
        } else {
            assert_eq!(
                bits(&absmax),
                bits(&t.f32(&format!("{k}.absmax"))),
                "{k}: absmax"
            );
        }
        assert_eq!(q.packed(), &packed[..]);
        assert_close(
            &q.dequantize(),
            &t.f32(&format!("{k}.dequant")),
            1e-7,
            &format!("{k}: dequantized"),
        );
    }
    // nf4/fp4 × dq on/off × {64, 128}, each on several inputs (incl. sizes not a multiple of
    // the block, an odd size, zero blocks).
    for kind in ["nf4", "fp4"] {
        for dq in [false, true] {
            for bs in [64, 128] {
                assert!(seen[&(kind.to_string(), dq, bs)] >= 5, "{kind} {dq} {bs}");
            }
        }
    }
}

#[test]
fn transformers_checkpoint_reads_and_matches_bitsandbytes() {
    let info = info();
    let dir = fixtures().join(&info.llama.dir);
    let ck = BnbCheckpoint::read(&dir.join("model.safetensors")).unwrap();
    let names: Vec<&String> = ck.quantized.keys().collect();
    let mut want: Vec<&String> = info.llama.quantized.iter().collect();
    want.sort();
    assert_eq!(names, want);
    assert!(ck.tensors.contains_key("model.embed_tokens.weight"));
    assert!(ck.tensors.contains_key("model.norm.weight"));
    assert!(!ck
        .tensors
        .keys()
        .any(|k| k.contains("absmax") || k.contains("quant")));

    let reference = Tensors::open(&format!("{}.dequant.safetensors", info.llama.dir));
    for (name, q) in &ck.quantized {
        assert_eq!(q.kind(), QuantType::Nf4);
        assert!(q.is_double_quant());
        assert_eq!(q.block_size(), 64);
        assert_close(&q.dequantize(), &reference.f32(name), 1e-7, name);
    }

    let qc = QuantizationConfig::read(&dir.join("config.json"))
        .unwrap()
        .unwrap();
    assert_eq!(qc.quant_type().unwrap(), QuantType::Nf4);
    assert!(qc.bnb_4bit_use_double_quant && qc.load_in_4bit);
    assert_eq!(qc.bnb_4bit_compute_dtype, "float32");
}

/// Quantizing the f32 llama-tied weights ourselves gives, tensor for tensor and byte for byte
/// (quant_state JSON included), the checkpoint transformers + bitsandbytes saved.
#[test]
fn requantized_llama_is_byte_identical_to_transformers() {
    let info = info();
    let saved = std::fs::read(fixtures().join(&info.llama.dir).join("model.safetensors")).unwrap();
    let saved = SafeTensors::deserialize(&saved).unwrap();
    let base_path = fixtures().join("../models/llama-tied/model.safetensors");
    let base = std::fs::read(base_path).unwrap();
    let base = SafeTensors::deserialize(&base).unwrap();
    let mut ck = BnbCheckpoint::default();
    for name in &info.llama.quantized {
        let t = base.tensor(name).unwrap();
        let x: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let q = Quantized4Bit::quantize(&x, t.shape(), QuantType::Nf4, 64, true).unwrap();
        ck.quantized.insert(name.clone(), q);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.safetensors");
    ck.write(&out).unwrap();
    let ours = std::fs::read(&out).unwrap();
    let ours = SafeTensors::deserialize(&ours).unwrap();
    let mut n = 0;
    for (name, view) in ours.tensors() {
        let want = saved
            .tensor(&name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(view.dtype(), want.dtype(), "{name}");
        assert_eq!(view.shape(), want.shape(), "{name}");
        assert!(view.data() == want.data(), "{name}: bytes differ");
        n += 1;
    }
    assert_eq!(n, info.llama.quantized.len() * 6);
}

#[test]
fn checkpoint_round_trip_preserves_every_tensor() {
    let info = info();
    let src = fixtures().join(&info.llama.dir).join("model.safetensors");
    let ck = BnbCheckpoint::read(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.safetensors");
    ck.write(&out).unwrap();
    let a = std::fs::read(&src).unwrap();
    let b = std::fs::read(&out).unwrap();
    let (a, b) = (
        SafeTensors::deserialize(&a).unwrap(),
        SafeTensors::deserialize(&b).unwrap(),
    );
    let mut na: Vec<String> = a.names().into_iter().map(String::from).collect();
    let mut nb: Vec<String> = b.names().into_iter().map(String::from).collect();
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    for name in &na {
        let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{name}");
        assert!(x.data() == y.data(), "{name}: bytes differ");
    }
}

#[test]
fn memory_bits_per_parameter() {
    let x: Vec<f32> = (0..4096 * 256)
        .map(|i| ((i * 7919) % 2001) as f32 - 1000.0)
        .collect();
    let plain = Quantized4Bit::quantize(&x, &[4096, 256], QuantType::Nf4, 64, false).unwrap();
    let dq = Quantized4Bit::quantize(&x, &[4096, 256], QuantType::Nf4, 64, true).unwrap();
    println!(
        "bits/param: nf4 block 64 = {:.4}, with double quant = {:.4}",
        plain.bits_per_param(),
        dq.bits_per_param()
    );
    assert_eq!(plain.bits_per_param(), 4.5);
    assert!((dq.bits_per_param() - (4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0))).abs() < 1e-4);
    assert_eq!(plain.resident_bytes(), x.len() / 2 + x.len() / 64 * 4);
}

/// The fused 4-bit matmul and its input gradient, on every 2-D case whose blocks straddle
/// rows (w3x100: 100-value rows at blocks 64 and 128; w256x160: 160-value rows at 64) and the
/// aligned w64x64, against x·Wᵀ and dy·W with W as bitsandbytes dequantizes it (f64 sums): one
/// row (decoding), a few rows and enough rows for the tiled GEMM path.
#[test]
fn fused_matmul_with_blocks_straddling_rows_equals_bitsandbytes_dequant() {
    let t = Tensors::open("cases.safetensors");
    let mut straddling = 0;
    for c in info().cases.iter().filter(|c| c.shape.len() == 2) {
        let (out_f, in_f) = (c.shape[0], c.shape[1]);
        if in_f % c.blocksize != 0 {
            straddling += 1;
        }
        let kind = QuantType::parse(&c.quant_type).unwrap();
        let x = t.f32(&format!("{}.input", c.input));
        let q = Quantized4Bit::quantize(&x, &c.shape, kind, c.blocksize, c.double_quant).unwrap();
        let w = t.f32(&format!("{}.dequant", c.key));
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        for rows in [1, 3, lowrank_quant::matmul::GEMM_MIN_ROWS + 5] {
            let input: Vec<f32> = (0..rows * in_f)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            let y = lowrank_quant::matmul_4bit(&input, rows, &q).unwrap();
            for r in 0..rows {
                for o in 0..out_f {
                    let want: f64 = (0..in_f)
                        .map(|i| input[r * in_f + i] as f64 * w[o * in_f + i] as f64)
                        .sum();
                    let got = y[r * out_f + o] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (scale as f64) * in_f as f64,
                        "{} rows {rows}: y[{r}, {o}] {got} vs {want}",
                        c.key
                    );
                }
            }
            let dy: Vec<f32> = (0..rows * out_f)
                .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
                .collect();
            let dx = lowrank_quant::matmul_4bit_grad_input(&dy, rows, &q).unwrap();
            for r in 0..rows {
                for i in 0..in_f {
                    let want: f64 = (0..out_f)
                        .map(|o| dy[r * out_f + o] as f64 * w[o * in_f + i] as f64)
                        .sum();
                    let got = dx[r * in_f + i] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (scale as f64) * out_f as f64,
                        "{} rows {rows}: dx[{r}, {i}] {got} vs {want}",
                        c.key
                    );
                }
            }
        }
    }
    assert!(straddling >= 9, "{straddling} straddling cases");
}
