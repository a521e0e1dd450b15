//! `y = x W^T + b`: the backend picks the product (a GEMM for many rows, a GEMV for one).

use crate::error::Result;
use crate::kernels::{Backend, Buf, Matrix};
use crate::load::{Precision, WeightData, WeightSource};
use candle_core::DType;

pub struct Linear {
    /// `(out_dim, in_dim)`, in the engine dtype.
    pub weight: Matrix,
    pub bias: Option<Buf>,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl Linear {
    pub fn load(
        be: &dyn Backend,
        src: &dyn WeightSource,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        dtype: Precision,
    ) -> Result<Self> {
        let weight = load_matrix(be, src, &format!("{name}.weight"), out_dim, in_dim, dtype)?;
        let bias = if bias { Some(be.upload(&load_vector(src, &format!("{name}.bias"), out_dim)?)?) } else { None };
        Ok(Self { weight, bias, in_dim, out_dim })
    }

    /// `x` holds `rows` rows of `in_dim`; `out` receives `rows` rows of `out_dim`.
    pub fn forward(&self, be: &dyn Backend, x: &Buf, rows: usize, out: &mut Buf) -> Result<()> {
        be.linear(&self.weight, self.bias.as_ref(), x, rows, out)
    }

    /// The weight and bias, as the backend's multi-projection call takes them.
    pub fn parts(&self) -> (&Matrix, Option<&Buf>) {
        (&self.weight, self.bias.as_ref())
    }
}

/// A `rows x cols` weight matrix in the backend's memory: made on the device when the source is
/// random, the precision a float dtype and the backend can, else read from the source as `want`
/// says and handed over.
pub fn load_matrix(
    be: &dyn Backend,
    src: &dyn WeightSource,
    name: &str,
    rows: usize,
    cols: usize,
    want: Precision,
) -> Result<Matrix> {
    if let (Some((seed, scale)), Precision::Float(dtype)) = (src.random(name, &[rows, cols]), want) {
        if let Some(m) = be.random_matrix(rows, cols, dtype, seed, scale) {
            return m;
        }
    }
    match src.matrix(name, rows, cols, want)? {
        WeightData::Float(t) => be.matrix(t),
        WeightData::Blocks(b) => be.quantized(rows, cols, b),
    }
}

/// A 1-D parameter (norm weight, bias) as f32.
pub fn load_vector(src: &dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>> {
    Ok(src.tensor(name, &[len], DType::F32)?.to_vec1::<f32>()?)
}
