//! The gated feed-forward block, `y = (act(x Wg^T) * (x Wu^T)) Wd^T`, and its sparse variant.
//!
//! `A = act(x Wg^T) * (x Wu^T)` is the intermediate activation. The down projection is stored
//! transposed (`Wd^T`, `n x d`), so neuron `j` owns row `j` of `Wg`, `Wu` and `Wd^T`:
//!
//! - many rows (prefill, scoring): GEMMs; [`FfnMode::Observe`] adds `A` to the prompt statistics,
//!   [`FfnMode::Sparse`] zeroes the skipped neurons' columns of `A`;
//! - one row (decode): [`ffn_decode`] reads the three rows of each kept neuron and nothing else.

use super::linear::{load_vector, matmul, Linear};
use crate::config::{Activation, ModelConfig};
use crate::error::Result;
use crate::kernels::cpu::{ffn_decode, kernels, on_huge_pages, with_weights, FfnWeights, RowCopy, PREFETCH_AHEAD};
use crate::load::WeightSource;
use crate::sparsity::{NeuronMask, NeuronStats};
use candle_core::{DType, Tensor};

/// What the FFN does besides computing its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnMode {
    /// Every neuron.
    Dense,
    /// Every neuron, adding the activations to the state's [`NeuronStats`] (the prompt).
    Observe,
    /// Only the neurons the state's [`NeuronMask`] keeps.
    Sparse,
}

pub struct Ffn {
    pub gate: Linear,
    pub up: Linear,
    /// `Wd^T`, `(intermediate, hidden)`.
    pub down_t: Tensor,
    pub down_bias: Option<Vec<f32>>,
    pub act: Activation,
}

/// Scratch the FFN needs, borrowed from the run state.
pub struct FfnBuffers<'a> {
    /// `rows x intermediate`: the activation `A` afterwards.
    pub a: &'a mut [f32],
    pub u: &'a mut [f32],
    /// Partial sums of the decode kernel.
    pub partials: &'a mut [f32],
    /// This layer's compact copy of the kept neurons' rows (short rows only).
    pub kept_rows: &'a mut KeptRows,
}

/// Rows shorter than this are decoded sparse from a compact copy ([`KeptRows`]).
pub const COMPACT_BELOW_BYTES: usize = 2 * PREFETCH_AHEAD;

/// A compact copy of the rows of a layer's kept neurons, for sparse decoding of FFNs whose rows
/// are shorter than [`COMPACT_BELOW_BYTES`] (4 KiB): reading such rows in place, scattered, leaves the memory
/// system idle between them (BENCHMARKS.md, kernels), while the copy streams. It is made at the
/// first decode step after each selection (one pass over the kept bytes), lives in the run state,
/// and is reused; larger models read the kept rows in place, as fast, with no copy.
#[derive(Default)]
pub struct KeptRows {
    /// The [`NeuronMask::version`] the copy was made from.
    version: Option<u64>,
    gate: RowCopy,
    up: RowCopy,
    down_t: RowCopy,
    gate_bias: Vec<f32>,
    up_bias: Vec<f32>,
}

