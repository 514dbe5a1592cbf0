//! LoRA and DoRA: configuration, tensors and PEFT file format.

mod config;
mod weights;

pub use crate::peft_config::{LayersWire, ALL_LINEAR};
pub use config::{LoraConfig, LoraConfigFile, LoraVariant};
pub(crate) use weights::{shapes_of, Factor};
pub use weights::{LinearShape, LoraAdapter, LoraModule, CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE};
