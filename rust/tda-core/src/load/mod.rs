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
use crate::quant::{QBlocks, QType};
use candle_core::{DType, Tensor};

/// How weight matrices are wanted (vectors, such as norm gains and biases, are always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Converted (or dequantized) to a float dtype.
    Float(DType),
    /// Quantized to a block type at load; a matrix whose rows are not whole blocks stays f32.
    Quant(QType),
    /// As the file stores them: quantized blocks stay as they are, float matrices become f32.
    Stored,
}

impl From<DType> for Precision {
    fn from(d: DType) -> Self {
        Precision::Float(d)
    }
}

impl Precision {
    /// The float dtype of activations and of the float matrices.
    pub fn float_dtype(self) -> DType {
        match self {
            Precision::Float(d) => d,
            _ => DType::F32,
        }
    }

    /// `float32`, `bfloat16`, `float16`, a block type (`q8_0`) or `auto` (as stored).
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float(DType::BF16) => "bfloat16",
            Precision::Float(DType::F16) => "float16",
            Precision::Float(_) => "float32",
            Precision::Quant(q) => q.name(),
            Precision::Stored => "auto",
        }
    }
}

/// A weight matrix as a source hands it over.
pub enum WeightData {
    Float(Tensor),
    Blocks(QBlocks),
}

/// Where the model's tensors come from. Names are HF's (`model.layers.0.mlp.up_proj.weight`).
pub trait WeightSource {
    /// Whether a tensor with this name exists.
    fn contains(&self, name: &str) -> bool;
    /// The tensor, checked to have exactly `shape`, converted to `dtype`.
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// A `rows x cols` matrix as `want` says. Sources that hold no blocks read it in f32 for
    /// [`Precision::Stored`], and quantize it for [`Precision::Quant`] (ggml's reference quantizer).
    fn matrix(&self, name: &str, rows: usize, cols: usize, want: Precision) -> Result<WeightData> {
        matrix_from_tensor(self, name, rows, cols, want)
    }
    /// For random sources: the seed and the bound `a` of the uniform `[-a, a)` values of matrix
    /// `name` of `shape`, so that a backend can make them on its device ([`synthetic`]).
    fn random(&self, _name: &str, _shape: &[usize]) -> Option<(u64, f32)> {
        None
    }
}

/// [`WeightSource::matrix`] from the source's f32 tensor: converted to a float dtype, or quantized
/// (ggml's reference quantizer) when `want` is a block type that fits its rows.
pub fn matrix_from_tensor<S: WeightSource + ?Sized>(
    src: &S,
    name: &str,
    rows: usize,
    cols: usize,
    want: Precision,
) -> Result<WeightData> {
    match want {
        Precision::Quant(q) if q.fits(cols) => {
            let data = src.tensor(name, &[rows, cols], DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(WeightData::Blocks(QBlocks::quantize(q, &data, rows, cols)?))
        }
        p => Ok(WeightData::Float(src.tensor(name, &[rows, cols], p.float_dtype())?)),
    }
}
