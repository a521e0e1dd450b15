//! `y = x W^T + b`: a GEMM for a batch of rows (prefill), the decode kernel for a single row.

use crate::error::Result;
use crate::kernels::{
    self,
    cpu::{gemv, on_huge_pages, with_weights},
};
use crate::load::WeightSource;
use candle_core::{DType, Tensor};

pub struct Linear {
    /// `(out_dim, in_dim)`, in the engine dtype.
    pub weight: Tensor,
    pub bias: Option<Vec<f32>>,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl Linear {
    pub fn load(
        src: &dyn WeightSource,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        dtype: DType,
    ) -> Result<Self> {
        let weight = on_huge_pages(src.tensor(&format!("{name}.weight"), &[out_dim, in_dim], dtype)?)?;
        let bias = if bias { Some(load_vector(src, &format!("{name}.bias"), out_dim)?) } else { None };
        Ok(Self { weight, bias, in_dim, out_dim })
    }

    /// `x` holds `rows` rows of `in_dim`; `out` receives `rows` rows of `out_dim`.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
        let (x, out) = (&x[..rows * self.in_dim], &mut out[..rows * self.out_dim]);
        if rows == 1 {
            with_weights(&self.weight, |w| gemv(w, self.in_dim, x, out))?;
        } else {
            matmul(x, rows, &self.weight, true, out)?;
        }
        if let Some(b) = &self.bias {
            for row in out.chunks_mut(self.out_dim) {
                for (o, bi) in row.iter_mut().zip(b) {
                    *o += bi;
                }
            }
        }
        Ok(())
    }
}

/// Prefill's GEMM, `out = x W^T` (`transposed`, `W` is `out x in`) or `out = x W` (`W` is
/// `in x out`), in f32 with the weights in their own dtype ([`crate::kernels::cpu::matmul`]).
pub fn matmul(x: &[f32], rows: usize, w: &Tensor, transposed: bool, out: &mut [f32]) -> Result<()> {
    let (a, b) = w.dims2()?;
    with_weights(w, |ws| kernels::cpu::matmul(x, rows, ws, a, b, transposed, out))
}

/// A 1-D parameter (norm weight, bias) as f32.
pub fn load_vector(src: &dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>> {
    Ok(src.tensor(name, &[len], DType::F32)?.to_vec1::<f32>()?)
}
