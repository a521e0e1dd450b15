//! The CPU backend: the decoder's operations on host slices, with the SIMD loops of this module's
//! parent (chosen once per CPU) and rayon for the matrix products and attention heads.

use super::{
    ffn_decode, gemv, gemv_many, kernels, matmul, on_huge_pages, row_to_f32, with_weights, FfnRows, RowCopy,
    MAX_FFN_CHUNKS, PREFETCH_AHEAD,
};
use crate::config::Activation;
use crate::error::{Error, Result};
use crate::kernels::{AttnShape, Backend, Buf, FfnScratch, FfnWeights, Matrix, MatrixStore, Step};
use candle_core::Tensor;
use rayon::prelude::*;
use std::cell::RefCell;

pub struct CpuBackend;

/// Rows shorter than this are decoded sparse from a compact copy ([`KeptRows`]).
pub const COMPACT_BELOW_BYTES: usize = 2 * PREFETCH_AHEAD;

/// One FFN layer's sparse-decoding state in a run state: the kept neurons of the current selection,
/// and, for FFNs whose rows are shorter than [`COMPACT_BELOW_BYTES`] (4 KiB), a compact copy of their
/// rows. Reading such short rows in place, scattered, leaves the memory system idle between them
/// (BENCHMARKS.md, kernels), while the copy streams. The copy is made at the first decode step after
/// each selection (one pass over the kept bytes) and reused; larger models read the kept rows in
/// place, as fast, with no copy.
#[derive(Default)]
pub struct KeptRows {
    /// The selection the kept list was taken from.
    version: Option<u64>,
    /// Every neuron is kept.
    all: bool,
    kept: Vec<u32>,
    keep_row: Vec<f32>,
    /// The selection the compact copy was made from.
    copied: Option<u64>,
    gate: RowCopy,
    up: RowCopy,
    down_t: RowCopy,
    gate_bias: Vec<f32>,
    up_bias: Vec<f32>,
}

