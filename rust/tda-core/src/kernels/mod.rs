//! Compute backends. The decoder (`model/`) is written once against [`Backend`]; a backend owns the
//! buffers and the kernels: [`cpu`] (always built) and `cuda` (Cargo feature `cuda`).
//!
//! Every activation buffer is f32 ([`Buf`]); weight matrices ([`Matrix`]) stay in the engine dtype
//! (f32, bf16 or f16) and are read in place by the kernels, with f32 accumulation. A forward pass
//! is a sequence of backend calls over `rows` tokens at positions `start..start + rows`; the token
//! ids and `start` live in a [`Step`] that the backend's kernels read, so that a device backend can
//! record one decode step as a graph and replay it for every later token ([`Backend::run_graph`]).
//!
//! A step's rows belong to one sequence. A batched decode step (`Model::decode_batch`: one row for
//! each of several sequences) runs the weight-streaming calls (`linear`, the dense FFN) over all
//! the rows, and `rope` and `attention` once per sequence, with that sequence's [`Step`] and cache.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::config::Activation;
use crate::error::Result;
use crate::quant::{QBlocks, QType};
use candle_core::{DType, Tensor};
use std::any::Any;

/// An f32 buffer where a backend's kernels read and write it.
pub enum Buf {
    Host(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(cuda::DeviceBuf),
}

impl Buf {
    pub fn len(&self) -> usize {
        match self {
            Buf::Host(v) => v.len(),
            #[cfg(feature = "cuda")]
            Buf::Cuda(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, when the buffer is in host memory.
    pub fn host(&self) -> Result<&[f32]> {
        match self {
            Buf::Host(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Buf::Cuda(_) => Err(crate::error::Error::Internal("a device buffer was handed to the CPU backend".into())),
        }
    }

    pub fn host_mut(&mut self) -> Result<&mut [f32]> {
        match self {
            Buf::Host(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Buf::Cuda(_) => Err(crate::error::Error::Internal("a device buffer was handed to the CPU backend".into())),
        }
    }
}

/// A weight matrix, `rows x cols` row-major, in a float dtype or in quantized blocks. Cloning
/// shares the storage (tied embeddings).
#[derive(Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    /// The float dtype of the elements; f32 for quantized blocks (what they are multiplied in).
    pub dtype: DType,
    pub store: MatrixStore,
}

#[derive(Clone)]
pub enum MatrixStore {
    /// A contiguous CPU tensor (on huge pages).
    Host(Tensor),
    /// Quantized blocks in host memory (on huge pages), every row whole blocks.
    HostBlocks(std::sync::Arc<QBlocks>),
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<cuda::DeviceMatrix>),
}

impl Matrix {
    /// Bytes of the elements.
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes()
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        match self.qtype() {
            Some(q) => q.row_bytes(self.cols),
            None => self.cols * self.dtype.size_in_bytes(),
        }
    }

    /// The block type, for a quantized matrix.
    pub fn qtype(&self) -> Option<QType> {
        match &self.store {
            MatrixStore::HostBlocks(b) => Some(b.qtype()),
            _ => None,
        }
    }

    /// The storage type's name: `float32`, `bfloat16`, `float16`, or a block type (`q4_k`, ...).
    pub fn type_name(&self) -> &'static str {
        match self.qtype() {
            Some(q) => q.name(),
            None => match self.dtype {
                DType::BF16 => "bfloat16",
                DType::F16 => "float16",
                _ => "float32",
            },
        }
    }

    /// The CPU tensor, when the matrix is in host memory.
    pub fn host(&self) -> Result<&Tensor> {
        match &self.store {
            MatrixStore::Host(t) => Ok(t),
            _ => Err(crate::error::Error::Internal("not a host tensor: a device matrix or quantized blocks".into())),
        }
    }
}

/// The token ids and first position of the rows a forward pass runs, where the kernels read them.
pub enum Step {
    Host {
        tokens: Vec<u32>,
        start: usize,
    },
    #[cfg(feature = "cuda")]
    Cuda(cuda::DeviceStep),
}

/// What sparse decoding of one FFN layer keeps in a run state between steps: the kept neuron
/// list where the kernels read it, made once per selection ([`Backend::prepare_ffn`]).
pub enum FfnScratch {
    Host(cpu::KeptRows),
    #[cfg(feature = "cuda")]
    Cuda(cuda::DeviceKept),
}

/// Shape and options of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q . k`.
    pub scale: f32,
    /// `cap * tanh(s / cap)` on the scaled scores.
    pub softcap: Option<f32>,
    /// A query at position i sees keys j with `i - W < j <= i`.
    pub window: Option<usize>,
}

/// The weights of one gated FFN: `gate` and `up` are `n x d`, `down_t` is the down projection
/// transposed (`n x d`), so that every neuron owns one contiguous row of each. For quantized
/// weights `down` is the down projection as stored (`d x n`, blocks along the neurons), which dense
/// decoding reads instead of `down_t` (a requantized copy for sparse decoding).
#[derive(Clone, Copy)]
pub struct FfnWeights<'a> {
    pub gate: &'a Matrix,
    pub up: &'a Matrix,
    pub down_t: &'a Matrix,
    pub down: Option<&'a Matrix>,
    pub gate_bias: Option<&'a Buf>,
    pub up_bias: Option<&'a Buf>,
    pub act: Activation,
}

