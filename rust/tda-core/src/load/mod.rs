//! Loading: configuration, weights and tokenizer from a model directory.
//!
//! Weights reach the model through [`WeightSource`], so the model does not care whether they come
//! from safetensors (here) or, later, from another container.

pub mod gguf;
pub mod gguf_tokenizer;
pub mod safetensors;
pub mod synthetic;
pub mod tokenizer;

use crate::error::Result;
use candle_core::{DType, Tensor};

/// Where the model's tensors come from. Names are HF's (`model.layers.0.mlp.up_proj.weight`).
pub trait WeightSource {
    /// Whether a tensor with this name exists.
    fn contains(&self, name: &str) -> bool;
    /// The tensor, checked to have exactly `shape`, converted to `dtype`.
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// For random sources: the seed and the bound `a` of the uniform `[-a, a)` values of matrix
    /// `name` of `shape`, so that a backend can make them on its device ([`synthetic`]).
    fn random(&self, _name: &str, _shape: &[usize]) -> Option<(u64, f32)> {
        None
    }
}
