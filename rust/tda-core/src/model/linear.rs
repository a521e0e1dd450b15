//! `y = x W^T + b`: a GEMM for a batch of rows (prefill), the decode kernel for a single row.

use crate::error::Result;
use crate::kernels::{
    self,
    cpu::{gemv, gemv_many, on_huge_pages, with_weights},
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

    /// One token through three projections of the same input (q, k and v) in one parallel dispatch.
    pub fn forward3(ps: [&Linear; 3], x: &[f32], outs: [&mut [f32]; 3]) -> Result<()> {
        let d = ps[0].in_dim;
        let [o0, o1, o2] = outs;
        let (o0, o1, o2) = (&mut o0[..ps[0].out_dim], &mut o1[..ps[1].out_dim], &mut o2[..ps[2].out_dim]);
        with_weights(&ps[0].weight, |w0| {
            with_weights(&ps[1].weight, |w1| {
                with_weights(&ps[2].weight, |w2| {
                    gemv_many(d, &x[..d], &mut [(w0, &mut *o0), (w1, &mut *o1), (w2, &mut *o2)])
                })
            })
        })???;
        for (p, o) in ps.iter().zip([o0, o1, o2]) {
            p.add_bias(o);
        }
        Ok(())
    }

    fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in out.chunks_mut(self.out_dim) {
                for (o, bi) in row.iter_mut().zip(b) {
                    *o += bi;
                }
            }
        }
    }

    /// `x` holds `rows` rows of `in_dim`; `out` receives `rows` rows of `out_dim`.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
        let (x, out) = (&x[..rows * self.in_dim], &mut out[..rows * self.out_dim]);
        if rows == 1 {
            with_weights(&self.weight, |w| gemv(w, self.in_dim, x, out))?;
        } else {
            matmul(x, rows, &self.weight, true, out)?;
        }
        self.add_bias(out);
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
