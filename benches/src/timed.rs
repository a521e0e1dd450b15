//! A backend that times another: every operation of the forward is passed through and its wall
//! time added to a per-operation total, so that a decode token's time can be split by operation
//! (the `profile` binary). The operations run exactly as in the engine; only `Instant::now()` is
//! added around each.

use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tda_core::config::Activation;
use tda_core::kernels::{AttnShape, Backend, Buf, Draw, FfnScratch, FfnWeights, Graphs, Matrix, Step};
use tda_core::Result;

/// Calls and seconds per operation name.
pub type Totals = BTreeMap<String, (u64, f64)>;

pub struct Timed {
    inner: Arc<dyn Backend>,
    /// Rows of the LM head (the vocabulary): its `linear` calls are counted apart.
    vocab: usize,
    totals: Mutex<Totals>,
}

impl Timed {
    pub fn new(inner: Arc<dyn Backend>, vocab: usize) -> Self {
        Self { inner, vocab, totals: Mutex::new(BTreeMap::new()) }
    }

    /// The totals so far, and a fresh start.
    pub fn take(&self) -> Totals {
        std::mem::take(&mut *self.totals.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn time<R>(&self, name: &str, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        let dt = t.elapsed().as_secs_f64();
        let mut m = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(name.to_string()).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += dt;
        r
    }
}

impl Backend for Timed {
    fn device(&self) -> String {
        self.inner.device()
    }
    fn matrix(&self, t: Tensor) -> Result<Matrix> {
        self.inner.matrix(t)
    }
    fn quantized(&self, rows: usize, cols: usize, blocks: tda_core::quant::QBlocks) -> Result<Matrix> {
        self.inner.quantized(rows, cols, blocks)
    }
    fn random_matrix(&self, rows: usize, cols: usize, dtype: DType, seed: u64, scale: f32) -> Option<Result<Matrix>> {
        self.inner.random_matrix(rows, cols, dtype, seed, scale)
    }
    fn upload(&self, v: &[f32]) -> Result<Buf> {
        self.inner.upload(v)
    }
    fn zeros(&self, len: usize) -> Result<Buf> {
        self.inner.zeros(len)
    }
    fn download(&self, b: &Buf, out: &mut [f32]) -> Result<()> {
        self.time("download", || self.inner.download(b, out))
    }
    fn fill_zero(&self, b: &mut Buf, len: usize) -> Result<()> {
        self.time("fill_zero", || self.inner.fill_zero(b, len))
    }
    fn new_step(&self, rows: usize) -> Result<Step> {
        self.inner.new_step(rows)
    }
    fn new_ffn_scratch(&self) -> FfnScratch {
        self.inner.new_ffn_scratch()
    }
    fn set_step(&self, step: &mut Step, tokens: &[u32], start: usize) -> Result<()> {
        self.time("set_step", || self.inner.set_step(step, tokens, start))
    }
    fn prepare_ffn(
        &self,
        w: &FfnWeights<'_>,
        kept: Option<&[u32]>,
        keep_row: &[f32],
        gate: f32,
        version: u64,
        scratch: &mut FfnScratch,
    ) -> Result<()> {
        self.time("prepare_ffn", || self.inner.prepare_ffn(w, kept, keep_row, gate, version, scratch))
    }
    fn ffn_counts(&self, scratch: &FfnScratch, version: u64) -> Option<(u64, u64)> {
        self.inner.ffn_counts(scratch, version)
    }
    fn run_graph(&self, graphs: &mut Graphs, key: u64, enqueue: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.inner.run_graph(graphs, key, enqueue)
    }
    fn embed(&self, table: &Matrix, step: &Step, rows: usize, scale: Option<f32>, x: &mut Buf) -> Result<()> {
        self.time("embed", || self.inner.embed(table, step, rows, scale, x))
    }
    fn rms_norm(&self, x: &Buf, gain: &Buf, eps: f32, dim: usize, rows: usize, out: &mut Buf) -> Result<()> {
        self.time("rms_norm", || self.inner.rms_norm(x, gain, eps, dim, rows, out))
    }
    fn rms_norm_inplace(&self, x: &mut Buf, gain: &Buf, eps: f32, dim: usize, rows: usize) -> Result<()> {
        self.time("rms_norm", || self.inner.rms_norm_inplace(x, gain, eps, dim, rows))
    }
    fn add(&self, x: &mut Buf, y: &Buf, len: usize) -> Result<()> {
        self.time("add", || self.inner.add(x, y, len))
    }
    fn linear(&self, w: &Matrix, bias: Option<&Buf>, x: &Buf, rows: usize, out: &mut Buf) -> Result<()> {
        let name = match (w.rows == self.vocab, rows) {
            (true, _) => "lm_head",
            (false, 1) => "linear (o_proj)",
            (false, _) => "linear (prefill)",
        };
        self.time(name, || self.inner.linear(w, bias, x, rows, out))
    }
    fn linear3(&self, ws: [(&Matrix, Option<&Buf>); 3], x: &Buf, outs: [&mut Buf; 3]) -> Result<()> {
        self.time("linear3 (q, k, v)", || self.inner.linear3(ws, x, outs))
    }
    fn matmul(&self, x: &Buf, rows: usize, w: &Matrix, bias: Option<&Buf>, out: &mut Buf) -> Result<()> {
        self.time("matmul", || self.inner.matmul(x, rows, w, bias, out))
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
        self.time("rope", || self.inner.rope(x, cos, sin, head_dim, width, step, rows))
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
        self.time("attention", || self.inner.attention(s, step, rows, q, k, v, k_cache, v_cache, ctx))
    }
    fn gate_act(&self, act: Activation, a: &mut Buf, u: &Buf, len: usize) -> Result<()> {
        self.time("gate_act", || self.inner.gate_act(act, a, u, len))
    }
    fn observe(&self, a: &Buf, rows: usize, n: usize, acc: &mut Buf, offset: usize) -> Result<()> {
        self.time("observe", || self.inner.observe(a, rows, n, acc, offset))
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
        self.time("sparse_act", || self.inner.sparse_act(act, a, u, rows, n, scratch))
    }
    fn mask_cols(&self, a: &mut Buf, rows: usize, n: usize, scratch: &FfnScratch) -> Result<()> {
        self.time("mask_cols", || self.inner.mask_cols(a, rows, n, scratch))
    }
    fn ffn_decode(
        &self,
        w: &FfnWeights<'_>,
        sparse: bool,
        scratch: &mut FfnScratch,
        x: &Buf,
        out: &mut Buf,
    ) -> Result<()> {
        self.time("ffn_decode", || self.inner.ffn_decode(w, sparse, scratch, x, out))
    }
    fn soft_cap(&self, x: &mut Buf, cap: f32, len: usize) -> Result<()> {
        self.time("soft_cap", || self.inner.soft_cap(x, cap, len))
    }
    fn argmax(&self, x: &Buf, len: usize) -> Result<u32> {
        self.time("argmax", || self.inner.argmax(x, len))
    }
    fn sample(&self, x: &Buf, len: usize, draw: &Draw) -> Option<Result<u32>> {
        self.inner.sample(x, len, draw)
    }
    fn exclusive(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.inner.exclusive()
    }
    fn row_exact(&self) -> bool {
        self.inner.row_exact()
    }
    fn output_buf(&self, host: Vec<f32>) -> Result<Buf> {
        self.inner.output_buf(host)
    }
    fn read_output(&self, b: Buf, host: &mut Vec<f32>) -> Result<()> {
        self.inner.read_output(b, host)
    }
    fn copy(&self, src: &Buf, src_offset: usize, dst: &mut Buf, dst_offset: usize, len: usize) -> Result<()> {
        self.time("copy", || self.inner.copy(src, src_offset, dst, dst_offset, len))
    }
    fn row_sq_norms(&self, w: &Matrix) -> Result<Vec<f64>> {
        self.inner.row_sq_norms(w)
    }
}
