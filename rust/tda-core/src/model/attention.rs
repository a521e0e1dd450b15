//! Self-attention with grouped KV heads, optional q/k RMSNorm, rotary positions, sliding windows and
//! logit soft-capping.
//!
//! For query row i at position p and head h (KV head h / group):
//! `out = sum_j softmax_j(cap(q . k_j * scale)) v_j` over cached positions j in `[p - W + 1, p]`.

use super::linear::Linear;
use super::norm::RmsNorm;
use super::rope::RopeTable;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::{AttnShape, Backend, Buf, Step};
use crate::load::{Precision, WeightSource};

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    shape: AttnShape,
    /// Which of the state's rope tables this layer uses.
    rope: usize,
}

/// Buffers the attention reads and writes, borrowed from the run state.
pub struct AttnBuffers<'a> {
    pub q: &'a mut Buf,
    pub k: &'a mut Buf,
    pub v: &'a mut Buf,
    pub ctx: &'a mut Buf,
    pub k_cache: &'a mut Buf,
    pub v_cache: &'a mut Buf,
}

impl Attention {
    pub fn load(
        be: &dyn Backend,
        src: &dyn WeightSource,
        p: &str,
        cfg: &ModelConfig,
        layer: usize,
        dtype: Precision,
    ) -> Result<Self> {
        let (d, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let qk_norm = |n: &str| -> Result<Option<RmsNorm>> {
            cfg.qk_norm
                .then(|| RmsNorm::load(be, src, &format!("{p}.{n}"), cfg.head_dim, cfg.norm, cfg.rms_norm_eps))
                .transpose()
        };
        let spec = &cfg.layers[layer];
        let linear = |n: &str, i, o, b| Linear::load(be, src, &format!("{p}.{n}"), i, o, b, dtype);
        Ok(Self {
            q_proj: linear("q_proj", d, qd, cfg.qkv_bias)?,
            k_proj: linear("k_proj", d, kvd, cfg.qkv_bias)?,
            v_proj: linear("v_proj", d, kvd, cfg.qkv_bias)?,
            o_proj: linear("o_proj", qd, d, cfg.o_bias)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            shape: AttnShape {
                heads: cfg.num_heads,
                kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
                scale: cfg.query_scale,
                softcap: cfg.attn_softcap,
                window: spec.sliding_window,
            },
            rope: spec.rope,
        })
    }

    /// Attends `rows` tokens at the step's positions (`x` normalised, `rows x hidden`); writes their
    /// keys/values into the cache and the projected output into `out`: [`Attention::project`],
    /// [`Attention::attend`], [`Attention::output`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        be: &dyn Backend,
        x: &Buf,
        rows: usize,
        step: &Step,
        ropes: &[RopeTable],
        b: AttnBuffers<'_>,
        out: &mut Buf,
    ) -> Result<()> {
        self.project(be, x, rows, [&mut *b.q, &mut *b.k, &mut *b.v])?;
        let ctx = self.attend(be, rows, step, ropes, b)?;
        self.output(be, ctx, rows, out)
    }

    /// `q`, `k`, `v` of `rows` rows of `x` (any mix of sequences: the rows need no positions), with
    /// the optional q/k norms.
    pub fn project(&self, be: &dyn Backend, x: &Buf, rows: usize, [q, k, v]: [&mut Buf; 3]) -> Result<()> {
        let s = &self.shape;
        if rows == 1 {
            be.linear3([self.q_proj.parts(), self.k_proj.parts(), self.v_proj.parts()], x, [q, k, v])?;
        } else {
            self.q_proj.forward(be, x, rows, q)?;
            self.k_proj.forward(be, x, rows, k)?;
            self.v_proj.forward(be, x, rows, v)?;
        }
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            qn.forward_inplace(be, q, rows * s.heads)?;
            kn.forward_inplace(be, k, rows * s.kv_heads)?;
        }
        Ok(())
    }

    /// One sequence's `rows` projected rows (`b.q`, `b.k`, `b.v`) at the step's positions: rotates
    /// `q` and `k`, writes the keys/values into that sequence's cache and attends over it into
    /// `b.ctx`, which it returns.
    pub fn attend<'b>(
        &self,
        be: &dyn Backend,
        rows: usize,
        step: &Step,
        ropes: &[RopeTable],
        b: AttnBuffers<'b>,
    ) -> Result<&'b Buf> {
        let s = &self.shape;
        let rope = &ropes[self.rope];
        be.rope(b.q, &rope.cos, &rope.sin, s.head_dim, s.heads * s.head_dim, step, rows)?;
        be.rope(b.k, &rope.cos, &rope.sin, s.head_dim, s.kv_heads * s.head_dim, step, rows)?;
        be.attention(s, step, rows, b.q, b.k, b.v, b.k_cache, b.v_cache, b.ctx)?;
        Ok(b.ctx)
    }

    /// The output projection of `rows` context rows (any mix of sequences).
    pub fn output(&self, be: &dyn Backend, ctx: &Buf, rows: usize, out: &mut Buf) -> Result<()> {
        self.o_proj.forward(be, ctx, rows, out)
    }
}
