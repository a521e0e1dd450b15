//! The CPU backend: the decoder's operations on host slices, with the SIMD loops of this module's
//! parent (chosen once per CPU) and rayon for the matrix products and attention heads.

use super::{
    ffn_decode, ffn_decode_gated, gemv, gemv_many, kernels, matmul, on_huge_pages, row_to_f32, with_weights, FfnRows,
    GatedScratch, RowCopy, WeightSlice, MAX_FFN_CHUNKS, PREFETCH_AHEAD,
};
use crate::config::Activation;
use crate::error::{Error, Result};
use crate::kernels::{AttnShape, Backend, Buf, FfnScratch, FfnWeights, Matrix, MatrixStore, Step};
use crate::quant::QBlocks;
use candle_core::Tensor;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Arc;

/// Runs `f` on a host matrix's elements or blocks (no copy).
fn with_matrix<R>(m: &Matrix, f: impl FnOnce(WeightSlice<'_>) -> R) -> Result<R> {
    match &m.store {
        MatrixStore::HostBlocks(b) => Ok(f(WeightSlice::Q(b.slice()))),
        _ => with_weights(m.host()?, f),
    }
}

pub struct CpuBackend;

/// Rows shorter than this are decoded sparse from a compact copy ([`KeptRows`]).
pub const COMPACT_BELOW_BYTES: usize = 2 * PREFETCH_AHEAD;

/// [`COMPACT_BELOW_BYTES`], or `TDA_ENGINE_COMPACT_BELOW` (bytes; 0 reads every row in place), which
/// the benchmarks use to measure what the copy buys.
fn compact_below() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("TDA_ENGINE_COMPACT_BELOW").ok().and_then(|v| v.parse().ok()).unwrap_or(COMPACT_BELOW_BYTES)
    })
}

