//! LoRA and DoRA: configuration, tensors and PEFT file format.

mod config;
mod weights;

pub use crate::adapter_tensors::{LinearShape, CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE};
pub use crate::peft_config::{LayersWire, ALL_LINEAR};
pub use config::{LoraConfig, LoraConfigFile, LoraVariant};
pub use weights::{LoraAdapter, LoraModule};
