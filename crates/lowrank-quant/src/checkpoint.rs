//! Pre-quantized 4-bit checkpoints in the bitsandbytes serialization transformers uses, and
//! the `quantization_config` of config.json.
//!
//! A quantized weight `<m>.weight` is recognized by its `<m>.weight.quant_state.bitsandbytes__nf4`
//! (or `__fp4`) tensor; its siblings (`absmax`, `quant_map`, `nested_absmax`,
//! `nested_quant_map`) are consumed with it (see [`crate::qtensor`]). Every other tensor is
//! returned as a plain candle tensor. Files are written with `{"format": "pt"}` metadata like
//! transformers' `save_pretrained`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::codebook::QuantType;
use crate::error::{Error, Result};
use crate::qtensor::{Quantized4Bit, RawDtype, RawTensor, RawTensorRef};

const QS_MARK: &str = ".quant_state.bitsandbytes__";
const SIBLINGS: [&str; 4] = ["absmax", "quant_map", "nested_absmax", "nested_quant_map"];

/// The tensors of a checkpoint: 4-bit weights (by weight name) and the rest.
#[derive(Debug, Default)]
pub struct BnbCheckpoint {
    pub quantized: BTreeMap<String, Quantized4Bit>,
    pub tensors: BTreeMap<String, Tensor>,
}

impl BnbCheckpoint {
    /// Read one safetensors file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)?;
        let views: HashMap<String, TensorView<'_>> = st.tensors().into_iter().collect();
        let get = |name: &str| -> Option<RawTensorRef<'_>> {
            let v = views.get(name)?;
            // Other dtypes were rejected, naming the tensor, before the lookup.
            let dtype = match v.dtype() {
                Dtype::U8 => RawDtype::U8,
                _ => RawDtype::F32,
            };
            Some(RawTensorRef {
                dtype,
                shape: v.shape(),
                data: v.data(),
            })
        };
        let mut out = BnbCheckpoint::default();
        let mut consumed = std::collections::HashSet::new();
        for name in views.keys() {
            let Some((weight, _kind)) = name.split_once(QS_MARK) else {
                continue;
            };
            for (k, v) in &views {
                if let Some(rest) = k.strip_prefix(weight) {
                    let rest = rest.strip_prefix('.').unwrap_or(rest);
                    if (SIBLINGS.contains(&rest) || rest.is_empty())
                        && !matches!(v.dtype(), Dtype::U8 | Dtype::F32)
                    {
                        return Err(Error::tensor(
                            k.clone(),
                            format!("expected uint8 or float32, got {:?}", v.dtype()),
                        ));
                    }
                }
            }
            let q = Quantized4Bit::from_bnb_tensors(weight, get)?;
            consumed.insert(weight.to_string());
            consumed.insert(name.clone());
            for s in SIBLINGS {
                consumed.insert(format!("{weight}.{s}"));
            }
            out.quantized.insert(weight.to_string(), q);
        }
        for (name, view) in &views {
            if consumed.contains(name) {
                continue;
            }
            let t = candle_core::safetensors::Load::load(view, &Device::Cpu)?;
            out.tensors.insert(name.clone(), t);
        }
        Ok(out)
    }

    /// Write one safetensors file: quantized weights in the bitsandbytes layout, the rest as is.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut all: Vec<(String, Out<'_>)> = Vec::new();
        for (name, q) in &self.quantized {
            all.extend(
                q.to_bnb_tensors(name)
                    .into_iter()
                    .map(|(n, r)| (n, Out::Raw(r))),
            );
        }
        for (name, t) in &self.tensors {
            all.push((name.clone(), Out::Candle(t)));
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(all, Some(meta), path)?;
        Ok(())
    }
}

/// A tensor to write: a quantized part or a plain candle tensor (any dtype).
enum Out<'a> {
    Raw(RawTensor),
    Candle(&'a Tensor),
}

