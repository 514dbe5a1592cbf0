//! LoRA and DoRA: configuration, tensors and PEFT file format.

mod config;
mod weights;

pub(crate) use config::{check_alpha, check_shared, SharedFields};
pub use config::{LayersWire, LoraConfig, LoraConfigFile, LoraVariant, ALL_LINEAR};
pub(crate) use weights::{shapes_of, Factor};
pub use weights::{LinearShape, LoraAdapter, LoraModule, CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE};
