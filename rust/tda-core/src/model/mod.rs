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

pub use decoder::{Logits, Model};
pub use ffn::FfnMode;
pub use state::State;
