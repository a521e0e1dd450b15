//! The decoder stack. One `forward` serves prefill (many rows, GEMMs) and decode (one row, GEMVs):
//!
//! ```text
//! x = embed(tokens) [* sqrt(hidden)]
//! for each layer:
//!     h = attn(norm(x));  [h = post_attn_norm(h)];  x = x + h
//!     h = ffn(norm(x));   [h = post_ffn_norm(h)];   x = x + h
//! logits = cap(norm(x) W_lm^T)
//! ```

use super::attention::{Attention, AttnBuffers};
use super::ffn::{Ffn, FfnBuffers, FfnMode};
use super::norm::RmsNorm;
use super::state::State;
use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::kernels::cpu::{on_huge_pages, row_to_f32, with_weights};
use crate::load::WeightSource;
use candle_core::{DType, Tensor};

pub struct Layer {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub post_attn_norm: Option<RmsNorm>,
    pub ffn_norm: RmsNorm,
    pub ffn: Ffn,
    pub post_ffn_norm: Option<RmsNorm>,
}

pub struct Model {
    pub cfg: ModelConfig,
    pub dtype: DType,
    /// `(vocab, hidden)`.
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub final_norm: RmsNorm,
    /// `(vocab, hidden)`; shares storage with `embed` when the embeddings are tied.
    pub lm_head: super::linear::Linear,
}

/// Which logits a forward pass produces.
pub enum Logits<'a> {
    /// None (the hidden states are all that is wanted, e.g. collecting statistics).
    None,
    /// Only the last token's, into `State::logits`.
    Last,
    /// Every token's, `rows x vocab`.
    All(&'a mut [f32]),
}

