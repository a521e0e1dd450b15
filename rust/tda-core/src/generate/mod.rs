//! Generation: sampling, stop conditions, incremental detokenisation, and the token loop.

pub mod detok;
pub mod sampler;
pub mod session;
pub mod stop;

pub use sampler::SamplingParams;
pub use session::{FinishReason, GenerateOptions, Generation, GenerationDefaults, GenerationOutput, Timings};