impl Ffn {
    pub fn load(src: &dyn WeightSource, p: &str, cfg: &ModelConfig, dtype: DType) -> Result<Self> {
        let (d, n, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        // Wd is read once from the source and transposed straight into its huge-page copy.
        let down = src.tensor(&format!("{p}.down_proj.weight"), &[d, n], dtype)?;
        Ok(Self {
            gate: Linear::load(src, &format!("{p}.gate_proj"), d, n, b, dtype)?,
            up: Linear::load(src, &format!("{p}.up_proj"), d, n, b, dtype)?,
            down_t: on_huge_pages(down.t()?.contiguous()?)?,
            down_bias: b.then(|| load_vector(src, &format!("{p}.down_proj.bias"), d)).transpose()?,
            act: cfg.act,
        })
    }

    pub fn neurons(&self) -> usize {
        self.gate.out_dim
    }

    /// Bytes of weights of one neuron (its rows of `Wg`, `Wu` and `Wd^T`).
    pub fn bytes_per_neuron(&self) -> usize {
        3 * self.gate.in_dim * self.down_t.dtype().size_in_bytes()
    }

    /// `rows` tokens of `x` -> `out` for layer `layer`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        rows: usize,
        layer: usize,
        mode: FfnMode,
        bufs: FfnBuffers<'_>,
        stats: &mut NeuronStats,
        mask: &NeuronMask,
        out: &mut [f32],
    ) -> Result<()> {
        let (n, d) = (self.neurons(), self.gate.in_dim);
        let act = self.act;
        if rows == 1 && mode != FfnMode::Observe {
            let kept = if mode == FfnMode::Sparse { mask.kept(layer) } else { None };
            let mut decode = |w: FfnWeights<'_>, n: usize, kept: Option<&[u32]>, out: &mut [f32]| {
                ffn_decode(kernels(), w, n, kept, &x[..d], |v| activate(act, v), bufs.partials, &mut out[..d])
            };
            let (gb, ub) = (self.gate.bias.as_deref(), self.up.bias.as_deref());
            with_weights(&self.gate.weight, |wg| {
                with_weights(&self.up.weight, |wu| {
                    with_weights(&self.down_t, |wd| {
                        let w = FfnWeights { gate: wg, up: wu, down_t: wd, gate_bias: gb, up_bias: ub, d };
                        match kept {
                            Some(k) if d * wg.elem_bytes() < COMPACT_BELOW_BYTES => {
                                let c = bufs.kept_rows;
                                if c.version != Some(mask.version()) {
                                    c.fill(w, k);
                                    c.version = Some(mask.version());
                                }
                                decode(c.weights(w, d), k.len(), None, out)
                            }
                            _ => decode(w, n, kept, out),
                        }
                    })
                })
            })???;
            self.add_down_bias(&mut out[..d]);
            return Ok(());
        }
        let (a, u) = (&mut bufs.a[..rows * n], &mut bufs.u[..rows * n]);
        self.gate.forward(x, rows, a)?;
        self.up.forward(x, rows, u)?;
        for (ai, ui) in a.iter_mut().zip(u.iter()) {
            *ai = activate(act, *ai) * ui;
        }
        match mode {
            FfnMode::Observe => stats.observe(layer, a, rows),
            FfnMode::Sparse if mask.kept(layer).is_some() => {
                let keep = mask.keep_row(layer);
                a.chunks_exact_mut(n).for_each(|r| r.iter_mut().zip(keep).for_each(|(v, k)| *v *= k));
            }
            _ => {}
        }
        matmul(a, rows, &self.down_t, false, out)?;
        for row in out[..rows * d].chunks_exact_mut(d) {
            self.add_down_bias(row);
        }
        Ok(())
    }

    fn add_down_bias(&self, row: &mut [f32]) {
        if let Some(b) = &self.down_bias {
            row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
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

impl KeptRows {
    /// Copies the rows (and biases) of the neurons `kept` of `w`.
    fn fill(&mut self, w: FfnWeights<'_>, kept: &[u32]) {
        self.gate.fill(w.gate, kept, w.d);
        self.up.fill(w.up, kept, w.d);
        self.down_t.fill(w.down_t, kept, w.d);
        let pick = |b: Option<&[f32]>, dst: &mut Vec<f32>| {
            dst.clear();
            dst.extend(b.iter().flat_map(|b| kept.iter().map(|&j| b[j as usize])));
        };
        pick(w.gate_bias, &mut self.gate_bias);
        pick(w.up_bias, &mut self.up_bias);
    }

    /// The copy as FFN weights (biases as in `like`).
    fn weights(&self, like: FfnWeights<'_>, d: usize) -> FfnWeights<'_> {
        FfnWeights {
            gate: self.gate.rows(),
            up: self.up.rows(),
            down_t: self.down_t.rows(),
            gate_bias: like.gate_bias.map(|_| &self.gate_bias[..]),
            up_bias: like.up_bias.map(|_| &self.up_bias[..]),
            d,
        }
    }
}
