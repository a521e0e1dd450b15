//! tda-engine core: LLaMA-family decoders on candle, loaded from HF checkpoints, with a dense
//! prefill and an allocation-free decode loop. No Python in here; see the `tda-py` crate.
//!
//! Data flow: `load` (config, weights, tokenizer) -> `model` (prefill / decode) -> `sparsity`
//! (prompt statistics, neuron masks, calibration) -> `generate` (sampling, stop, streaming) -> bindings.

pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod load;
pub mod model;
pub mod quant;
pub mod sparsity;

pub use config::ModelConfig;
pub use engine::Engine;
pub use error::{Error, Result};
pub use generate::{FinishReason, GenerateOptions, Generation, GenerationOutput};
pub use sparsity::{Sparsity, Thresholds};
