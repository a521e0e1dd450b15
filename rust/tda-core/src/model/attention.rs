//! Self-attention with grouped KV heads, optional q/k RMSNorm, rotary positions, sliding windows and
//! logit soft-capping.
//!
//! For query row i at position p and head h (KV head h / group):
//! `out = sum_j softmax_j(cap(q . k_j * scale)) v_j` over cached positions j in `[p - W + 1, p]`.

use super::kv_cache::KvCache;
use super::linear::Linear;
use super::norm::RmsNorm;
use super::rope::RopeTable;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::cpu::{axpy, dot};
use crate::load::WeightSource;
use candle_core::DType;
use rayon::prelude::*;

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    rope: usize,
}

/// Per-call buffers the attention reads and writes (slices of the run state).
pub struct AttnBuffers<'a> {
    pub q: &'a mut [f32],
    pub k: &'a mut [f32],
    pub v: &'a mut [f32],
    pub ctx: &'a mut [f32],
}

impl Attention {
    pub fn load(src: &dyn WeightSource, p: &str, cfg: &ModelConfig, layer: usize, dtype: DType) -> Result<Self> {
        let (d, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let qk_norm = |n: &str| -> Result<Option<RmsNorm>> {
            cfg.qk_norm
                .then(|| RmsNorm::load(src, &format!("{p}.{n}"), cfg.head_dim, cfg.norm, cfg.rms_norm_eps))
                .transpose()
        };
        let spec = &cfg.layers[layer];
        Ok(Self {
            q_proj: Linear::load(src, &format!("{p}.q_proj"), d, qd, cfg.qkv_bias, dtype)?,
            k_proj: Linear::load(src, &format!("{p}.k_proj"), d, kvd, cfg.qkv_bias, dtype)?,
            v_proj: Linear::load(src, &format!("{p}.v_proj"), d, kvd, cfg.qkv_bias, dtype)?,
            o_proj: Linear::load(src, &format!("{p}.o_proj"), qd, d, cfg.o_bias, dtype)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            scale: cfg.query_scale,
            softcap: cfg.attn_softcap,
            window: spec.sliding_window,
            rope: spec.rope,
        })
    }

    /// Attends `rows` tokens at positions `start..start+rows` (`x` normalised, `rows x hidden`);
    /// writes their keys/values into the cache and the projected output into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        rows: usize,
        start: usize,
        layer: usize,
        ropes: &[RopeTable],
        cache: &mut KvCache,
        b: AttnBuffers<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        let (qd, kvd, hd) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim);
        let (q, k, v, ctx) =
            (&mut b.q[..rows * qd], &mut b.k[..rows * kvd], &mut b.v[..rows * kvd], &mut b.ctx[..rows * qd]);
        if rows == 1 {
            Linear::forward3([&self.q_proj, &self.k_proj, &self.v_proj], x, [&mut *q, &mut *k, &mut *v])?;
        } else {
            self.q_proj.forward(x, rows, q)?;
            self.k_proj.forward(x, rows, k)?;
            self.v_proj.forward(x, rows, v)?;
        }
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            qn.forward_inplace(q);
            kn.forward_inplace(k);
        }
        let rope = &ropes[self.rope];
        for i in 0..rows {
            rope.apply(&mut q[i * qd..(i + 1) * qd], start + i);
            rope.apply(&mut k[i * kvd..(i + 1) * kvd], start + i);
        }
        cache.write(layer, start, k, v);
        let (kc, vc) = cache.layer(layer);
        let group = self.num_heads / self.num_kv_heads;
        let heads = self.num_heads;
        // One task per (row, head): online softmax over the visible keys, no scratch buffer.
        ctx.par_chunks_mut(hd).enumerate().for_each(|(c, o)| {
            let (i, h) = (c / heads, c % heads);
            let p = start + i;
            let lo = self.window.map_or(0, |w| (p + 1).saturating_sub(w));
            let qh = &q[i * qd + h * hd..i * qd + (h + 1) * hd];
            let kv_off = (h / group) * hd;
            o.fill(0.0);
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            for j in lo..=p {
                let kj = &kc[j * kvd + kv_off..j * kvd + kv_off + hd];
                let mut s = dot(qh, kj) * self.scale;
                if let Some(cap) = self.softcap {
                    s = (s / cap).tanh() * cap;
                }
                if s > m {
                    let r = (m - s).exp();
                    l *= r;
                    o.iter_mut().for_each(|x| *x *= r);
                    m = s;
                }
                let e = (s - m).exp();
                l += e;
                axpy(e, &vc[j * kvd + kv_off..j * kvd + kv_off + hd], o);
            }
            let inv = 1.0 / l;
            o.iter_mut().for_each(|x| *x *= inv);
        });
        self.o_proj.forward(ctx, rows, out)
    }
}
