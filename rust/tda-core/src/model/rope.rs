//! Rotary position embeddings, HF's "rotate half" layout: for i < d/2,
//! `x'[i] = x[i] cos - x[i+d/2] sin` and `x'[i+d/2] = x[i+d/2] cos + x[i] sin`, angle `pos * inv_freq[i]`.

use crate::config::{RopeConfig, RopeScaling};
use crate::error::Result;
use crate::kernels::{Backend, Buf};

/// The per-pair inverse frequencies, after scaling, as HF computes them.
pub fn inv_freq(cfg: &RopeConfig, head_dim: usize) -> Vec<f32> {
    let base: Vec<f64> = (0..head_dim / 2).map(|i| 1.0 / cfg.theta.powf((2 * i) as f64 / head_dim as f64)).collect();
    match cfg.scaling {
        RopeScaling::None => base.iter().map(|&f| f as f32).collect(),
        RopeScaling::Linear { factor } => base.iter().map(|&f| (f / factor) as f32).collect(),
        RopeScaling::Factors(ref factors) => base.iter().zip(factors).map(|(&f, &k)| (f / k) as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let g = if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    g as f32
                })
                .collect()
        }
    }
}

/// cos/sin for positions `0..len`, `head_dim / 2` values per position, where the backend reads them.
pub struct RopeTable {
    pub cos: Buf,
    pub sin: Buf,
}

impl RopeTable {
    pub fn new(be: &dyn Backend, cfg: &RopeConfig, head_dim: usize, len: usize) -> Result<Self> {
        let inv = inv_freq(cfg, head_dim);
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for &f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self { cos: be.upload(&cos)?, sin: be.upload(&sin)? })
    }
}
