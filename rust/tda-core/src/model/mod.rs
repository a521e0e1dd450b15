//! The decoder: one implementation for every supported architecture, driven by [`ModelConfig`] flags.
//!
//! [`ModelConfig`]: crate::config::ModelConfig

pub mod attention;
pub mod decoder;
pub mod ffn;
pub mod kv_cache;
pub mod linear;
pub mod norm;
pub mod rope;
pub mod state;

pub use decoder::{BatchRow, Logits, Model};
pub use ffn::FfnMode;
pub use state::{Batch, State};

/// `log softmax(logits)[token]`.
pub fn log_prob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    ((logits[token as usize] - max) as f64 - sum.ln()) as f32
}