/// The draw of a sampled token: `softmax(x / temperature)` over the `top_k` largest logits (0 = all),
/// cut to the smallest most-likely prefix whose mass reaches `top_p`, then to the candidates with at
/// least `min_p` times the top probability; `u` in `[0, 1)` picks one by its share of that mass.
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub u: f32,
}

/// A backend's recorded decode steps, kept in the run state whose buffers they use.
pub type Graphs = Option<Box<dyn Any + Send>>;

/// Kernels and memory of one device. Calls on one run state are issued in order; a device backend
/// may run them asynchronously, and [`Backend::download`] and [`Backend::argmax`] wait for them.
///
/// Conventions: `rows` is the number of token rows; a buffer holds at least `rows x width` values
/// (row-major) and only that prefix is read or written; `dim` is a row's width.
pub trait Backend: Send + Sync {
    /// `cpu` or `cuda:N`.
    fn device(&self) -> String;

    // ---- memory --------------------------------------------------------------------------------

    /// Takes a weight matrix (a 2-D CPU tensor in the engine dtype) into the backend's memory.
    fn matrix(&self, t: Tensor) -> Result<Matrix>;
    /// Takes a quantized `rows x cols` matrix into the backend's memory; an error where the
    /// backend has no kernels for blocks.
    fn quantized(&self, _rows: usize, _cols: usize, blocks: QBlocks) -> Result<Matrix> {
        Err(crate::error::Error::arg(format!(
            "the {} backend has no kernels for quantized ({}) weights; load the model with dtype='float32', \
             'bfloat16' or 'float16'",
            self.device(),
            blocks.qtype().name()
        )))
    }
    /// A `rows x cols` matrix of uniform values in `[-scale, scale)` made on the device itself,
    /// when the backend can (benchmarks of shapes that do not fit a host copy); `None` otherwise.
    fn random_matrix(
        &self,
        _rows: usize,
        _cols: usize,
        _dtype: DType,
        _seed: u64,
        _scale: f32,
    ) -> Option<Result<Matrix>> {
        None
    }
    fn upload(&self, v: &[f32]) -> Result<Buf>;
    fn zeros(&self, len: usize) -> Result<Buf>;
    /// Copies the first `out.len()` values of `b` into `out` (waits for pending work).
    fn download(&self, b: &Buf, out: &mut [f32]) -> Result<()>;
    /// Sets the first `len` values of `b` to zero.
    fn fill_zero(&self, b: &mut Buf, len: usize) -> Result<()>;
    /// A step for up to `rows` tokens.
    fn new_step(&self, rows: usize) -> Result<Step>;
    fn new_ffn_scratch(&self) -> FfnScratch;

    // ---- per forward, outside any recorded graph -------------------------------------------------

