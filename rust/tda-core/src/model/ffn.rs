//! The gated feed-forward block, `y = (act(x Wg^T) * (x Wu^T)) Wd^T`, and its sparse variant.
//!
//! `A = act(x Wg^T) * (x Wu^T)` is the intermediate activation. The down projection is stored
//! transposed (`Wd^T`, `n x d`), so neuron `j` owns row `j` of `Wg`, `Wu` and `Wd^T`:
//!
//! - many rows (prefill, scoring): matrix products; [`FfnMode::Observe`] adds `A`'s statistics to
//!   the forward's accumulator, [`FfnMode::Sparse`] zeroes the skipped neurons' columns of `A`;
//! - one row (decode): the backend's fused kernel reads the three rows of each kept neuron and
//!   nothing else.

use super::linear::{load_vector, Linear};
use crate::config::{Activation, ModelConfig};
use crate::error::Result;
use crate::kernels::{Backend, Buf, FfnScratch, FfnWeights, Matrix};
use crate::load::WeightSource;
use candle_core::DType;

/// What the FFN does besides computing its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnMode {
    /// Every neuron.
    Dense,
    /// Every neuron, adding the activations' statistics to the state's [`NeuronStats`] (the prompt).
    ///
    /// [`NeuronStats`]: crate::sparsity::NeuronStats
    Observe,
    /// Only the neurons the state's [`NeuronMask`] keeps.
    ///
    /// [`NeuronMask`]: crate::sparsity::NeuronMask
    Sparse,
}

pub struct Ffn {
    pub gate: Linear,
    pub up: Linear,
    /// `Wd^T`, `(intermediate, hidden)`.
    pub down_t: Matrix,
    pub down_bias: Option<Buf>,
    pub act: Activation,
}

/// Buffers the FFN uses, borrowed from the run state.
pub struct FfnBuffers<'a> {
    /// `rows x intermediate`: the activation `A` afterwards.
    pub a: &'a mut Buf,
    pub u: &'a mut Buf,
    /// This layer's kept neurons where the backend reads them.
    pub scratch: &'a mut FfnScratch,
    /// The forward's statistics accumulator and this layer's offset in it.
    pub stats: &'a mut Buf,
    pub stats_offset: usize,
}

impl Ffn {
    pub fn load(be: &dyn Backend, src: &dyn WeightSource, p: &str, cfg: &ModelConfig, dtype: DType) -> Result<Self> {
        let (d, n, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let name = format!("{p}.down_proj.weight");
        // Wd (d x n) is read once from the source and handed over transposed.
        let down_t = match src.random(&name, &[d, n]).and_then(|(seed, a)| be.random_matrix(n, d, dtype, seed, a)) {
            Some(m) => m?,
            None => be.matrix(src.tensor(&name, &[d, n], dtype)?.t()?.contiguous()?)?,
        };
        let down_bias = match b {
            true => Some(be.upload(&load_vector(src, &format!("{p}.down_proj.bias"), d)?)?),
            false => None,
        };
        Ok(Self {
            gate: Linear::load(be, src, &format!("{p}.gate_proj"), d, n, b, dtype)?,
            up: Linear::load(be, src, &format!("{p}.up_proj"), d, n, b, dtype)?,
            down_t,
            down_bias,
            act: cfg.act,
        })
    }

    pub fn neurons(&self) -> usize {
        self.gate.out_dim
    }

    /// Bytes of weights of one neuron (its rows of `Wg`, `Wu` and `Wd^T`).
    pub fn bytes_per_neuron(&self) -> usize {
        3 * self.gate.in_dim * self.down_t.dtype.size_in_bytes()
    }

    pub fn weights(&self) -> FfnWeights<'_> {
        FfnWeights {
            gate: &self.gate.weight,
            up: &self.up.weight,
            down_t: &self.down_t,
            gate_bias: self.gate.bias.as_ref(),
            up_bias: self.up.bias.as_ref(),
            act: self.act,
        }
    }

    /// `rows` tokens of `x` -> `out`.
    pub fn forward(
        &self,
        be: &dyn Backend,
        x: &Buf,
        rows: usize,
        mode: FfnMode,
        b: FfnBuffers<'_>,
        out: &mut Buf,
    ) -> Result<()> {
        let (n, d) = (self.neurons(), self.gate.in_dim);
        if rows == 1 && mode != FfnMode::Observe {
            be.ffn_decode(&self.weights(), mode == FfnMode::Sparse, b.scratch, x, out)?;
            if let Some(bias) = &self.down_bias {
                be.add(out, bias, d)?;
            }
            return Ok(());
        }
        self.gate.forward(be, x, rows, b.a)?;
        self.up.forward(be, x, rows, b.u)?;
        be.gate_act(self.act, b.a, b.u, rows * n)?;
        match mode {
            FfnMode::Observe => be.observe(b.a, rows, n, b.stats, b.stats_offset)?,
            FfnMode::Sparse => be.mask_cols(b.a, rows, n, b.scratch)?,
            FfnMode::Dense => {}
        }
        be.matmul(b.a, rows, &self.down_t, self.down_bias.as_ref(), out)
    }
}
