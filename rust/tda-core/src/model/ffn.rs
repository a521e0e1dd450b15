//! The gated feed-forward block, `y = (act(x Wg^T) * (x Wu^T)) Wd^T`.
//!
//! This is the one place a sparse variant plugs in: it sees the intermediate activation
//! `act(x Wg^T) * (x Wu^T)` of every token and decides which neurons decode computes.

use super::linear::Linear;
use crate::config::{Activation, ModelConfig};
use crate::error::Result;
use crate::load::WeightSource;
use candle_core::DType;

pub struct Ffn {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub act: Activation,
}

impl Ffn {
    pub fn load(src: &dyn WeightSource, p: &str, cfg: &ModelConfig, dtype: DType) -> Result<Self> {
        let (d, n, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate: Linear::load(src, &format!("{p}.gate_proj"), d, n, b, dtype)?,
            up: Linear::load(src, &format!("{p}.up_proj"), d, n, b, dtype)?,
            down: Linear::load(src, &format!("{p}.down_proj"), n, d, b, dtype)?,
            act: cfg.act,
        })
    }

    /// `rows` tokens of `x` -> `out`; `a` and `u` are `rows x intermediate` scratch, and `a` holds the
    /// intermediate activation afterwards.
    pub fn forward(&self, x: &[f32], rows: usize, a: &mut [f32], u: &mut [f32], out: &mut [f32]) -> Result<()> {
        let n = self.gate.out_dim;
        let (a, u) = (&mut a[..rows * n], &mut u[..rows * n]);
        self.gate.forward(x, rows, a)?;
        self.up.forward(x, rows, u)?;
        let act = self.act;
        for (ai, ui) in a.iter_mut().zip(u.iter()) {
            *ai = activate(act, *ai) * ui;
        }
        self.down.forward(a, rows, out)
    }
}

#[inline]
pub fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2 / pi)
            0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
        }
    }
}