    /// Writes the token ids and first position of the next forward into `step`.
    fn set_step(&self, step: &mut Step, tokens: &[u32], start: usize) -> Result<()>;
    /// Makes `scratch` hold the kept neurons of one layer (`kept`, ascending; `None` = all of them),
    /// the 0/1 row `keep_row` (length `n`) and the per-token gate threshold `gate` (0: none), unless
    /// it already holds selection `version`. A new selection restarts [`Backend::ffn_counts`].
    #[allow(clippy::too_many_arguments)]
    fn prepare_ffn(
        &self,
        w: &FfnWeights<'_>,
        kept: Option<&[u32]>,
        keep_row: &[f32],
        gate: f32,
        version: u64,
        scratch: &mut FfnScratch,
    ) -> Result<()>;
    /// For a gated layer (see [`Backend::prepare_ffn`]) holding selection `version`: how many token
    /// rows ran sparse since the selection, and how many neurons passed the gate over all of them
    /// (what the up and down projections read). `None` when `scratch` holds another selection.
    fn ffn_counts(&self, _scratch: &FfnScratch, _version: u64) -> Option<(u64, u64)> {
        None
    }
    /// Runs one forward pass `f` where the backend's host threads are. The CPU runs it on a thread
    /// of its pool, so that the forward's parallel loops fork and join inside the pool (tens of
    /// nanoseconds) instead of each waking the pool from outside (about 20 us, twice a context
    /// switch); a device backend runs it in place.
    fn in_pool(&self, f: &mut (dyn FnMut() -> Result<()> + Send)) -> Result<()> {
        f()
    }
    /// Runs `enqueue` (the kernels of one decode step). A device backend may record it as a graph
    /// the first time it sees `key` in `graphs` and replay the recording afterwards: everything
    /// `enqueue` does must then be a kernel that reads its inputs from device memory.
    fn run_graph(&self, _graphs: &mut Graphs, _key: u64, enqueue: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        enqueue()
    }

    // ---- the forward's operations -----------------------------------------------------------------