/// One FFN layer's sparse-decoding state in a run state: the kept neurons of the current selection,
/// and, for FFNs whose rows are shorter than [`COMPACT_BELOW_BYTES`] (4 KiB), a compact copy of their
/// rows. Reading such short rows in place, scattered, leaves the memory system idle between them
/// (BENCHMARKS.md, kernels), while the copy streams. The copy is made at the first decode step after
/// each selection (one pass over the kept bytes) and reused; larger models read the kept rows in
/// place, as fast, with no copy. Gated layers read in place too (see `ffn_decode`).
#[derive(Default)]
pub struct KeptRows {
    /// The selection the kept list was taken from.
    version: Option<u64>,
    /// Every neuron is kept.
    all: bool,
    kept: Vec<u32>,
    keep_row: Vec<f32>,
    /// The per-token gate threshold (0: none), and since the selection, the token rows run sparse
    /// and the neurons that passed the gate in them.
    threshold: f32,
    rows: u64,
    passed: u64,
    gated: GatedScratch,
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
    /// The gate and up outputs of [`ffn_dense_stored`] (`2 x intermediate`), per calling thread.
    static GATE_UP: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Dense decode of a gated FFN whose down projection is kept as stored (`down`, `d x n`: quantized
/// weights, blocks along the neurons): the gate and up products in one dispatch, the activation,
/// then the down product, as llama.cpp runs it. Every weight is read once, in its stored blocks.
fn ffn_dense_stored(
    w: &FfnWeights<'_>,
    down: &Matrix,
    gb: Option<&[f32]>,
    ub: Option<&[f32]>,
    x: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let (n, d) = (w.gate.rows, w.gate.cols);
    GATE_UP.with_borrow_mut(|buf| {
        if buf.len() < 2 * n {
            buf.resize(2 * n, 0.0);
        }
        let (g, u) = buf[..2 * n].split_at_mut(n);
        with_matrix(w.gate, |wg| with_matrix(w.up, |wu| gemv_many(d, x, &mut [(wg, &mut *g), (wu, &mut *u)])))??;
        for j in 0..n {
            let (gj, uj) = (g[j] + gb.map_or(0.0, |b| b[j]), u[j] + ub.map_or(0.0, |b| b[j]));
            g[j] = activate(w.act, gj) * uj;
        }
        with_matrix(down, |wd| gemv(wd, n, g, out))
    })
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

/// Positions of one block of attention scores (on the stack, 4 KiB).
const SCORE_BLOCK: usize = 1024;

/// From this many rows on (prefill), attention runs as matrix products per head.
const PREFILL_ATTENTION_ROWS: usize = 16;

/// Query rows per task of [`prefill_attention`].
const QUERY_BLOCK: usize = 64;

/// Prefill attention as matrix products: per head and block of [`QUERY_BLOCK`] query rows,
/// `S = Q K^T * scale` over the keys the block can see, the causal (and sliding-window) mask and
/// soft-cap, a softmax per row, then `ctx = S V`. The scores of one block live in a scratch matrix
/// of `QUERY_BLOCK x keys`; the keys and values are read where the cache holds them (strided).
#[allow(clippy::too_many_arguments)]
fn prefill_attention(s: &AttnShape, start: usize, rows: usize, q: &[f32], kc: &[f32], vc: &[f32], ctx: &mut [f32]) {
    let (hd, heads) = (s.head_dim, s.heads);
    let (qd, kvd) = (heads * hd, s.kv_heads * hd);
    let group = heads / s.kv_heads;
    let blocks = rows.div_ceil(QUERY_BLOCK);
    // Each task writes its block's rows of one head: the output columns h*hd..(h+1)*hd of rows
    // r0..r1. Tasks own disjoint parts of ctx, handed out as raw parts of one slice.
    let out = SyncPtr(ctx.as_mut_ptr());
    (0..heads * blocks).into_par_iter().for_each(|t| {
        let (h, b) = (t / blocks, t % blocks);
        let (r0, r1) = (b * QUERY_BLOCK, ((b + 1) * QUERY_BLOCK).min(rows));
        let m = r1 - r0;
        // Keys visible to some row of the block: from the first row's window start to the last row.
        let lo = s.window.map_or(0, |w| (start + r0 + 1).saturating_sub(w));
        let hi = start + r1; // exclusive
        let keys = hi - lo;
        let kv_off = (h / group) * hd;
        let mut sc = vec![0f32; m * keys];
        let qh = &q[r0 * qd + h * hd..];
        let kh = &kc[lo * kvd + kv_off..];
        // S = Q_h K_h^T: K_h^T is hd x keys with row stride 1 and column stride kvd.
        // SAFETY: sc is this task's own m x keys matrix.
        unsafe { super::gemm::gemm_f32_serial((m, keys, hd), sc.as_mut_ptr(), keys, (qh, qd), (kh, 1, kvd)) };
        for (i, row) in sc.chunks_mut(keys).enumerate() {
            let p = start + r0 + i;
            let first = s.window.map_or(0, |w| (p + 1).saturating_sub(w));
            let mut mx = f32::NEG_INFINITY;
            for (j, x) in row.iter_mut().enumerate() {
                let pos = lo + j;
                if pos < first || pos > p {
                    *x = f32::NEG_INFINITY;
                    continue;
                }
                let mut v = *x * s.scale;
                if let Some(cap) = s.softcap {
                    v = (v / cap).tanh() * cap;
                }
                *x = v;
                mx = mx.max(v);
            }
            let mut l = 0f32;
            for x in row.iter_mut() {
                *x = if *x == f32::NEG_INFINITY { 0.0 } else { (*x - mx).exp() };
                l += *x;
            }
            let inv = 1.0 / l;
            row.iter_mut().for_each(|x| *x *= inv);
        }
        // ctx rows r0..r1, columns h*hd..h*hd+hd, row stride qd.
        let vh = &vc[lo * kvd + kv_off..];
        // SAFETY: ctx holds rows * qd values and this task alone writes these (row, column)
        // positions: the tasks' (head, block) pairs are distinct.
        unsafe { super::gemm::gemm_f32_serial((m, hd, keys), out.at(r0 * qd + h * hd), qd, (&sc, keys), (vh, kvd, 1)) };
    });
}

/// A pointer that tasks writing disjoint parts of one buffer share.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
impl SyncPtr {
    /// The pointer `i` elements on (a method, so that closures capture the whole `SyncPtr`).
    /// # Safety
    /// `i` must be inside the buffer.
    unsafe fn at(self, i: usize) -> *mut f32 {
        unsafe { self.0.add(i) }
    }
}
// SAFETY: used only by tasks that write disjoint elements (see `prefill_attention`).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl Backend for CpuBackend {
    fn in_pool(&self, f: &mut (dyn FnMut() -> Result<()> + Send)) -> Result<()> {
        if rayon::current_thread_index().is_some() {
            return f();
        }
        rayon::scope(|_| f())
    }

    fn device(&self) -> String {
        "cpu".into()
    }

    fn matrix(&self, t: Tensor) -> Result<Matrix> {
        let (rows, cols) = t.dims2()?;
        let dtype = t.dtype();
        Ok(Matrix { rows, cols, dtype, store: MatrixStore::Host(on_huge_pages(t)?) })
    }

    fn quantized(&self, rows: usize, cols: usize, blocks: QBlocks) -> Result<Matrix> {
        let q = blocks.qtype();
        if !q.fits(cols) || blocks.slice().len() * q.block() != rows * cols {
            return Err(Error::Internal(format!("{} blocks do not make a {rows} x {cols} matrix", q.name())));
        }
        Ok(Matrix { rows, cols, dtype: candle_core::DType::F32, store: MatrixStore::HostBlocks(Arc::new(blocks)) })
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
        gate: f32,
        version: u64,
        scratch: &mut FfnScratch,
    ) -> Result<()> {
        let s = host_kept_mut(scratch)?;
        if s.version != Some(version) {
            s.version = Some(version);
            (s.threshold, s.rows, s.passed) = (gate, 0, 0);
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
        with_matrix(table, |w| {
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

    fn row_exact(&self) -> bool {
        super::prefill_path() == "tiles-avx2"
    }

    fn add(&self, x: &mut Buf, y: &Buf, len: usize) -> Result<()> {
        x.host_mut()?[..len].iter_mut().zip(&y.host()?[..len]).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn linear(&self, w: &Matrix, bias: Option<&Buf>, x: &Buf, rows: usize, out: &mut Buf) -> Result<()> {
        let (x, out) = (&x.host()?[..rows * w.cols], &mut out.host_mut()?[..rows * w.rows]);
        with_matrix(w, |ws| {
            if rows == 1 {
                gemv(ws, w.cols, x, out)
            } else {
                matmul(x, rows, ws, w.rows, w.cols, true, out)
            }
        })?;
        add_rows(out, bias, w.rows)
    }

    fn linear_exact(&self, w: &Matrix, bias: Option<&Buf>, x: &Buf, out: &mut Buf) -> Result<()> {
        match &w.store {
            MatrixStore::HostBlocks(b) => {
                let (x, out) = (&x.host()?[..w.cols], &mut out.host_mut()?[..w.rows]);
                super::gemv_float_acts_with(super::kernels(), b.slice(), w.cols, x, out);
                add_rows(out, bias, w.rows)
            }
            _ => self.linear(w, bias, x, 1, out),
        }
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
        with_matrix(ws[0].0, |w0| {
            with_matrix(ws[1].0, |w1| {
                with_matrix(ws[2].0, |w2| gemv_many(d, x, &mut [(w0, &mut *o0), (w1, &mut *o1), (w2, &mut *o2)]))
            })
        })???;
        for ((w, b), o) in ws.iter().zip([o0, o1, o2]) {
            add_rows(o, *b, w.rows)?;
        }
        Ok(())
    }

    fn matmul(&self, x: &Buf, rows: usize, w: &Matrix, bias: Option<&Buf>, out: &mut Buf) -> Result<()> {
        let (x, out) = (&x.host()?[..rows * w.rows], &mut out.host_mut()?[..rows * w.cols]);
        with_matrix(w, |ws| matmul(x, rows, ws, w.rows, w.cols, false, out))?;
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
        if rows >= PREFILL_ATTENTION_ROWS {
            prefill_attention(s, start, rows, q, kc, vc, &mut ctx.host_mut()?[..rows * qd]);
            return Ok(());
        }
        let k = kernels();
        // One task per (row, head). The visible keys are taken in blocks of SCORE_BLOCK positions:
        // a block's scores go to the stack, then its softmax weights and their sum of values; the
        // running output is rescaled once per block when the maximum grows (an online softmax at
        // block granularity), so no rows x positions matrix and no allocation.
        ctx.host_mut()?[..rows * qd].par_chunks_mut(hd).enumerate().for_each(|(c, o)| {
            let (i, h) = (c / heads, c % heads);
            let p = start + i;
            let lo = s.window.map_or(0, |w| (p + 1).saturating_sub(w));
            let qh = &q[i * qd + h * hd..i * qd + (h + 1) * hd];
            let kv_off = (h / group) * hd;
            o.fill(0.0);
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            let mut scores = [0f32; SCORE_BLOCK];
            for b0 in (lo..=p).step_by(SCORE_BLOCK) {
                let b1 = (b0 + SCORE_BLOCK).min(p + 1);
                let sc = &mut scores[..b1 - b0];
                let mut bm = f32::NEG_INFINITY;
                for (j, v) in (b0..b1).zip(sc.iter_mut()) {
                    let mut x = k.dot(qh, &kc[j * kvd + kv_off..j * kvd + kv_off + hd]) * s.scale;
                    if let Some(cap) = s.softcap {
                        x = (x / cap).tanh() * cap;
                    }
                    *v = x;
                    bm = bm.max(x);
                }
                if bm > m {
                    let r = (m - bm).exp();
                    if l > 0.0 {
                        l *= r;
                        o.iter_mut().for_each(|x| *x *= r);
                    }
                    m = bm;
                }
                for v in sc.iter_mut() {
                    *v = (*v - m).exp();
                    l += *v;
                }
                for (j, &e) in (b0..b1).zip(sc.iter()) {
                    k.axpy(e, &vc[j * kvd + kv_off..j * kvd + kv_off + hd], o);
                }
            }
            let inv = 1.0 / l;
            o.iter_mut().for_each(|x| *x *= inv);
        });
        Ok(())
    }

    fn gate_act(&self, act: Activation, a: &mut Buf, u: &Buf, len: usize) -> Result<()> {
        // Prefill's activation: rows x intermediate values, a transcendental each; split over threads.
        const CHUNK: usize = 1 << 14;
        let u = &u.host()?[..len];
        a.host_mut()?[..len].par_chunks_mut(CHUNK).zip(u.par_chunks(CHUNK)).for_each(|(a, u)| {
            for (ai, ui) in a.iter_mut().zip(u) {
                *ai = activate(act, *ai) * ui;
            }
        });
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

    fn sparse_act(
        &self,
        act: Activation,
        a: &mut Buf,
        u: &Buf,
        rows: usize,
        n: usize,
        scratch: &mut FfnScratch,
    ) -> Result<()> {
        let s = host_kept_mut(scratch)?;
        if s.threshold == 0.0 {
            self.gate_act(act, a, u, rows * n)?;
            return self.mask_cols(a, rows, n, scratch);
        }
        let (t, keep) = (s.threshold, &s.keep_row[..n]);
        let (a, u) = (&mut a.host_mut()?[..rows * n], &u.host()?[..rows * n]);
        let passed: u64 = a
            .par_chunks_mut(n)
            .zip(u.par_chunks(n))
            .map(|(a, u)| {
                let mut passed = 0;
                for ((v, u), k) in a.iter_mut().zip(u).zip(keep) {
                    let g = activate(act, *v);
                    // As decoding decides it: a kept neuron whose |act(g)| reaches the threshold.
                    if *k != 0.0 && g.abs() >= t {
                        *v = g * u;
                        passed += 1;
                    } else {
                        *v = 0.0;
                    }
                }
                passed
            })
            .sum();
        (s.rows, s.passed) = (s.rows + rows as u64, s.passed + passed);
        Ok(())
    }

    fn ffn_counts(&self, scratch: &FfnScratch, version: u64) -> Option<(u64, u64)> {
        let s = host_kept(scratch).ok()?;
        (s.version == Some(version)).then_some((s.rows, s.passed))
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
        let gated = sparse && s.threshold > 0.0;
        let sparse = sparse && (!s.all || gated);
        if let (false, Some(down)) = (sparse, w.down) {
            return ffn_dense_stored(w, down, gb, ub, x, out);
        }
        PARTIALS.with_borrow_mut(|partials| {
            if partials.len() < MAX_FFN_CHUNKS * d {
                partials.resize(MAX_FFN_CHUNKS * d, 0.0);
            }
            let k = kernels();
            let (t, mut passed) = (s.threshold, 0usize);
            // Moved out for the call (its buffers move with it), so that the copy can be borrowed.
            let mut gs = std::mem::take(&mut s.gated);
            let r = with_matrix(w.gate, |wg| {
                with_matrix(w.up, |wu| {
                    with_matrix(w.down_t, |wd| {
                        let rows = FfnRows { gate: wg, up: wu, down_t: wd, gate_bias: gb, up_bias: ub, d };
                        if !sparse {
                            return ffn_decode(k, rows, n, None, x, |v| activate(act, v), partials, out);
                        }
                        // The rows to read: in place (all, or the kept list), or a compact copy of
                        // the kept ones when rows are short. A gated layer reads in place: its up
                        // and down rows are scattered (the passing neurons) either way, and reading
                        // the kept gate rows in place was as fast as the copy (BENCHMARKS.md, issue
                        // 14) while the copy would duplicate most of the layer in memory.
                        let (rows, n, kept) = if s.all {
                            (rows, n, None)
                        } else if gated || wg.row_bytes(d) >= compact_below() {
                            (rows, n, Some(&s.kept[..]))
                        } else {
                            if s.copied != s.version {
                                s.fill(rows);
                            }
                            (s.compact(rows), s.kept.len(), None)
                        };
                        match gated {
                            false => ffn_decode(k, rows, n, kept, x, |v| activate(act, v), partials, out),
                            true => {
                                let act = |v| activate(act, v);
                                passed = ffn_decode_gated(k, rows, n, kept, t, x, act, &mut gs, partials, out);
                            }
                        }
                    })
                })
            });
            s.gated = gs;
            r???;
            if gated {
                (s.rows, s.passed) = (s.rows + 1, s.passed + passed as u64);
            }
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
        with_matrix(w, |ws| {
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

    fn copy(&self, src: &Buf, src_offset: usize, dst: &mut Buf, dst_offset: usize, len: usize) -> Result<()> {
        let (src, dst) = (src.host()?, dst.host_mut()?);
        if src_offset + len > src.len() || dst_offset + len > dst.len() {
            return Err(Error::Internal(format!(
                "a copy of {len} values from {src_offset} of {} to {dst_offset} of {} is out of bounds",
                src.len(),
                dst.len()
            )));
        }
        dst[dst_offset..dst_offset + len].copy_from_slice(&src[src_offset..src_offset + len]);
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
    fn compact(&self, like: FfnRows<'_>) -> FfnRows<'_> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 40.0).collect()
    }

    /// Attention of the query at position `p` over the cache, in f64, as written in the papers.
    fn reference(s: &AttnShape, q: &[f32], kc: &[f32], vc: &[f32], p: usize) -> Vec<f64> {
        let (hd, kvd, group) = (s.head_dim, s.kv_heads * s.head_dim, s.heads / s.kv_heads);
        let lo = s.window.map_or(0, |w| (p + 1).saturating_sub(w));
        let mut out = vec![0f64; s.heads * hd];
        for h in 0..s.heads {
            let off = (h / group) * hd;
            let sc: Vec<f64> = (lo..=p)
                .map(|j| {
                    let d: f64 = (0..hd).map(|e| q[h * hd + e] as f64 * kc[j * kvd + off + e] as f64).sum();
                    let x = d * s.scale as f64;
                    s.softcap.map_or(x, |c| (x / c as f64).tanh() * c as f64)
                })
                .collect();
            let mx = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
            for (t, j) in (lo..=p).enumerate() {
                let wgt = (sc[t] - mx).exp() / z;
                for e in 0..hd {
                    out[h * hd + e] += wgt * vc[j * kvd + off + e] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn decode_attention_matches_reference_across_blocks_windows_caps_and_groups() {
        // (heads, kv_heads): groups of 1, 3 and 20, over 2100 positions (three of the 1024-position
        // score blocks), with and without a window and a soft cap.
        for &(heads, kv_heads) in &[(4, 4), (6, 2), (40, 2)] {
            for (window, softcap) in [(None, None), (Some(1000), None), (None, Some(5.0)), (Some(257), Some(5.0))] {
                let hd = 12;
                let s = AttnShape { heads, kv_heads, head_dim: hd, scale: 0.3, softcap, window };
                let (qd, kvd, p) = (heads * hd, kv_heads * hd, 2099);
                let mut kc = Buf::Host(values((p + 1) * kvd, 1));
                let mut vc = Buf::Host(values((p + 1) * kvd, 2));
                let (k, v) = (Buf::Host(values(kvd, 3)), Buf::Host(values(kvd, 4)));
                let q = Buf::Host(values(qd, 5));
                let mut ctx = Buf::Host(vec![f32::NAN; qd]);
                let step = Step::Host { tokens: vec![0], start: p };
                CpuBackend.attention(&s, &step, 1, &q, &k, &v, &mut kc, &mut vc, &mut ctx).unwrap();
                let want = reference(&s, q.host().unwrap(), kc.host().unwrap(), vc.host().unwrap(), p);
                for (g, w) in ctx.host().unwrap().iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-5, "{heads}/{kv_heads} {window:?} {softcap:?}: {g} vs {w}");
                }
            }
        }
    }
}
