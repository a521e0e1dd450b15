//! Compute kernels. `cpu` holds the decode-time matrix-vector products and the small vector helpers
//! the model uses; prefill's matrix products go through candle's GEMM (see `model::linear`).

pub mod cpu;