thread_local! {
    /// Partial sums of the decode FFN kernel (`MAX_FFN_CHUNKS x hidden`), per calling thread.
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn host_kept(s: &FfnScratch) -> Result<&KeptRows> {
    match s {
        FfnScratch::Host(k) => Ok(k),
        #[allow(unreachable_patterns)]
        _ => Err(Error::Internal("a device FFN scratch was handed to the CPU backend".into())),
    }
}

fn host_kept_mut(s: &mut FfnScratch) -> Result<&mut KeptRows> {
    match s {
        FfnScratch::Host(k) => Ok(k),
        #[allow(unreachable_patterns)]
        _ => Err(Error::Internal("a device FFN scratch was handed to the CPU backend".into())),
    }
}

fn host_step(s: &Step) -> Result<(&[u32], usize)> {
    match s {
        Step::Host { tokens, start } => Ok((tokens, *start)),
        #[allow(unreachable_patterns)]
        _ => Err(Error::Internal("a device step was handed to the CPU backend".into())),
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

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

fn add_rows(out: &mut [f32], bias: Option<&Buf>, width: usize) -> Result<()> {
    if let Some(b) = bias {
        let b = b.host()?;
        for row in out.chunks_exact_mut(width) {
            row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
    }
    Ok(())
}

impl Backend for CpuBackend {
    fn device(&self) -> String {
        "cpu".into()
    }

    fn matrix(&self, t: Tensor) -> Result<Matrix> {
        let (rows, cols) = t.dims2()?;
        let dtype = t.dtype();
        Ok(Matrix { rows, cols, dtype, store: MatrixStore::Host(on_huge_pages(t)?) })
    }

    fn upload(&self, v: &[f32]) -> Result<Buf> {
        Ok(Buf::Host(v.to_vec()))
    }

    fn zeros(&self, len: usize) -> Result<Buf> {
        Ok(Buf::Host(vec![0.0; len]))
    }

    fn download(&self, b: &Buf, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(&b.host()?[..out.len()]);
        Ok(())
    }

    fn fill_zero(&self, b: &mut Buf, len: usize) -> Result<()> {
        b.host_mut()?[..len].fill(0.0);
        Ok(())
    }

    fn new_step(&self, rows: usize) -> Result<Step> {
        Ok(Step::Host { tokens: Vec::with_capacity(rows), start: 0 })
    }

    fn new_ffn_scratch(&self) -> FfnScratch {
        FfnScratch::Host(KeptRows::default())
    }

    fn set_step(&self, step: &mut Step, toks: &[u32], at: usize) -> Result<()> {
        match step {
            Step::Host { tokens, start } => {
                tokens.clear();
                tokens.extend_from_slice(toks);
                *start = at;
                Ok(())
            }
            #[allow(unreachable_patterns)]
            _ => Err(Error::Internal("a device step was handed to the CPU backend".into())),
        }
    }

    fn prepare_ffn(
        &self,
        _w: &FfnWeights<'_>,
        kept: Option<&[u32]>,
        keep_row: &[f32],
        version: u64,
        scratch: &mut FfnScratch,
    ) -> Result<()> {
        let s = host_kept_mut(scratch)?;
        if s.version != Some(version) {
            s.version = Some(version);
            s.all = kept.is_none();
            s.kept.clear();
            s.kept.extend_from_slice(kept.unwrap_or(&[]));
            s.keep_row.clear();
            s.keep_row.extend_from_slice(keep_row);
        }
        Ok(())
    }

    fn embed(&self, table: &Matrix, step: &Step, rows: usize, scale: Option<f32>, x: &mut Buf) -> Result<()> {
        let (tokens, _) = host_step(step)?;
        let (d, x) = (table.cols, x.host_mut()?);
        with_weights(table.host()?, |w| {
            for (i, &t) in tokens[..rows].iter().enumerate() {
                row_to_f32(w, t as usize, d, &mut x[i * d..(i + 1) * d]);
            }
        })?;
        if let Some(s) = scale {
            x[..rows * d].iter_mut().for_each(|v| *v *= s);
        }
        Ok(())
    }

    fn rms_norm(&self, x: &Buf, gain: &Buf, eps: f32, dim: usize, rows: usize, out: &mut Buf) -> Result<()> {
        let (x, g, out) = (&x.host()?[..rows * dim], gain.host()?, &mut out.host_mut()?[..rows * dim]);
        for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let inv = inv_rms(xr, eps);
            for ((o, xi), g) in or.iter_mut().zip(xr).zip(g) {
                *o = xi * inv * g;
            }
        }
        Ok(())
    }

    fn rms_norm_inplace(&self, x: &mut Buf, gain: &Buf, eps: f32, dim: usize, rows: usize) -> Result<()> {
        let (x, g) = (&mut x.host_mut()?[..rows * dim], gain.host()?);
        for xr in x.chunks_exact_mut(dim) {
            let inv = inv_rms(xr, eps);
            for (xi, g) in xr.iter_mut().zip(g) {
                *xi = *xi * inv * g;
            }
        }
        Ok(())
    }

    fn add(&self, x: &mut Buf, y: &Buf, len: usize) -> Result<()> {
        x.host_mut()?[..len].iter_mut().zip(&y.host()?[..len]).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn linear(&self, w: &Matrix, bias: Option<&Buf>, x: &Buf, rows: usize, out: &mut Buf) -> Result<()> {
        let (x, out) = (&x.host()?[..rows * w.cols], &mut out.host_mut()?[..rows * w.rows]);
        with_weights(w.host()?, |ws| {
            if rows == 1 {
                gemv(ws, w.cols, x, out)
            } else {
                matmul(x, rows, ws, w.rows, w.cols, true, out)
            }
        })?;
        add_rows(out, bias, w.rows)
    }

    fn linear3(&self, ws: [(&Matrix, Option<&Buf>); 3], x: &Buf, outs: [&mut Buf; 3]) -> Result<()> {
        let d = ws[0].0.cols;
        let x = &x.host()?[..d];
        let [o0, o1, o2] = outs;
        let (o0, o1, o2) = (
            &mut o0.host_mut()?[..ws[0].0.rows],
            &mut o1.host_mut()?[..ws[1].0.rows],
            &mut o2.host_mut()?[..ws[2].0.rows],
        );
        with_weights(ws[0].0.host()?, |w0| {
            with_weights(ws[1].0.host()?, |w1| {
                with_weights(ws[2].0.host()?, |w2| {
                    gemv_many(d, x, &mut [(w0, &mut *o0), (w1, &mut *o1), (w2, &mut *o2)])
                })
            })
        })???;
        for ((w, b), o) in ws.iter().zip([o0, o1, o2]) {
            add_rows(o, *b, w.rows)?;
        }
        Ok(())
    }

    fn matmul(&self, x: &Buf, rows: usize, w: &Matrix, bias: Option<&Buf>, out: &mut Buf) -> Result<()> {
        let (x, out) = (&x.host()?[..rows * w.rows], &mut out.host_mut()?[..rows * w.cols]);
        with_weights(w.host()?, |ws| matmul(x, rows, ws, w.rows, w.cols, false, out))?;
        add_rows(out, bias, w.cols)
    }

    fn rope(
        &self,
        x: &mut Buf,
        cos: &Buf,
        sin: &Buf,
        head_dim: usize,
        width: usize,
        step: &Step,
        rows: usize,
    ) -> Result<()> {
        let (_, start) = host_step(step)?;
        let h = head_dim / 2;
        let (x, cos, sin) = (&mut x.host_mut()?[..rows * width], cos.host()?, sin.host()?);
        for (i, row) in x.chunks_exact_mut(width).enumerate() {
            let p = start + i;
            let (c, s) = (&cos[p * h..(p + 1) * h], &sin[p * h..(p + 1) * h]);
            for head in row.chunks_exact_mut(2 * h) {
                let (a, b) = head.split_at_mut(h);
                for j in 0..h {
                    let (x1, x2) = (a[j], b[j]);
                    a[j] = x1 * c[j] - x2 * s[j];
                    b[j] = x2 * c[j] + x1 * s[j];
                }
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        s: &AttnShape,
        step: &Step,
        rows: usize,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        k_cache: &mut Buf,
        v_cache: &mut Buf,
        ctx: &mut Buf,
    ) -> Result<()> {
        let (_, start) = host_step(step)?;
        let (hd, heads) = (s.head_dim, s.heads);
        let (qd, kvd) = (heads * hd, s.kv_heads * hd);
        let span = start * kvd..(start + rows) * kvd;
        k_cache.host_mut()?[span.clone()].copy_from_slice(&k.host()?[..rows * kvd]);
        v_cache.host_mut()?[span].copy_from_slice(&v.host()?[..rows * kvd]);
        let (q, kc, vc) = (&q.host()?[..rows * qd], k_cache.host()?, v_cache.host()?);
        let group = heads / s.kv_heads;
        let k = kernels();
        // One task per (row, head): online softmax over the visible keys, no scratch buffer.
        ctx.host_mut()?[..rows * qd].par_chunks_mut(hd).enumerate().for_each(|(c, o)| {
            let (i, h) = (c / heads, c % heads);
            let p = start + i;
            let lo = s.window.map_or(0, |w| (p + 1).saturating_sub(w));
            let qh = &q[i * qd + h * hd..i * qd + (h + 1) * hd];
            let kv_off = (h / group) * hd;
            o.fill(0.0);
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            for j in lo..=p {
                let kj = &kc[j * kvd + kv_off..j * kvd + kv_off + hd];
                let mut sc = k.dot(qh, kj) * s.scale;
                if let Some(cap) = s.softcap {
                    sc = (sc / cap).tanh() * cap;
                }
                if sc > m {
                    let r = (m - sc).exp();
                    l *= r;
                    o.iter_mut().for_each(|x| *x *= r);
                    m = sc;
                }
                let e = (sc - m).exp();
                l += e;
                k.axpy(e, &vc[j * kvd + kv_off..j * kvd + kv_off + hd], o);
            }
            let inv = 1.0 / l;
            o.iter_mut().for_each(|x| *x *= inv);
        });
        Ok(())
    }

    fn gate_act(&self, act: Activation, a: &mut Buf, u: &Buf, len: usize) -> Result<()> {
        for (ai, ui) in a.host_mut()?[..len].iter_mut().zip(&u.host()?[..len]) {
            *ai = activate(act, *ai) * ui;
        }
        Ok(())
    }

    fn observe(&self, a: &Buf, rows: usize, n: usize, acc: &mut Buf, offset: usize) -> Result<()> {
        let (a, acc) = (&a.host()?[..rows * n], &mut acc.host_mut()?[offset..offset + 2 * n]);
        let (ss, gr) = acc.split_at_mut(n);
        let k = kernels();
        for row in a.chunks_exact(n) {
            let norm2 = k.dot(row, row);
            let inv = if norm2 > 0.0 { 1.0 / norm2 } else { 0.0 };
            for ((s, g), v) in ss.iter_mut().zip(gr.iter_mut()).zip(row) {
                let v2 = v * v;
                *s += v2;
                *g += v2 * inv;
            }
        }
        Ok(())
    }

    fn mask_cols(&self, a: &mut Buf, rows: usize, n: usize, scratch: &FfnScratch) -> Result<()> {
        let s = host_kept(scratch)?;
        if !s.all {
            for r in a.host_mut()?[..rows * n].chunks_exact_mut(n) {
                r.iter_mut().zip(&s.keep_row).for_each(|(v, k)| *v *= k);
            }
        }
        Ok(())
    }

    fn ffn_decode(
        &self,
        w: &FfnWeights<'_>,
        sparse: bool,
        scratch: &mut FfnScratch,
        x: &Buf,
        out: &mut Buf,
    ) -> Result<()> {
        let (n, d, act) = (w.gate.rows, w.gate.cols, w.act);
        let (x, out) = (&x.host()?[..d], &mut out.host_mut()?[..d]);
        let s = host_kept_mut(scratch)?;
        let (gb, ub) = (w.gate_bias.map(Buf::host).transpose()?, w.up_bias.map(Buf::host).transpose()?);
        let sparse = sparse && !s.all;
        PARTIALS.with_borrow_mut(|partials| {
            if partials.len() < MAX_FFN_CHUNKS * d {
                partials.resize(MAX_FFN_CHUNKS * d, 0.0);
            }
            let mut decode = |rows: FfnRows<'_>, n: usize, kept: Option<&[u32]>, out: &mut [f32]| {
                ffn_decode(kernels(), rows, n, kept, x, |v| activate(act, v), partials, out)
            };
            with_weights(w.gate.host()?, |wg| {
                with_weights(w.up.host()?, |wu| {
                    with_weights(w.down_t.host()?, |wd| {
                        let rows = FfnRows { gate: wg, up: wu, down_t: wd, gate_bias: gb, up_bias: ub, d };
                        if !sparse {
                            return decode(rows, n, None, out);
                        }
                        if d * wg.elem_bytes() >= COMPACT_BELOW_BYTES {
                            return decode(rows, n, Some(&s.kept), out);
                        }
                        if s.copied != s.version {
                            s.fill(rows);
                        }
                        decode(s.rows(rows), s.kept.len(), None, out)
                    })
                })
            })???;
            Ok::<(), Error>(())
        })
    }

    fn soft_cap(&self, x: &mut Buf, cap: f32, len: usize) -> Result<()> {
        x.host_mut()?[..len].iter_mut().for_each(|l| *l = (*l / cap).tanh() * cap);
        Ok(())
    }

    fn argmax(&self, x: &Buf, len: usize) -> Result<u32> {
        let v = &x.host()?[..len];
        let mut best = 0;
        for (i, &x) in v.iter().enumerate() {
            if x > v[best] {
                best = i;
            }
        }
        Ok(best as u32)
    }

    fn row_sq_norms(&self, w: &Matrix) -> Result<Vec<f64>> {
        let mut row = vec![0f32; w.cols];
        with_weights(w.host()?, |ws| {
            (0..w.rows)
                .map(|r| {
                    row_to_f32(ws, r, w.cols, &mut row);
                    row.iter().map(|&v| v as f64 * v as f64).sum()
                })
                .collect()
        })
    }

    fn output_buf(&self, host: Vec<f32>) -> Result<Buf> {
        Ok(Buf::Host(host))
    }

    fn read_output(&self, b: Buf, host: &mut Vec<f32>) -> Result<()> {
        match b {
            Buf::Host(v) => {
                *host = v;
                Ok(())
            }
            #[allow(unreachable_patterns)]
            _ => Err(Error::Internal("a device buffer was handed to the CPU backend".into())),
        }
    }

    fn copy(&self, src: &Buf, src_offset: usize, dst: &mut Buf, len: usize) -> Result<()> {
        dst.host_mut()?[..len].copy_from_slice(&src.host()?[src_offset..src_offset + len]);
        Ok(())
    }
}

impl KeptRows {
    /// Copies the rows (and biases) of the kept neurons of `w`.
    fn fill(&mut self, w: FfnRows<'_>) {
        let kept = &self.kept;
        self.gate.fill(w.gate, kept, w.d);
        self.up.fill(w.up, kept, w.d);
        self.down_t.fill(w.down_t, kept, w.d);
        let pick = |b: Option<&[f32]>, dst: &mut Vec<f32>| {
            dst.clear();
            dst.extend(b.iter().flat_map(|b| kept.iter().map(|&j| b[j as usize])));
        };
        pick(w.gate_bias, &mut self.gate_bias);
        pick(w.up_bias, &mut self.up_bias);
        self.copied = self.version;
    }

    /// The copy as FFN rows (biases as in `like`).
    fn rows(&self, like: FfnRows<'_>) -> FfnRows<'_> {
        FfnRows {
            gate: self.gate.rows(),
            up: self.up.rows(),
            down_t: self.down_t.rows(),
            gate_bias: like.gate_bias.map(|_| &self.gate_bias[..]),
            up_bias: like.up_bias.map(|_| &self.up_bias[..]),
            d: like.d,
        }
    }
}