impl Model {
    /// Builds the model from HF-named tensors, converting them to `dtype`.
    pub fn load(cfg: ModelConfig, src: &dyn WeightSource, dtype: DType) -> Result<Self> {
        let prefix = ["model.", "model.language_model.", "language_model.model."]
            .into_iter()
            .find(|p| src.contains(&format!("{p}embed_tokens.weight")))
            .ok_or_else(|| Error::model("missing tensor 'model.embed_tokens.weight' in the checkpoint"))?;
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = on_huge_pages(src.tensor(&format!("{prefix}embed_tokens.weight"), &[v, d], dtype)?)?;
        let norm = |name: &str| RmsNorm::load(src, name, d, cfg.norm, cfg.rms_norm_eps);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("{prefix}layers.{i}");
            let sandwich = cfg.sandwich_norm;
            layers.push(Layer {
                attn_norm: norm(&format!("{p}.input_layernorm"))?,
                attn: Attention::load(src, &format!("{p}.self_attn"), &cfg, i, dtype)?,
                post_attn_norm: sandwich.then(|| norm(&format!("{p}.post_attention_layernorm"))).transpose()?,
                ffn_norm: norm(&format!(
                    "{p}.{}",
                    if sandwich { "pre_feedforward_layernorm" } else { "post_attention_layernorm" }
                ))?,
                ffn: Ffn::load(src, &format!("{p}.mlp"), &cfg, dtype)?,
                post_ffn_norm: sandwich.then(|| norm(&format!("{p}.post_feedforward_layernorm"))).transpose()?,
            });
        }
        let final_norm = norm(&format!("{prefix}norm"))?;
        // Gemma always ties its embeddings, whatever the config says, when there is no lm_head.
        let gemma_tied =
            matches!(cfg.arch, Arch::Gemma | Arch::Gemma2 | Arch::Gemma3) && !src.contains("lm_head.weight");
        let lm_weight = if cfg.tie_word_embeddings || gemma_tied {
            embed.clone()
        } else {
            on_huge_pages(src.tensor("lm_head.weight", &[v, d], dtype)?)?
        };
        let lm_head = super::linear::Linear { weight: lm_weight, bias: None, in_dim: d, out_dim: v };
        Ok(Self { cfg, dtype, embed, layers, final_norm, lm_head })
    }

    /// Bytes of weights one decode step reads: every projection, the LM head and the norms
    /// (the embedding lookup reads one row and is not counted).
    pub fn decode_weight_bytes(&self) -> usize {
        let lin = |l: &super::linear::Linear| l.weight.elem_count() * l.weight.dtype().size_in_bytes();
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.attn;
                lin(&a.q_proj)
                    + lin(&a.k_proj)
                    + lin(&a.v_proj)
                    + lin(&a.o_proj)
                    + l.ffn.neurons() * l.ffn.bytes_per_neuron()
            })
            .sum();
        let norms = (self.layers.len() * 4 + 1) * self.cfg.hidden_size * 4;
        per_layer + lin(&self.lm_head) + norms
    }

    /// Bytes of weights one decode step reads when the FFN keeps `kept[l]` neurons of layer `l`.
    pub fn sparse_decode_weight_bytes(&self, kept: &[usize]) -> usize {
        let skipped: usize =
            self.layers.iter().zip(kept).map(|(l, &k)| (l.ffn.neurons() - k) * l.ffn.bytes_per_neuron()).sum();
        self.decode_weight_bytes() - skipped
    }

    /// Bytes of all FFN weights.
    pub fn ffn_weight_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.ffn.neurons() * l.ffn.bytes_per_neuron()).sum()
    }

    /// `||Wd[:, j]||^2` for every neuron `j` of every layer (one pass over the down projections).
    pub fn down_row_norms(&self) -> Result<Vec<Vec<f64>>> {
        let d = self.cfg.hidden_size;
        let mut row = vec![0f32; d];
        self.layers
            .iter()
            .map(|l| {
                with_weights(&l.ffn.down_t, |w| {
                    (0..l.ffn.neurons())
                        .map(|j| {
                            row_to_f32(w, j, d, &mut row);
                            row.iter().map(|&v| v as f64 * v as f64).sum()
                        })
                        .collect()
                })
            })
            .collect()
    }

    pub fn new_state(&self, rows: usize, capacity: usize) -> State {
        State::new(&self.cfg, rows, capacity)
    }

    /// Runs `tokens` at positions `start..start + tokens.len()` through the model, appending their
    /// keys and values to the state's cache. `mode` says what the FFNs do besides their output:
    /// observe the prompt's activations, or compute only the neurons of the state's mask. Token ids must be `< vocab_size` and the positions must
    /// fit the state (checked by the caller; violations return an internal error, never panic).
    pub fn forward(
        &self,
        tokens: &[u32],
        start: usize,
        st: &mut State,
        mode: FfnMode,
        logits: Logits<'_>,
    ) -> Result<()> {
        let n = tokens.len();
        let d = self.cfg.hidden_size;
        if n == 0 || n > st.rows() || start + n > st.capacity() {
            return Err(Error::Internal(format!(
                "forward of {n} tokens at {start} does not fit a state of {} rows x {} positions",
                st.rows(),
                st.capacity()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::arg(format!("token id {bad} is out of range for vocab_size {}", self.cfg.vocab_size)));
        }

        // Embedding lookup.
        with_weights(&self.embed, |w| {
            for (i, &t) in tokens.iter().enumerate() {
                row_to_f32(w, t as usize, d, &mut st.x[i * d..(i + 1) * d]);
            }
        })?;
        if let Some(s) = self.cfg.embed_scale {
            st.x[..n * d].iter_mut().for_each(|v| *v *= s);
        }

        for (li, layer) in self.layers.iter().enumerate() {
            // Attention sub-block.
            layer.attn_norm.forward(&st.x[..n * d], &mut st.xb[..n * d]);
            let bufs = AttnBuffers { q: &mut st.q, k: &mut st.k, v: &mut st.v, ctx: &mut st.ctx };
            layer.attn.forward(&st.xb, n, start, li, &st.ropes, &mut st.cache, bufs, &mut st.out)?;
            if let Some(pn) = &layer.post_attn_norm {
                pn.forward_inplace(&mut st.out[..n * d]);
            }
            add_into(&mut st.x[..n * d], &st.out[..n * d]);

            // FFN sub-block.
            layer.ffn_norm.forward(&st.x[..n * d], &mut st.xb[..n * d]);
            let bufs = FfnBuffers {
                a: &mut st.ffn_a,
                u: &mut st.ffn_u,
                partials: &mut st.ffn_partials,
                kept_rows: &mut st.ffn_kept_rows[li],
            };
            layer.ffn.forward(&st.xb, n, li, mode, bufs, &mut st.stats, &st.mask, &mut st.out)?;
            if let Some(pn) = &layer.post_ffn_norm {
                pn.forward_inplace(&mut st.out[..n * d]);
            }
            add_into(&mut st.x[..n * d], &st.out[..n * d]);
        }

        match logits {
            Logits::None => {}
            Logits::Last => {
                self.final_norm.forward(&st.x[(n - 1) * d..n * d], &mut st.xb[..d]);
                self.lm_head.forward(&st.xb[..d], 1, &mut st.logits)?;
                self.soft_cap(&mut st.logits);
            }
            Logits::All(out) => {
                self.final_norm.forward(&st.x[..n * d], &mut st.xb[..n * d]);
                self.lm_head.forward(&st.xb[..n * d], n, out)?;
                self.soft_cap(out);
            }
        }
        Ok(())
    }

    fn soft_cap(&self, logits: &mut [f32]) {
        if let Some(cap) = self.cfg.final_softcap {
            logits.iter_mut().for_each(|l| *l = (*l / cap).tanh() * cap);
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}
