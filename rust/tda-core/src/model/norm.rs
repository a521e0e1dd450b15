//! RMSNorm: `x / sqrt(mean(x^2) + eps) * g`, with `g = w` (Llama) or `g = 1 + w` (Gemma), in f32.

use super::linear::load_vector;
use crate::config::NormStyle;
use crate::error::Result;
use crate::kernels::{Backend, Buf};
use crate::load::WeightSource;

pub struct RmsNorm {
    /// The effective gain `g`; Gemma's `1 + w` is folded in at load time.
    gain: Buf,
    dim: usize,
    eps: f32,
}

impl RmsNorm {
    pub fn load(
        be: &dyn Backend,
        src: &dyn WeightSource,
        name: &str,
        dim: usize,
        style: NormStyle,
        eps: f64,
    ) -> Result<Self> {
        let mut gain = load_vector(src, &format!("{name}.weight"), dim)?;
        if style == NormStyle::OnePlus {
            gain.iter_mut().for_each(|g| *g += 1.0);
        }
        Ok(Self { gain: be.upload(&gain)?, dim, eps: eps as f32 })
    }

    /// Normalises `rows` rows of `x` into `out`.
    pub fn forward(&self, be: &dyn Backend, x: &Buf, rows: usize, out: &mut Buf) -> Result<()> {
        be.rms_norm(x, &self.gain, self.eps, self.dim, rows, out)
    }

    /// Normalises `rows` rows of `x` in place (rows of `dim` values: a token, or one head of one).
    pub fn forward_inplace(&self, be: &dyn Backend, x: &mut Buf, rows: usize) -> Result<()> {
        be.rms_norm_inplace(x, &self.gain, self.eps, self.dim, rows)
    }
}
