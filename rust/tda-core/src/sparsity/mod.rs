//! Prompt-chosen sparse FFN decoding.
//!
//! During the dense prefill every FFN layer records statistics of its intermediate activation
//! `A = act(x Wg^T) * (x Wu^T)` over the prompt ([`stats`]). From them a method ([`spec`]) picks
//! the neurons each layer keeps ([`mask`]); decoding then computes only those. [`calibrate`] turns
//! a target density, or a perplexity budget, into TDA thresholds.

pub mod calibrate;
pub mod corpus;
pub mod gate;
pub mod mask;
pub mod score;
pub mod spec;
pub mod stats;

pub use calibrate::{BudgetReport, LengthProfile};
pub use mask::NeuronMask;
pub use score::{Prefixed, Scored};
pub use spec::{Sparsity, Thresholds};
pub use stats::NeuronStats;
