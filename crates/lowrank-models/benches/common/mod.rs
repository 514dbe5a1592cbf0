//! What the model benches share: their start (the binary's process settings, their
//! arguments) and the weight formats they take on the command line.

use lowrank_core::QuantSpec;
use lowrank_models::Llama;
use lowrank_quant::QuantType;

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Applies the allocator and thread settings the `lowrank` binary runs with (no spinning in
/// candle's pool, freed memory kept by malloc, the main thread one of rayon's workers) and
/// returns the bench's arguments (cargo bench appends `--bench`; everything else is ours).
pub fn start() -> Vec<String> {
    lowrank_kernels::process::set_up();
    std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect()
}

/// Puts `model` into the weight format `name` names: none (f32); `bf16` (the base's linears
/// and head kept in bf16, as `--bf16-weights`); `bf16-act` (also their inputs rounded to bf16,
/// as `--bf16-activations`); `nf4` (the decoder layers' linears in NF4 with double
/// quantization and the embedding/head in bf16, as `--quantize nf4 --double-quant
/// --bf16-weights`).
pub fn set_weights(model: &mut Llama, name: Option<&str>) -> Res<()> {
    match name {
        None | Some("f32") => {}
        Some("bf16") => model.cast_for_inference(candle_core::DType::BF16)?,
        Some("bf16-act") => {
            model.cast_for_inference(candle_core::DType::BF16)?;
            model.round_activations_to_bf16()?;
        }
        Some("nf4") => {
            model.quantize_linears(&QuantSpec::new(QuantType::Nf4, true, 64)?)?;
            model.cast_for_inference(candle_core::DType::BF16)?;
        }
        Some(other) => {
            return Err(format!("weights `{other}`: expected f32, bf16, bf16-act or nf4").into())
        }
    }
    Ok(())
}
