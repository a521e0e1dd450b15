//! HF safetensors checkpoints: `model.safetensors`, or shards listed by `model.safetensors.index.json`.

use super::WeightSource;
use crate::error::{parse_json, read_text, Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct SafetensorsWeights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Tensor name -> index into `files`.
    routing: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Opens the checkpoint in `dir`, memory-mapping every shard and validating its header.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths: Vec<PathBuf> = if index.exists() {
            let json: serde_json::Value = parse_json(&read_text(&index, "weight index")?, &index)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::model(format!("{}: missing 'weight_map'", index.display())))?;
            let mut shards: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
            shards.sort();
            shards.dedup();
            shards
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::NotFound(format!(
                "no model.safetensors or model.safetensors.index.json in {}",
                dir.display()
            )));
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for path in paths {
            if !path.exists() {
                return Err(Error::not_found(&path, "weight shard"));
            }
            // SAFETY: the file is mapped read-only; the engine never writes to it. Like every
            // mmap-based loader, we rely on the file not being truncated while the engine loads.
            let st = unsafe { MmapedSafetensors::new(&path) }
                .map_err(|e| Error::model(format!("corrupt or truncated safetensors file {}: {e}", path.display())))?;
            for (name, _) in st.tensors() {
                routing.insert(name, files.len());
            }
            files.push((path, st));
        }
        Ok(Self { files, routing })
    }
}

impl WeightSource for SafetensorsWeights {
    fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let &i =
            self.routing.get(name).ok_or_else(|| Error::model(format!("missing tensor '{name}' in the checkpoint")))?;
        let (path, st) = &self.files[i];
        let view = st.get(name).map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
        if view.shape() != shape {
            return Err(Error::model(format!(
                "tensor '{name}' in {} has shape {:?}, expected {shape:?}",
                path.display(),
                view.shape()
            )));
        }
        let t = st
            .load(name, &Device::Cpu)
            .map_err(|e| Error::model(format!("cannot read tensor '{name}' from {}: {e}", path.display())))?;
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(Error::model(format!(
                "tensor '{name}' in {} has dtype {:?}; expected a floating-point type",
                path.display(),
                t.dtype()
            )));
        }
        Ok(t.to_dtype(dtype)?)
    }
}
