//! Synthetic models for benchmarks: the exact shapes of named checkpoints, with random weights.
//! Decode speed depends on shapes and dtypes only, so these stand in for real models that cannot
//! be downloaded here.

use super::WeightSource;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// `(name, HF config.json fields)` of the shapes the benchmarks know.
fn preset_json(name: &str) -> Option<Value> {
    let llama = |hidden: usize, inter: usize, layers: usize, heads: usize, kv: usize, vocab: usize, tie: bool| {
        json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
               "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
               "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tie,
               "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2})
    };
    Some(match name {
        "smollm2-135m" => llama(576, 1536, 30, 9, 3, 49152, true),
        "llama-3.2-1b" => llama(2048, 8192, 16, 32, 8, 128256, true),
        "llama-2-7b" => llama(4096, 11008, 32, 32, 32, 32000, false),
        "llama-3-8b" => llama(4096, 14336, 32, 32, 8, 128256, false),
        "mistral-7b" => {
            let mut v = llama(4096, 14336, 32, 32, 8, 32000, false);
            v["architectures"] = json!(["MistralForCausalLM"]);
            v["model_type"] = json!("mistral");
            v
        }
        _ => return None,
    })
}

pub const PRESETS: [&str; 5] = ["smollm2-135m", "llama-3.2-1b", "llama-2-7b", "llama-3-8b", "mistral-7b"];

/// The config of preset `name`, optionally with only `layers` decoder layers.
pub fn preset_config(name: &str, layers: Option<usize>) -> Result<ModelConfig> {
    let mut v = preset_json(name)
        .ok_or_else(|| Error::arg(format!("unknown preset '{name}'; known: {}", PRESETS.join(", "))))?;
    if let Some(l) = layers {
        v["num_hidden_layers"] = json!(l);
    }
    ModelConfig::from_hf_json(&v.to_string(), &format!("preset {name}"))
}

/// Random weights: uniform with the variance of `1 / fan_in` for matrices, 1 for norm gains, so
/// that activations keep a realistic scale through the layers. Deterministic per tensor name.
pub struct RandomWeights {
    pub seed: u64,
}

impl WeightSource for RandomWeights {
    fn contains(&self, name: &str) -> bool {
        !name.starts_with("lm_head") && !name.ends_with(".bias") && !name.contains("q_norm") && !name.contains("k_norm")
    }

    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let data: Vec<f32> = if shape.len() == 1 {
            vec![1.0; count]
        } else {
            let fan_in = *shape.last().unwrap_or(&1) as f32;
            let a = (3.0 / fan_in).sqrt();
            let seed = name.bytes().fold(self.seed, |h, b| h.wrapping_mul(0x100_0000_01b3).wrapping_add(b as u64));
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..count).map(|_| rng.gen_range(-a..a)).collect()
        };
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?)
    }
}
