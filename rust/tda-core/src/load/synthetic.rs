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
        // google/gemma-7b: MHA with head_dim 256 (q_dim 4096 > hidden 3072), GeGLU, tied, scaled embeddings.
        "gemma-7b" => json!({"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 3072,
               "intermediate_size": 24576, "num_hidden_layers": 28, "num_attention_heads": 16,
               "num_key_value_heads": 16, "head_dim": 256, "vocab_size": 256000, "tie_word_embeddings": true,
               "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
               "hidden_activation": "gelu_pytorch_tanh", "bos_token_id": 2, "eos_token_id": 1}),
        // google/gemma-2-2b: GQA, sandwich norms, soft-capping, alternating sliding window.
        "gemma2-2b" => json!({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 2304,
               "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
               "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000, "tie_word_embeddings": true,
               "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
               "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096,
               "bos_token_id": 2, "eos_token_id": 1}),
        _ => return None,
    })
}

pub const PRESETS: [&str; 7] =
    ["smollm2-135m", "llama-3.2-1b", "llama-2-7b", "llama-3-8b", "mistral-7b", "gemma-7b", "gemma2-2b"];

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
        let data: Vec<f32> = match self.random(name, shape) {
            None => vec![1.0; count],
            Some((seed, a)) => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                (0..count).map(|_| rng.gen_range(-a..a)).collect()
            }
        };
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?)
    }

    /// Matrices only (norm gains are 1): a seed per tensor name, and `a = sqrt(3 / fan_in)`.
    fn random(&self, name: &str, shape: &[usize]) -> Option<(u64, f32)> {
        let [_, fan_in] = *shape else { return None };
        let seed = name.bytes().fold(self.seed, |h, b| h.wrapping_mul(0x100_0000_01b3).wrapping_add(b as u64));
        Some((seed, (3.0 / fan_in as f32).sqrt()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every preset has its checkpoint's published parameter count (from the HF model cards' safetensors).
    #[test]
    fn presets_have_the_parameter_counts_of_their_checkpoints() {
        let published = [
            ("smollm2-135m", 134_515_008u64),
            ("llama-3.2-1b", 1_235_814_400),
            ("llama-2-7b", 6_738_415_616),
            ("llama-3-8b", 8_030_261_248),
            ("mistral-7b", 7_241_732_096),
            ("gemma-7b", 8_537_680_896),
            ("gemma2-2b", 2_614_341_888),
        ];
        assert_eq!(published.len(), PRESETS.len());
        for (name, want) in published {
            let c = preset_config(name, None).unwrap();
            let (d, q, kv, n) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
            let norms = if c.sandwich_norm { 4 } else { 2 };
            let layer = d * q + 2 * d * kv + q * d + 3 * d * n + norms * d;
            let embeddings = c.vocab_size * d * if c.tie_word_embeddings { 1 } else { 2 };
            assert_eq!((embeddings + c.num_layers * layer + d) as u64, want, "{name}");
        }
        assert_eq!(preset_config("gemma2-2b", Some(3)).unwrap().num_layers, 3);
        assert!(preset_config("gpt-2", None).is_err());
    }
}
