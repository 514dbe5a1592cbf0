//! Dequantization against gguf-py's `gguf.quants.dequantize` (fixtures/gguf/quants*, written
//! by scripts/make_gguf_fixtures.py), and the reader's errors on damaged files.

use std::path::{Path, PathBuf};

use lowrank_gguf::{GgufError, GgufFile, TensorType};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf")
}

#[test]
fn every_type_dequantizes_bit_exactly_as_gguf_py() {
    let file = GgufFile::open(&fixtures().join("quants.gguf")).unwrap();
    let reference = std::fs::read(fixtures().join("quants_reference.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&reference).unwrap();
    for t in TensorType::ALL {
        let info = file.tensor(t.name()).unwrap();
        assert_eq!(info.tensor_type, t);
        let (shape, ours) = file.dequantize(t.name()).unwrap();
        let want = reference.tensor(t.name()).unwrap();
        assert_eq!(shape, want.shape(), "{}", t.name());
        let want: Vec<f32> = want
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let max_diff = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let bits_equal = ours
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        eprintln!("{:>5}: max |ours - gguf-py| = {max_diff:e}", t.name());
        assert!(
            bits_equal,
            "{}: max |ours - gguf-py| = {max_diff:e}",
            t.name()
        );
    }
}

/// The fixture with `edit` applied, written to a temporary file.
fn damaged(edit: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
    let mut bytes = std::fs::read(fixtures().join("quants.gguf")).unwrap();
    edit(&mut bytes);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.gguf");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// Offset of the first occurrence of `needle` in `bytes`.
fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

#[test]
fn damaged_files_are_errors_naming_the_file_and_field() {
    let expect = |edit: &dyn Fn(&mut Vec<u8>), wanted: &str| {
        let (_dir, path) = damaged(edit);
        let err = GgufFile::open(&path).expect_err(wanted);
        let msg = err.to_string();
        assert!(
            msg.contains("damaged.gguf") && msg.contains(wanted),
            "{wanted}: {msg}"
        );
        err
    };
    // Cut inside the header, and inside the last tensor's data (the file ends with padding).
    let err = expect(&|b| b.truncate(100), "truncated");
    assert!(matches!(err, GgufError::Truncated { .. }));
    let err = expect(&|b| b.truncate(b.len() - 40), "the data of tensor \"Q8_K\"");
    assert!(matches!(err, GgufError::Truncated { .. }));
    expect(&|b| b[0] = b'X', "not a GGUF file");
    expect(&|b| b[4] = 9, "GGUF version 9");
    // A string length far past the end of the file: an error, not an allocation.
    expect(
        &|b| b[24..32].copy_from_slice(&u64::MAX.to_le_bytes()),
        "truncated",
    );
    // Tensor "Q4_K": its name, then n_dims (u32), two dims (u64), then the type id: IQ2_XXS.
    let type_at = |b: &[u8]| find(b, b"Q4_K") + 4 + 4 + 16;
    let err = expect(
        &|b| {
            let at = type_at(b);
            b[at..at + 4].copy_from_slice(&16u32.to_le_bytes())
        },
        "tensor \"Q4_K\" has ggml type IQ2_XXS (id 16), which is not supported",
    );
    assert!(matches!(err, GgufError::UnsupportedTensorType { .. }));
    expect(
        &|b| {
            let at = type_at(b);
            b[at..at + 4].copy_from_slice(&77u32.to_le_bytes())
        },
        "ggml type unknown (id 77)",
    );
    // A row length that is not a whole number of blocks.
    expect(
        &|b| {
            let at = find(b, b"Q8_0") + 4 + 4;
            b[at..at + 8].copy_from_slice(&100u64.to_le_bytes())
        },
        "row length 100 is not a multiple",
    );
}

#[test]
fn metadata_accessors_name_the_key() {
    let file = GgufFile::open(&fixtures().join("quants.gguf")).unwrap();
    assert_eq!(file.str("general.architecture").unwrap(), "quants-fixture");
    let err = file.u64("general.architecture").unwrap_err().to_string();
    assert!(
        err.contains("`general.architecture`") && err.contains("non-negative integer"),
        "{err}"
    );
    let err = file.str("llama.block_count").unwrap_err().to_string();
    assert!(err.contains("`llama.block_count` is missing"), "{err}");
}