    /// `x[i] = table[tokens[i]] * scale` for the step's tokens.
    fn embed(&self, table: &Matrix, step: &Step, rows: usize, scale: Option<f32>, x: &mut Buf) -> Result<()>;
    /// `out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * gain` for rows of `gain.len() = dim` values.
    fn rms_norm(&self, x: &Buf, gain: &Buf, eps: f32, dim: usize, rows: usize, out: &mut Buf) -> Result<()>;
    /// The same, in place.
    fn rms_norm_inplace(&self, x: &mut Buf, gain: &Buf, eps: f32, dim: usize, rows: usize) -> Result<()>;
    /// `x += y` over `len` values.
    fn add(&self, x: &mut Buf, y: &Buf, len: usize) -> Result<()>;
    /// `out = x W^T + bias` (`W` is `out_dim x in_dim`).
    fn linear(&self, w: &Matrix, bias: Option<&Buf>, x: &Buf, rows: usize, out: &mut Buf) -> Result<()>;
    /// [`Backend::linear`] of one row with its activations kept in f32 for quantized weights
    /// (decode's products round them to 8 bits): the prefill's logits, so that the first token is
    /// the float model's. Backends without quantized weights take `linear`.
    fn linear_exact(&self, w: &Matrix, bias: Option<&Buf>, x: &Buf, out: &mut Buf) -> Result<()> {
        self.linear(w, bias, x, 1, out)
    }
    /// Three projections of the same single row (q, k and v); a backend may run them as one dispatch.
    fn linear3(&self, ws: [(&Matrix, Option<&Buf>); 3], x: &Buf, outs: [&mut Buf; 3]) -> Result<()> {
        let [o0, o1, o2] = outs;
        self.linear(ws[0].0, ws[0].1, x, 1, o0)?;
        self.linear(ws[1].0, ws[1].1, x, 1, o1)?;
        self.linear(ws[2].0, ws[2].1, x, 1, o2)
    }
    /// `out = x W` (`W` is `in_dim x out_dim`, e.g. `Wd^T`), then `+ bias` on every row.
    fn matmul(&self, x: &Buf, rows: usize, w: &Matrix, bias: Option<&Buf>, out: &mut Buf) -> Result<()>;
    /// Rotates every head of `rows` rows of `width` values at positions `start + i` (HF's
    /// rotate-half layout); `cos`/`sin` hold `head_dim / 2` values per position.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Buf,
        cos: &Buf,
        sin: &Buf,
        head_dim: usize,
        width: usize,
        step: &Step,
        rows: usize,
    ) -> Result<()>;
    /// Writes the rows' keys and values into the layer's cache at positions `start..start + rows`,
    /// then `ctx = softmax(cap(q k^T * scale)) v` per head over the visible cached positions
    /// (grouped KV heads; an online softmax, no `rows x positions` score matrix).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    /// `a = act(a) * u` over `len` values.
    fn gate_act(&self, act: Activation, a: &mut Buf, u: &Buf, len: usize) -> Result<()>;
    /// Adds one layer's statistics of `rows` rows of the activation `a` (`rows x n`) to `acc`
    /// (`2 n` values: `sum_t a[t,j]^2`, then `sum_t a[t,j]^2 / ||a[t,:]||^2`).
    fn observe(&self, a: &Buf, rows: usize, n: usize, acc: &mut Buf, offset: usize) -> Result<()>;
    /// Zeroes the columns of `a` (`rows x n`) that `scratch`'s keep row marks as skipped.
    fn mask_cols(&self, a: &mut Buf, rows: usize, n: usize, scratch: &FfnScratch) -> Result<()>;
    /// Sparse many-row FFN activation: `a = act(a) * u` over `rows x n` values, zero for the neurons
    /// `scratch` skips: outside its kept set, or (a gated layer) where `|act(a)|` is below the gate
    /// threshold, row by row, as decoding decides it. Counts the passing neurons for
    /// [`Backend::ffn_counts`].
    fn sparse_act(
        &self,
        act: Activation,
        a: &mut Buf,
        u: &Buf,
        rows: usize,
        n: usize,
        scratch: &mut FfnScratch,
    ) -> Result<()> {
        self.gate_act(act, a, u, rows * n)?;
        self.mask_cols(a, rows, n, scratch)
    }
    /// One row through a gated FFN: `out = sum_j act(g_j . x + bg_j) * (u_j . x + bu_j) * down_t_j`
    /// over every neuron (`sparse` false) or the neurons `scratch` keeps; reads only their rows.
    fn ffn_decode(
        &self,
        w: &FfnWeights<'_>,
        sparse: bool,
        scratch: &mut FfnScratch,
        x: &Buf,
        out: &mut Buf,
    ) -> Result<()>;
    /// `x = cap * tanh(x / cap)` over `len` values.
    fn soft_cap(&self, x: &mut Buf, cap: f32, len: usize) -> Result<()>;
    /// The index of the largest of the first `len` values (the first on ties); waits for it.
    fn argmax(&self, x: &Buf, len: usize) -> Result<u32>;
    /// Samples from the first `len` values as [`Draw`] says, on the device; `None` when the backend
    /// leaves sampling to the host (which then reads the logits).
    fn sample(&self, _x: &Buf, _len: usize, _draw: &Draw) -> Option<Result<u32>> {
        None
    }
    /// Whether [`Backend::matmul`] and [`Backend::linear`] compute each row of `x` on its own, so
    /// that a row's result is bitwise the same whatever other rows go with it. The decoder then
    /// runs the last layer's FFN on only the rows it reads, with the same result.
    fn row_exact(&self) -> bool {
        false
    }
    /// Holds the device for one forward pass: backends whose calls share device scratch serialise
    /// forwards from several threads here (`None`: no need).
    fn exclusive(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        None
    }
    /// A buffer for `host.len()` outputs that [`Backend::read_output`] turns back into `host`
    /// (the CPU writes into `host` itself).
    fn output_buf(&self, host: Vec<f32>) -> Result<Buf>;
    fn read_output(&self, b: Buf, host: &mut Vec<f32>) -> Result<()>;
    /// Copies `len` values of `src` from `src_offset` into `dst` from `dst_offset`.
    fn copy(&self, src: &Buf, src_offset: usize, dst: &mut Buf, dst_offset: usize, len: usize) -> Result<()>;
    /// `||W[r, :]||^2` for every row.
    fn row_sq_norms(&self, w: &Matrix) -> Result<Vec<f64>>;
}