impl safetensors::View for Out<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            Out::Raw(r) => r.dtype(),
            Out::Candle(t) => safetensors::View::dtype(*t),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Out::Raw(r) => &r.shape,
            Out::Candle(t) => t.dims(),
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Out::Raw(r) => std::borrow::Cow::Borrowed(&r.data),
            Out::Candle(t) => safetensors::View::data(*t),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            Out::Raw(r) => r.data.len(),
            Out::Candle(t) => safetensors::View::data_len(*t),
        }
    }
}

impl RawTensor {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            RawDtype::U8 => Dtype::U8,
            RawDtype::F32 => Dtype::F32,
        }
    }
}

impl safetensors::View for RawTensor {
    fn dtype(&self) -> Dtype {
        RawTensor::dtype(self)
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// transformers' `BitsAndBytesConfig` as saved under `quantization_config` in config.json.
/// Unknown fields are kept (and written back) in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    #[serde(rename = "_load_in_4bit", default)]
    pub load_in_4bit_private: bool,
    #[serde(rename = "_load_in_8bit", default)]
    pub load_in_8bit_private: bool,
    #[serde(default = "default_compute_dtype")]
    pub bnb_4bit_compute_dtype: String,
    #[serde(default = "default_storage")]
    pub bnb_4bit_quant_storage: String,
    #[serde(default = "default_quant_type")]
    pub bnb_4bit_quant_type: String,
    #[serde(default)]
    pub bnb_4bit_use_double_quant: bool,
    #[serde(default)]
    pub llm_int8_enable_fp32_cpu_offload: bool,
    #[serde(default)]
    pub llm_int8_has_fp16_weight: bool,
    #[serde(default)]
    pub llm_int8_skip_modules: Option<Vec<String>>,
    #[serde(default = "default_threshold")]
    pub llm_int8_threshold: f64,
    #[serde(default)]
    pub load_in_4bit: bool,
    #[serde(default)]
    pub load_in_8bit: bool,
    pub quant_method: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_compute_dtype() -> String {
    "float32".into()
}
fn default_storage() -> String {
    "uint8".into()
}
fn default_quant_type() -> String {
    "fp4".into()
}
fn default_threshold() -> f64 {
    6.0
}

impl QuantizationConfig {
    /// The config transformers writes for `BitsAndBytesConfig(load_in_4bit=True, ...)`.
    pub fn for_4bit(kind: QuantType, double_quant: bool, compute_dtype: &str) -> Self {
        QuantizationConfig {
            load_in_4bit_private: true,
            load_in_8bit_private: false,
            bnb_4bit_compute_dtype: compute_dtype.into(),
            bnb_4bit_quant_storage: "uint8".into(),
            bnb_4bit_quant_type: kind.as_str().into(),
            bnb_4bit_use_double_quant: double_quant,
            llm_int8_enable_fp32_cpu_offload: false,
            llm_int8_has_fp16_weight: false,
            llm_int8_skip_modules: None,
            llm_int8_threshold: 6.0,
            load_in_4bit: true,
            load_in_8bit: false,
            quant_method: "bitsandbytes".into(),
            extra: Default::default(),
        }
    }

    /// The `quantization_config` of a parsed config.json, if any. Errors name the field.
    pub fn from_config(config: &serde_json::Value, source: &str) -> Result<Option<Self>> {
        let Some(qc) = config.get("quantization_config") else {
            return Ok(None);
        };
        let qc: Self = serde_json::from_value(qc.clone())
            .map_err(|e| Error::field(source, "quantization_config", e.to_string()))?;
        if qc.quant_method != "bitsandbytes" {
            return Err(Error::field(
                source,
                "quantization_config.quant_method",
                format!(
                    "`{}` is not supported (only `bitsandbytes`)",
                    qc.quant_method
                ),
            ));
        }
        if !(qc.load_in_4bit || qc.load_in_4bit_private) {
            return Err(Error::field(
                source,
                "quantization_config.load_in_4bit",
                "only 4-bit bitsandbytes checkpoints are supported",
            ));
        }
        qc.quant_type().map_err(|_| {
            Error::field(
                source,
                "quantization_config.bnb_4bit_quant_type",
                format!("expected `nf4` or `fp4`, got `{}`", qc.bnb_4bit_quant_type),
            )
        })?;
        Ok(Some(qc))
    }

    /// Read config.json's `quantization_config`.
    pub fn read(config_json: &Path) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(config_json).map_err(|source| Error::Io {
            path: config_json.to_path_buf(),
            source,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            name: config_json.display().to_string(),
            source,
        })?;
        Self::from_config(&v, &config_json.display().to_string())
    }

    pub fn quant_type(&self) -> Result<QuantType> {
        QuantType::parse(&self.bnb_4bit_quant_type)
    }

    /// Set `quantization_config` in a config.json object.
    pub fn insert_into(&self, config: &mut serde_json::Value) -> Result<()> {
        let v = serde_json::to_value(self).map_err(|source| Error::Json {
            name: "quantization_config".into(),
            source,
        })?;
        match config.as_object_mut() {
            Some(obj) => {
                obj.insert("quantization_config".into(), v);
                Ok(())
            }
            None => Err(Error::field(
                "config.json",
                "quantization_config",
                "config is not an object",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let x: Vec<f32> = (0..3 * 100)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let mut ck = BnbCheckpoint::default();
        ck.quantized.insert(
            "model.layers.0.mlp.down_proj.weight".into(),
            Quantized4Bit::quantize(&x, &[3, 100], QuantType::Nf4, 64, true).unwrap(),
        );
        ck.quantized.insert(
            "model.layers.0.mlp.up_proj.weight".into(),
            Quantized4Bit::quantize(&x, &[100, 3], QuantType::Fp4, 128, false).unwrap(),
        );
        let norm = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        ck.tensors.insert("model.norm.weight".into(), norm.clone());
        ck.write(&path).unwrap();
        let back = BnbCheckpoint::read(&path).unwrap();
        assert_eq!(back.quantized, ck.quantized);
        assert_eq!(back.tensors.len(), 1);
        let n = back.tensors["model.norm.weight"].to_vec1::<f32>().unwrap();
        assert_eq!(n, vec![1.0, 2.0, 3.0]);
        // Plain tensors keep their dtype.
        ck.tensors.insert(
            "model.embed.weight".into(),
            norm.to_dtype(candle_core::DType::BF16).unwrap(),
        );
        ck.write(&path).unwrap();
        let back = BnbCheckpoint::read(&path).unwrap();
        assert_eq!(
            back.tensors["model.embed.weight"].dtype(),
            candle_core::DType::BF16
        );
        assert_eq!(back.quantized, ck.quantized);
    }

    #[test]
    fn config_round_trip_and_errors() {
        let qc = QuantizationConfig::for_4bit(QuantType::Nf4, true, "float32");
        let mut cfg = serde_json::json!({"model_type": "llama"});
        qc.insert_into(&mut cfg).unwrap();
        let back = QuantizationConfig::from_config(&cfg, "config.json")
            .unwrap()
            .unwrap();
        assert_eq!(back, qc);
        assert_eq!(back.quant_type().unwrap(), QuantType::Nf4);
        assert!(QuantizationConfig::from_config(&serde_json::json!({}), "c")
            .unwrap()
            .is_none());
        let mut bad = cfg.clone();
        bad["quantization_config"]["bnb_4bit_quant_type"] = "int4".into();
        let err = QuantizationConfig::from_config(&bad, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bnb_4bit_quant_type") && err.contains("int4"),
            "{err}"
        );
        let mut bad = cfg.clone();
        bad["quantization_config"]["quant_method"] = "gptq".into();
        let err = QuantizationConfig::from_config(&bad, "config.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("quant_method"), "{err}");
    }
}
