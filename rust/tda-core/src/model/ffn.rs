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
use crate::load::{Precision, WeightData, WeightSource};
use crate::quant::{QBlocks, QType};
use crate::sparsity::gate::GateHistogram;
use candle_core::{Device, Tensor};

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
    /// Every neuron, adding the gate values to the state's [`GateHistogram`] (gate calibration).
    ///
    /// [`GateHistogram`]: crate::sparsity::gate::GateHistogram
    Histogram,
}

impl FfnMode {
    /// Whether every row's FFN output is needed besides the logits (statistics are collected).
    pub fn observes(self) -> bool {
        matches!(self, FfnMode::Observe | FfnMode::Histogram)
    }
}

pub struct Ffn {
    pub gate: Linear,
    pub up: Linear,
    /// `Wd^T`, `(intermediate, hidden)`: for quantized weights a copy requantized along the
    /// hidden size ([`sparse_down_type`]), read by sparse decoding only.
    pub down_t: Matrix,
    /// `Wd` as stored, `(hidden, intermediate)`, for quantized weights: dense products read it.
    pub down: Option<Matrix>,
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
    /// Gate calibration's histogram ([`FfnMode::Histogram`]) and this layer's index.
    pub hist: Option<&'a mut GateHistogram>,
    pub layer: usize,
}

/// The block type of the transposed down projection of a quantized FFN whose `Wd` is stored as
/// `stored`, with rows of `hidden` values. Requantizing along the other axis changes the weights;
/// `TDA_ENGINE_SPARSE_DOWN` chooses how (BENCHMARKS.md measures both): `q8_0` (the default: the
/// smallest change, 8 bits per weight), or `same` (the stored type where rows of `hidden` values
/// are whole blocks of it, else llama.cpp's fallback for such rows: Q4_K -> Q5_0, Q5_K -> Q5_1,
/// Q6_K, Q3_K and Q2_K -> Q8_0 / Q4_0).
pub fn sparse_down_type(stored: QType, hidden: usize) -> QType {
    let same = std::env::var("TDA_ENGINE_SPARSE_DOWN").is_ok_and(|v| v.eq_ignore_ascii_case("same"));
    if !same {
        return QType::Q8_0;
    }
    if stored.fits(hidden) {
        return stored;
    }
    match stored {
        QType::Q4K => QType::Q5_0,
        QType::Q5K => QType::Q5_1,
        QType::Q2K | QType::Q3K => QType::Q4_0,
        _ => QType::Q8_0,
    }
}

impl Ffn {
    pub fn load(be: &dyn Backend, src: &dyn WeightSource, p: &str, cfg: &ModelConfig, want: Precision) -> Result<Self> {
        let (d, n, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let name = format!("{p}.down_proj.weight");
        // Wd (d x n) is read once from the source; float weights are handed over transposed,
        // quantized ones as stored plus a transposed, requantized copy.
        let random = match (src.random(&name, &[d, n]), want) {
            (Some((seed, a)), Precision::Float(dt)) => be.random_matrix(n, d, dt, seed, a),
            _ => None,
        };
        let (down_t, down) = match random {
            Some(m) => (m?, None),
            None => match src.matrix(&name, d, n, want)? {
                WeightData::Float(t) => (be.matrix(t.t()?.contiguous()?)?, None),
                WeightData::Blocks(wd) => {
                    let mut f = vec![0f32; d * n];
                    wd.slice().dequantize(0, &mut f);
                    let ft = Tensor::from_vec(f, (d, n), &Device::Cpu)?.t()?.contiguous()?;
                    let q = sparse_down_type(wd.qtype(), d);
                    let down_t = match q.fits(d) {
                        true => {
                            be.quantized(n, d, QBlocks::quantize(q, &ft.flatten_all()?.to_vec1::<f32>()?, n, d)?)?
                        }
                        false => be.matrix(ft)?,
                    };
                    (down_t, Some(be.quantized(d, n, wd)?))
                }
            },
        };
        let down_bias = match b {
            true => Some(be.upload(&load_vector(src, &format!("{p}.down_proj.bias"), d)?)?),
            false => None,
        };
        Ok(Self {
            gate: Linear::load(be, src, &format!("{p}.gate_proj"), d, n, b, want)?,
            up: Linear::load(be, src, &format!("{p}.up_proj"), d, n, b, want)?,
            down_t,
            down,
            down_bias,
            act: cfg.act,
        })
    }

    pub fn neurons(&self) -> usize {
        self.gate.out_dim
    }

    /// Bytes of weights sparse decoding reads per kept neuron (its rows of `Wg`, `Wu` and `Wd^T`).
    pub fn bytes_per_neuron(&self) -> usize {
        self.gate.weight.row_bytes() + self.up.weight.row_bytes() + self.down_t.row_bytes()
    }

    /// Bytes of weights dense decoding reads (`Wd` as stored where it is kept).
    pub fn dense_bytes(&self) -> usize {
        let down = self.down.as_ref().unwrap_or(&self.down_t);
        self.gate.weight.bytes() + self.up.weight.bytes() + down.bytes()
    }

    pub fn weights(&self) -> FfnWeights<'_> {
        FfnWeights {
            gate: &self.gate.weight,
            up: &self.up.weight,
            down_t: &self.down_t,
            down: self.down.as_ref(),
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
        if rows == 1 && !mode.observes() {
            be.ffn_decode(&self.weights(), mode == FfnMode::Sparse, b.scratch, x, out)?;
            if let Some(bias) = &self.down_bias {
                be.add(out, bias, d)?;
            }
            return Ok(());
        }
        self.gate.forward(be, x, rows, b.a)?;
        self.up.forward(be, x, rows, b.u)?;
        if let (FfnMode::Histogram, Some(h)) = (mode, b.hist) {
            h.g.resize(rows * n, 0.0);
            h.u.resize(rows * n, 0.0);
            be.download(b.a, &mut h.g)?;
            be.download(b.u, &mut h.u)?;
            h.add(b.layer, rows);
        }
        match mode {
            FfnMode::Sparse => be.sparse_act(self.act, b.a, b.u, rows, n, b.scratch)?,
            _ => be.gate_act(self.act, b.a, b.u, rows * n)?,
        }
        if mode == FfnMode::Observe {
            be.observe(b.a, rows, n, b.stats, b.stats_offset)?;
        }
        match (&self.down, mode) {
            (Some(down), FfnMode::Dense | FfnMode::Observe) => be.linear(down, self.down_bias.as_ref(), b.a, rows, out),
            _ => be.matmul(b.a, rows, &self.down_t, self.down_bias.as_ref(), out),
        }
    }
}
