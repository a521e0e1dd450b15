//! RMSNorm: `x / sqrt(mean(x^2) + eps) * g`, with `g = w` (Llama) or `g = 1 + w` (Gemma), in f32.

use super::linear::load_vector;
use crate::config::NormStyle;
use crate::error::Result;
use crate::load::WeightSource;

pub struct RmsNorm {
    /// The effective gain `g`; Gemma's `1 + w` is folded in at load time.
    gain: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(src: &dyn WeightSource, name: &str, dim: usize, style: NormStyle, eps: f64) -> Result<Self> {
        let mut gain = load_vector(src, &format!("{name}.weight"), dim)?;
        if style == NormStyle::OnePlus {
            gain.iter_mut().for_each(|g| *g += 1.0);
        }
        Ok(Self { gain, eps: eps as f32 })
    }

    /// Normalises every row of `x` (rows of `gain.len()`) into `out`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let d = self.gain.len();
        for (xr, or) in x.chunks(d).zip(out.chunks_mut(d)) {
            let inv = self.inv_rms(xr);
            for ((o, xi), g) in or.iter_mut().zip(xr).zip(&self.gain) {
                *o = xi * inv * g;
            }
        }
    }

    /// Normalises every row of `x` in place.
    pub fn forward_inplace(&self, x: &mut [f32]) {
        let d = self.gain.len();
        for xr in x.chunks_mut(d) {
            let inv = self.inv_rms(xr);
            for (xi, g) in xr.iter_mut().zip(&self.gain) {
                *xi = *xi * inv * g;
            }
        }
    }

    fn inv_rms(&self, x: &[f32]) -> f32 {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}
