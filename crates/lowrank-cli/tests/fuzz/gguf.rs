//! GGUF files as `--model x.gguf` loads them (`Llama::load`, `Tokenizer::load`): mutated copies
//! of the converted fixtures (header, metadata, tensor infos and data), and the reader on its
//! own (every tensor dequantized).

use candle_core::{Device, Tensor};
use lowrank_models::{Llama, Tokenizer};
use proptest::prelude::*;

use crate::ensure;
use crate::support::*;

const MODEL_CASES: u32 = 400;
const READER_CASES: u32 = 800;

const FILES: &[&str] = &[
    "gguf/llama-tied-q8_0.gguf",
    "gguf/qwen2-tied-q8_0.gguf",
    "gguf/quants.gguf",
];

/// A mutated fixture: which one, and the edits (mostly before the tensor data, where a flipped
/// byte changes the structure rather than a weight).
fn mutated() -> impl Strategy<Value = (usize, bool, Vec<ByteEdit>)> {
    (0..FILES.len(), prop::bool::weighted(0.8), byte_edits(4))
}

fn apply((file, header_only, edits): &(usize, bool, Vec<ByteEdit>)) -> Vec<u8> {
    let bytes = read_fixture(FILES[*file]);
    let donors: Vec<Vec<u8>> = FILES.iter().map(|f| read_fixture(f)).collect();
    let donors: Vec<&[u8]> = donors.iter().map(Vec::as_slice).collect();
    // The metadata and tensor infos of these files end before byte 40000 (llama/qwen2
    // vocabularies) or 700 (quants).
    let end = if *header_only {
        bytes.len().min(40_000)
    } else {
        bytes.len()
    };
    apply_bytes(&bytes, 0..end, edits, &donors)
}

#[test]
fn mutated_gguf_models_load_or_fail_clearly() {
    run("gguf models", MODEL_CASES, mutated(), |case| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, apply(&case)).unwrap();
        match Llama::load(&path, &Device::Cpu) {
            Ok(model) => {
                let ids = Tensor::new(&[[0u32, 1, 2]], &Device::Cpu).unwrap();
                if let Err(e) = model.forward(&ids, None, &[]) {
                    check_error(&e.to_string(), &[])?;
                }
            }
            Err(e) => check_error(&e.to_string(), &["model.gguf"])?,
        }
        match Tokenizer::load(&path) {
            Ok(tokenizer) => {
                let ids = tokenizer.encode("The quick café 🤔 <|im_end|>", true);
                ensure!(
                    ids.is_ok() || !ids.unwrap_err().to_string().is_empty(),
                    "empty error"
                );
            }
            Err(e) => check_error(&e.to_string(), &["model.gguf"])?,
        }
        Ok(())
    });
}

#[test]
fn the_gguf_reader_reads_every_tensor_or_fails_clearly() {
    run("gguf reader", READER_CASES, mutated(), |case| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.gguf");
        std::fs::write(&path, apply(&case)).unwrap();
        match lowrank_gguf::GgufFile::open(&path) {
            Ok(file) => {
                for t in file.tensors() {
                    let (shape, values) = file.dequantize(&t.name).unwrap();
                    ensure!(
                        shape.iter().product::<usize>() == values.len(),
                        "{}: shape",
                        t.name
                    );
                }
            }
            Err(e) => check_error(&e.to_string(), &["file.gguf"])?,
        }
        Ok(())
    });
}
