//! The decoder's operations ([`Backend`]) on the CUDA backend: the handles and sizes are checked
//! on the host (a kernel never reads past a buffer), then the kernels are queued. The kernels'
//! shapes are described in the `.cu` files.

use super::gemm::Elem;
use super::launch::{dtype_index, A, THREADS};
use super::memory::{DeviceBuf, DeviceKept, DeviceMatrix, DeviceStep, Scratch, Slot};
use super::{driver_error, CudaBackend};
use crate::config::Activation;
use crate::error::{Error, Result};
use crate::kernels::{AttnShape, Backend, Buf, Draw, FfnScratch, FfnWeights, Graphs, Matrix, MatrixStore, Step};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use cudarc::driver::result;
use std::sync::{Arc, MutexGuard};

/// Positions per block of the decode attention (`DEC_SPLIT` in attention.cu).
const DEC_SPLIT: usize = 256;
/// Query heads per pass of the decode attention (`DEC_MAXG`).
const DEC_MAXG: usize = 8;
/// Query rows and keys per tile of the prefill attention (`PF_BQ`, `PF_BK`).
const PF_BQ: usize = 32;
const PF_BK: usize = 32;
/// Largest head the attention kernels take (`PF_MAXC * 32`).
const MAX_HEAD_DIM: usize = 256;
/// Rows per slice of the statistics kernel.
const OBSERVE_ROWS: usize = 64;
/// Threads of the transposed-product blocks (`rows_axpy`).
const AXPY_THREADS: usize = 128;

fn host_handle(what: &str) -> Error {
    Error::Internal(format!("a host {what} was handed to the CUDA backend"))
}

fn dev(b: &Buf) -> Result<&DeviceBuf> {
    match b {
        Buf::Cuda(d) => Ok(d),
        Buf::Host(_) => Err(host_handle("buffer")),
    }
}

fn dev_mut(b: &mut Buf) -> Result<&mut DeviceBuf> {
    match b {
        Buf::Cuda(d) => Ok(d),
        Buf::Host(_) => Err(host_handle("buffer")),
    }
}

fn mat(m: &Matrix) -> Result<&DeviceMatrix> {
    match &m.store {
        MatrixStore::Cuda(d) => Ok(d),
        MatrixStore::Host(_) | MatrixStore::HostBlocks(_) => Err(host_handle("matrix")),
    }
}

fn dstep(s: &Step) -> Result<&DeviceStep> {
    match s {
        Step::Cuda(d) => Ok(d),
        Step::Host { .. } => Err(host_handle("step")),
    }
}

fn kept(s: &FfnScratch) -> Result<&DeviceKept> {
    match s {
        FfnScratch::Cuda(k) => Ok(k),
        FfnScratch::Host(_) => Err(host_handle("FFN scratch")),
    }
}

/// `b` holds at least `len` values.
fn need(b: &DeviceBuf, len: usize, what: &str) -> Result<()> {
    match b.len() >= len {
        true => Ok(()),
        false => Err(Error::Internal(format!("{what}: a buffer of {} values is too small for {len}", b.len()))),
    }
}

/// The address of an optional vector of at least `len` values (0 = none).
fn opt_ptr(b: Option<&Buf>, len: usize, what: &str) -> Result<u64> {
    match b {
        None => Ok(0),
        Some(b) => {
            let d = dev(b)?;
            need(d, len, what)?;
            Ok(d.ptr())
        }
    }
}

/// A size as a 32-bit kernel parameter.
fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::arg(format!("{what} ({v}) exceeds the CUDA kernels' 32-bit sizes")))
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::arg(format!("{what} ({v}) exceeds the CUDA kernels' 32-bit sizes")))
}

fn act_code(a: Activation) -> i32 {
    match a {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
    }
}

/// Whether every row of a `cols`-wide matrix of `dtype` starts 16-byte aligned (the vector paths).
fn vec_ok(cols: usize, dtype: DType) -> bool {
    (cols * dtype.size_in_bytes()).is_multiple_of(16)
}

fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain-old-data elements (f32, u32, f64, bf16, f16) viewed as their bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn as_bytes_mut<T: Copy>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every bit pattern is a valid f32 / u32 / f64.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// Runs `f` on the bytes of a contiguous CPU tensor's elements.
fn tensor_bytes<R>(t: &Tensor, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| Error::Internal("weight tensor is not contiguous".into()))?;
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Internal("the CUDA backend takes weights from CPU tensors".into()));
    };
    Ok(match cpu {
        CpuStorage::F32(v) => f(as_bytes(&v[start..end])),
        CpuStorage::BF16(v) => f(as_bytes(&v[start..end])),
        CpuStorage::F16(v) => f(as_bytes(&v[start..end])),
        _ => return Err(Error::arg("the CUDA backend takes f32, bf16 or f16 weights")),
    })
}

impl CudaBackend {
    fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `ptr .. + bytes` lies in a live allocation (checked by the callers).
        unsafe { result::memset_d8_async(ptr, 0, bytes, self.cur_stream()) }.map_err(|e| driver_error(e, "a memset"))
    }

    fn new_buf(&self, len: usize, what: &str) -> Result<DeviceBuf> {
        self.not_recording("an allocation")?;
        let mem = self.alloc(len * 4, what)?;
        Ok(DeviceBuf::new(mem, len))
    }

    /// `y = W x + b` for one row.
    fn gemv(&self, m: &DeviceMatrix, bias: u64, x: u64, y: u64) -> Result<()> {
        let di = dtype_index(m.dtype)?;
        let rows = i32_of(m.rows, "matrix rows")?;
        self.bind()?;
        self.launch(
            &self.k.gemv[di],
            (m.rows.div_ceil(8) as u32, 1, 1),
            (256, 1, 1),
            0,
            &[
                A::P(m.ptr()),
                A::P(bias),
                A::P(x),
                A::P(y),
                A::I(rows),
                A::I(i32_of(m.cols, "matrix columns")?),
                A::I(vec_ok(m.cols, m.dtype) as i32),
            ],
        )
    }

    /// `out (rows x o) = x W^T` (`trans`, W is `o x i`) or `x W` (W is `i x o`), through cuBLAS.
    fn gemm(&self, m: &DeviceMatrix, trans: bool, rows: usize, x: u64, out: u64) -> Result<()> {
        self.not_recording("a cuBLAS product")?;
        let (o, i) = if trans { (m.rows, m.cols) } else { (m.cols, m.rows) };
        let elem = match m.dtype {
            DType::F32 => Elem::F32,
            DType::BF16 => Elem::BF16,
            DType::F16 => Elem::F16,
            d => return Err(Error::arg(format!("the CUDA backend has no GEMM for {d:?} weights"))),
        };
        let mut s = self.scratch();
        self.bind()?;
        let b = match elem {
            Elem::F32 => x,
            _ => {
                let n = rows * i;
                let p = s.get(&self.stream, Slot::Convert, n * 2, false)?;
                let f = if elem == Elem::BF16 { &self.k.to_bf16 } else { &self.k.to_f16 };
                self.launch(f, (self.grid_for(n), 1, 1), (THREADS, 1, 1), 0, &[A::P(x), A::P(p), A::L(n as u64)])?;
                p
            }
        };
        self.blas.gemm(elem, trans, o, rows, i, m.ptr(), b, out)
    }

    /// `out[t, :] += bias` over `rows` rows of `width`.
    fn bias_rows(&self, out: u64, bias: u64, rows: usize, width: usize) -> Result<()> {
        let total = rows * width;
        self.launch(
            &self.k.bias_rows,
            (self.grid_for(total), 1, 1),
            (THREADS, 1, 1),
            0,
            &[A::P(out), A::P(bias), A::L(total as u64), A::U(u32_of(width, "row width")?)],
        )
    }

    /// `out[c] = sum_{i < count} a[i] W[row_i, c] (+ bias[c])`, `row_i = idx[i]` (or `i` when `idx`
    /// is 0), `count = *count_ptr` (or `n` when 0): split over row slices, then reduced in order.
    /// When `*gate_ptr > 0` (a gated FFN layer; 0: no pointer) the rows with `a[i] == 0` are not
    /// read. The grid depends on `n` only.
    #[allow(clippy::too_many_arguments)]
    fn transposed_product(
        &self,
        s: &mut Scratch,
        m: &DeviceMatrix,
        a: u64,
        idx: u64,
        count_ptr: u64,
        gate_ptr: u64,
        n: usize,
        bias: u64,
        out: u64,
    ) -> Result<()> {
        let di = dtype_index(m.dtype)?;
        let cols = m.cols;
        let vec = vec_ok(cols, m.dtype);
        let per_thread = if vec { 16 / m.dtype.size_in_bytes() } else { 1 };
        let col_blocks = cols.div_ceil(AXPY_THREADS * per_thread).max(1);
        let chunks = (4 * self.sms as usize).div_ceil(col_blocks).clamp(1, n.div_ceil(4).max(1)).min(65535);
        let partial = s.get(&self.stream, Slot::Partial, chunks * cols * 4, self.recording())?;
        let cols_i = i32_of(cols, "matrix columns")?;
        self.launch(
            &self.k.rows_axpy[di],
            (u32_of(col_blocks, "column blocks")?, chunks as u32, 1),
            (AXPY_THREADS as u32, 1, 1),
            0,
            &[
                A::P(m.ptr()),
                A::I(cols_i),
                A::P(a),
                A::P(idx),
                A::P(count_ptr),
                A::P(gate_ptr),
                A::U(u32_of(n, "rows")?),
                A::I(vec as i32),
                A::P(partial),
            ],
        )?;
        self.launch(
            &self.k.reduce_partials,
            (u32_of(cols.div_ceil(32), "columns")?, 1, 1),
            (32, 8, 1),
            0,
            &[A::P(partial), A::I(chunks as i32), A::I(cols_i), A::P(bias), A::P(out)],
        )
    }

    /// RMSNorm of `rows` rows of `dim` (out may be x).
    fn norm(&self, x: u64, g: u64, eps: f32, dim: usize, rows: usize, out: u64) -> Result<()> {
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let threads = dim.div_ceil(4).next_power_of_two().clamp(32, 1024) as u32;
        self.bind()?;
        self.launch(
            &self.k.rms_norm,
            (u32_of(rows, "rows")?, 1, 1),
            (threads, 1, 1),
            0,
            &[A::P(x), A::P(g), A::F(eps), A::I(i32_of(dim, "row width")?), A::P(out)],
        )
    }

    /// Checks the backend end to end on tiny inputs; run once by `new`. It also makes cudarc load
    /// every driver and cuBLAS entry point used later.
    pub(crate) fn self_test(&self) -> Result<()> {
        let fail = |what: String| Error::Internal(format!("cuda:{}: self-test failed: {what}", self.ordinal));
        let mut x = self.upload(&[1.0, 2.0, 3.0, 4.0])?;
        let half = self.upload(&[0.5; 4])?;
        self.add(&mut x, &half, 4)?;
        let mut h = [0f32; 4];
        self.download(&x, &mut h)?;
        if h != [1.5, 2.5, 3.5, 4.5] {
            return Err(fail(format!("add gave {h:?}")));
        }
        let top = self.argmax(&x, 4)?;
        if top != 3 {
            return Err(fail(format!("argmax gave {top}")));
        }
        let w = Tensor::from_vec(vec![2f32, 0.0, 0.0, 2.0], (2, 2), &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let m = self.matrix(w.to_dtype(dtype)?)?;
            let mut out = self.zeros(4)?;
            self.linear(&m, None, &x, 2, &mut out)?;
            self.download(&out, &mut h)?;
            if h != [3.0, 5.0, 7.0, 9.0] {
                return Err(fail(format!("a {dtype:?} GEMM gave {h:?}")));
            }
        }
        let mut z = self.zeros(4)?;
        let one = self.upload(&[1.0; 4])?;
        let mut graphs: Graphs = None;
        for _ in 0..3 {
            self.run_graph(&mut graphs, 0, &mut || self.add(&mut z, &one, 4))?;
        }
        self.download(&z, &mut h)?;
        if h != [3.0; 4] {
            return Err(fail(format!("a recorded step gave {h:?}")));
        }
        // Entry points used only on rarer paths (timing, errors, out-of-memory messages, freeing
        // pinned memory): load them now, under `new`'s guard, rather than panic in them later.
        self.copy_bandwidth(4096, 1)?;
        self.name()?;
        self.ctx.mem_get_info().map_err(|e| driver_error(e, "reading the memory use"))?;
        let _ = format!("{:?}", cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_INVALID_VALUE));
        drop(super::memory::Pinned::alloc(&self.stream, 256, false)?);
        if self.use_graphs && !super::graph::recorded(&graphs, 0) {
            // Not fatal (steps then run plainly), but decoding is slower: say so once.
            eprintln!(
                "tda-engine: cuda:{}: CUDA graphs do not work here; decode steps run without them \
                 (TDA_ENGINE_CUDA_DEBUG=1 shows why)",
                self.ordinal
            );
        }
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    // ---- memory --------------------------------------------------------------------------------

    fn matrix(&self, t: Tensor) -> Result<Matrix> {
        let (rows, cols) = t.dims2()?;
        let dtype = t.dtype();
        dtype_index(dtype)?;
        let t = if t.is_contiguous() { t } else { t.contiguous()? };
        let mem = self.alloc(rows * cols * dtype.size_in_bytes(), "a weight matrix")?;
        tensor_bytes(&t, |b| self.upload_bytes(mem.ptr(), b))??;
        Ok(Matrix { rows, cols, dtype, store: MatrixStore::Cuda(Arc::new(DeviceMatrix { mem, rows, cols, dtype })) })
    }

    fn random_matrix(&self, rows: usize, cols: usize, dtype: DType, seed: u64, scale: f32) -> Option<Result<Matrix>> {
        let make = || -> Result<Matrix> {
            let di = dtype_index(dtype)?;
            self.not_recording("an allocation")?;
            let count = rows * cols;
            let mem = self.alloc(count * dtype.size_in_bytes(), "a weight matrix")?;
            self.bind()?;
            self.launch(
                &self.k.random_fill[di],
                (self.grid_for(count), 1, 1),
                (THREADS, 1, 1),
                0,
                &[A::P(mem.ptr()), A::L(count as u64), A::L(seed), A::F(scale)],
            )?;
            Ok(Matrix {
                rows,
                cols,
                dtype,
                store: MatrixStore::Cuda(Arc::new(DeviceMatrix { mem, rows, cols, dtype })),
            })
        };
        Some(make())
    }

    fn upload(&self, v: &[f32]) -> Result<Buf> {
        let b = self.new_buf(v.len(), "a buffer")?;
        self.upload_bytes(b.ptr(), as_bytes(v))?;
        Ok(Buf::Cuda(b))
    }

    fn zeros(&self, len: usize) -> Result<Buf> {
        let b = self.new_buf(len, "a buffer")?;
        self.memset_zero(b.ptr(), len * 4)?;
        Ok(Buf::Cuda(b))
    }

    fn download(&self, b: &Buf, out: &mut [f32]) -> Result<()> {
        let d = dev(b)?;
        need(d, out.len(), "download")?;
        self.download_bytes(d.ptr(), as_bytes_mut(out))
    }

    fn fill_zero(&self, b: &mut Buf, len: usize) -> Result<()> {
        let d = dev_mut(b)?;
        need(d, len, "fill_zero")?;
        self.memset_zero(d.ptr(), len * 4)
    }

    fn new_step(&self, rows: usize) -> Result<Step> {
        self.not_recording("an allocation")?;
        let mem = self.alloc(4 * (rows + 1), "a step")?;
        self.memset_zero(mem.ptr(), 4 * (rows + 1))?;
        Ok(Step::Cuda(DeviceStep { mem, rows, start: 0, tokens: 0 }))
    }

    fn new_ffn_scratch(&self) -> FfnScratch {
        FfnScratch::Cuda(DeviceKept::default())
    }

    // ---- per forward, outside any recorded graph -------------------------------------------------

    fn set_step(&self, step: &mut Step, tokens: &[u32], start: usize) -> Result<()> {
        let Step::Cuda(s) = step else {
            return Err(host_handle("step"));
        };
        if tokens.len() > s.rows {
            return Err(Error::Internal(format!("a step of {} tokens for a state of {} rows", tokens.len(), s.rows)));
        }
        u32_of(start + tokens.len(), "the position")?;
        // [start, tokens...] in one copy; a decode step's fits on the stack (no allocation per token).
        let (mut small, mut big) = ([0u32; 16], Vec::new());
        let words: &mut [u32] = match tokens.len() < small.len() {
            true => &mut small[..tokens.len() + 1],
            false => {
                big.resize(tokens.len() + 1, 0);
                &mut big
            }
        };
        words[0] = start as u32;
        words[1..].copy_from_slice(tokens);
        self.upload_bytes(s.start_ptr(), as_bytes(words))?;
        s.start = start;
        s.tokens = tokens.len();
        Ok(())
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
        let FfnScratch::Cuda(s) = scratch else {
            return Err(host_handle("FFN scratch"));
        };
        let n = w.gate.rows;
        if s.version == Some(version) && s.n == n && s.mem.is_some() {
            return Ok(());
        }
        if keep_row.len() < n {
            return Err(Error::Internal(format!("a keep row of {} values for {n} neurons", keep_row.len())));
        }
        if let Some(k) = kept {
            if k.len() > n || k.iter().any(|&j| j as usize >= n) {
                return Err(Error::Internal(format!("a kept list of {} neurons out of range for {n}", k.len())));
            }
        }
        if s.mem.is_none() || s.n != n {
            s.mem = None;
            s.mem = Some(self.alloc(DeviceKept::bytes(n), "a kept-neuron list")?);
            s.n = n;
        }
        let Some(p) = s.ptrs() else {
            return Err(Error::Internal("kept-neuron list missing".into()));
        };
        // [count, gate, counters (zero), pad] [indices] [pad] [keep row], as DeviceKept lays them out.
        let (idx_off, keep_off) = DeviceKept::offsets(n);
        let mut bytes = vec![0u8; DeviceKept::bytes(n)];
        let count = kept.map_or(n, <[u32]>::len) as u32;
        bytes[..4].copy_from_slice(&count.to_le_bytes());
        bytes[DeviceKept::GATE..DeviceKept::GATE + 4].copy_from_slice(&gate.to_le_bytes());
        let idx = &mut bytes[idx_off..idx_off + 4 * n];
        match kept {
            Some(k) => idx[..4 * k.len()].copy_from_slice(as_bytes(k)),
            None => {
                for (j, c) in idx.chunks_exact_mut(4).enumerate() {
                    c.copy_from_slice(&(j as u32).to_le_bytes());
                }
            }
        }
        bytes[keep_off..keep_off + 4 * n].copy_from_slice(as_bytes(&keep_row[..n]));
        self.upload_bytes(p.count, &bytes)?;
        s.version = Some(version);
        s.all = kept.is_none();
        Ok(())
    }

    fn run_graph(&self, graphs: &mut Graphs, key: u64, enqueue: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.run_graph_impl(graphs, key, enqueue)
    }

    // ---- the forward's operations -----------------------------------------------------------------

    fn embed(&self, table: &Matrix, step: &Step, rows: usize, scale: Option<f32>, x: &mut Buf) -> Result<()> {
        let (t, s) = (mat(table)?, dstep(step)?);
        let xd = dev_mut(x)?;
        if rows > s.rows {
            return Err(Error::Internal(format!("embed of {rows} rows from a step of {}", s.rows)));
        }
        need(xd, rows * t.cols, "embed")?;
        let di = dtype_index(t.dtype)?;
        let n = rows * t.cols;
        self.bind()?;
        self.launch(
            &self.k.embed[di],
            (self.grid_for(n), 1, 1),
            (THREADS, 1, 1),
            0,
            &[
                A::P(t.ptr()),
                A::P(s.tokens_ptr()),
                A::U(u32_of(rows, "rows")?),
                A::U(u32_of(t.cols, "embedding width")?),
                A::U(u32_of(t.rows, "vocabulary")?),
                A::F(scale.unwrap_or(1.0)),
                A::I(scale.is_some() as i32),
                A::P(xd.ptr()),
            ],
        )
    }

    fn rms_norm(&self, x: &Buf, gain: &Buf, eps: f32, dim: usize, rows: usize, out: &mut Buf) -> Result<()> {
        let (xd, g) = (dev(x)?, dev(gain)?);
        let od = dev_mut(out)?;
        need(xd, rows * dim, "rms_norm")?;
        need(g, dim, "rms_norm gain")?;
        need(od, rows * dim, "rms_norm")?;
        self.norm(xd.ptr(), g.ptr(), eps, dim, rows, od.ptr())
    }

    fn rms_norm_inplace(&self, x: &mut Buf, gain: &Buf, eps: f32, dim: usize, rows: usize) -> Result<()> {
        let g = dev(gain)?;
        let xd = dev_mut(x)?;
        need(xd, rows * dim, "rms_norm")?;
        need(g, dim, "rms_norm gain")?;
        self.norm(xd.ptr(), g.ptr(), eps, dim, rows, xd.ptr())
    }

    fn add(&self, x: &mut Buf, y: &Buf, len: usize) -> Result<()> {
        let yd = dev(y)?;
        let xd = dev_mut(x)?;
        need(xd, len, "add")?;
        need(yd, len, "add")?;
        self.pointwise(&self.k.add, len, &[A::P(xd.ptr()), A::P(yd.ptr()), A::L(len as u64)])
    }

    fn linear(&self, w: &Matrix, bias: Option<&Buf>, x: &Buf, rows: usize, out: &mut Buf) -> Result<()> {
        let m = mat(w)?;
        let xd = dev(x)?;
        need(xd, rows * m.cols, "linear input")?;
        let b = opt_ptr(bias, m.rows, "linear bias")?;
        let od = dev_mut(out)?;
        need(od, rows * m.rows, "linear output")?;
        match rows {
            0 => Ok(()),
            1 => self.gemv(m, b, xd.ptr(), od.ptr()),
            _ => {
                self.gemm(m, true, rows, xd.ptr(), od.ptr())?;
                match b {
                    0 => Ok(()),
                    b => self.bias_rows(od.ptr(), b, rows, m.rows),
                }
            }
        }
    }

    fn linear3(&self, ws: [(&Matrix, Option<&Buf>); 3], x: &Buf, outs: [&mut Buf; 3]) -> Result<()> {
        let ms = [mat(ws[0].0)?, mat(ws[1].0)?, mat(ws[2].0)?];
        let [o0, o1, o2] = outs;
        let (cols, dtype) = (ms[0].cols, ms[0].dtype);
        if ms.iter().any(|m| m.cols != cols || m.dtype != dtype) {
            self.linear(ws[0].0, ws[0].1, x, 1, o0)?;
            self.linear(ws[1].0, ws[1].1, x, 1, o1)?;
            return self.linear(ws[2].0, ws[2].1, x, 1, o2);
        }
        let xd = dev(x)?;
        need(xd, cols, "linear3 input")?;
        let mut args = Vec::with_capacity(15);
        for ((m, (_, bias)), o) in ms.iter().zip(ws.iter()).zip([o0, o1, o2]) {
            let od = dev_mut(o)?;
            need(od, m.rows, "linear3 output")?;
            args.extend([
                A::P(m.ptr()),
                A::P(opt_ptr(*bias, m.rows, "linear3 bias")?),
                A::P(od.ptr()),
                A::I(i32_of(m.rows, "matrix rows")?),
            ]);
        }
        args.extend([A::P(xd.ptr()), A::I(i32_of(cols, "matrix columns")?), A::I(vec_ok(cols, dtype) as i32)]);
        let rows: usize = ms.iter().map(|m| m.rows).sum();
        self.bind()?;
        self.launch(
            &self.k.linear3[dtype_index(dtype)?],
            (u32_of(rows.div_ceil(8), "rows")?, 1, 1),
            (256, 1, 1),
            0,
            &args,
        )
    }

    fn matmul(&self, x: &Buf, rows: usize, w: &Matrix, bias: Option<&Buf>, out: &mut Buf) -> Result<()> {
        let m = mat(w)?;
        let xd = dev(x)?;
        need(xd, rows * m.rows, "matmul input")?;
        let b = opt_ptr(bias, m.cols, "matmul bias")?;
        let od = dev_mut(out)?;
        need(od, rows * m.cols, "matmul output")?;
        match rows {
            0 => Ok(()),
            1 => {
                let mut s = self.scratch();
                self.bind()?;
                self.transposed_product(&mut s, m, xd.ptr(), 0, 0, 0, m.rows, b, od.ptr())
            }
            _ => {
                self.gemm(m, false, rows, xd.ptr(), od.ptr())?;
                match b {
                    0 => Ok(()),
                    b => self.bias_rows(od.ptr(), b, rows, m.cols),
                }
            }
        }
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
        if head_dim == 0 || !head_dim.is_multiple_of(2) || !width.is_multiple_of(head_dim) {
            return Err(Error::Internal(format!("rope of width {width} in heads of {head_dim}")));
        }
        let half = head_dim / 2;
        let (c, s, st) = (dev(cos)?, dev(sin)?, dstep(step)?);
        let positions = c.len().min(s.len()) / half;
        let xd = dev_mut(x)?;
        need(xd, rows * width, "rope")?;
        if rows > st.rows {
            return Err(Error::Internal(format!("rope of {rows} rows from a step of {}", st.rows)));
        }
        let total = rows * (width / head_dim) * half;
        if total == 0 {
            return Ok(());
        }
        self.bind()?;
        self.launch(
            &self.k.rope,
            (self.grid_for(total), 1, 1),
            (THREADS, 1, 1),
            0,
            &[
                A::P(xd.ptr()),
                A::P(c.ptr()),
                A::P(s.ptr()),
                A::P(st.start_ptr()),
                A::U(u32_of(rows, "rows")?),
                A::U(u32_of(width, "row width")?),
                A::U(u32_of(half, "head width")?),
                A::U(u32_of(positions, "rope positions")?),
            ],
        )
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
        let (hd, heads, kvh) = (s.head_dim, s.heads, s.kv_heads);
        if heads == 0 || kvh == 0 || !heads.is_multiple_of(kvh) || hd == 0 {
            return Err(Error::Internal(format!("attention of {heads} heads over {kvh} KV heads of {hd}")));
        }
        if hd > MAX_HEAD_DIM {
            return Err(Error::arg(format!("the CUDA attention takes heads of up to {MAX_HEAD_DIM} values, not {hd}")));
        }
        let (qd, kvd) = (heads * hd, kvh * hd);
        let st = dstep(step)?;
        if rows > st.rows {
            return Err(Error::Internal(format!("attention of {rows} rows from a step of {}", st.rows)));
        }
        let (qb, kb, vb) = (dev(q)?, dev(k)?, dev(v)?);
        need(qb, rows * qd, "attention q")?;
        need(kb, rows * kvd, "attention k")?;
        need(vb, rows * kvd, "attention v")?;
        let kc = dev_mut(k_cache)?;
        let (kcp, kc_len) = (kc.ptr(), kc.len());
        let vc = dev_mut(v_cache)?;
        let (vcp, vc_len) = (vc.ptr(), vc.len());
        let capacity = kc_len.min(vc_len) / kvd;
        if st.start + rows > capacity {
            return Err(Error::Internal(format!(
                "attention at positions {}..{} in a cache of {capacity}",
                st.start,
                st.start + rows
            )));
        }
        let cd = dev_mut(ctx)?;
        need(cd, rows * qd, "attention output")?;
        if rows == 0 {
            return Ok(());
        }
        self.bind()?;
        let n = rows * kvd;
        self.launch(
            &self.k.kv_write,
            (self.grid_for(n), 1, 1),
            (THREADS, 1, 1),
            0,
            &[
                A::P(kb.ptr()),
                A::P(vb.ptr()),
                A::P(kcp),
                A::P(vcp),
                A::P(st.start_ptr()),
                A::U(u32_of(rows, "rows")?),
                A::U(u32_of(kvd, "KV width")?),
                A::U(u32_of(capacity, "cache capacity")?),
            ],
        )?;
        let softcap = s.softcap.unwrap_or(0.0);
        let window = s.window.map_or(0, |w| w.min(u32::MAX as usize) as u32);
        let (heads_i, kvh_i, hd_i) = (i32_of(heads, "heads")?, i32_of(kvh, "KV heads")?, i32_of(hd, "head width")?);
        if rows == 1 {
            let group = heads / kvh;
            let splits = capacity.div_ceil(DEC_SPLIT).max(1);
            if splits > 65535 {
                return Err(Error::arg(format!(
                    "a KV cache of {capacity} positions is beyond the CUDA decode attention"
                )));
            }
            let smem = 4 * (group * hd + group * DEC_SPLIT + DEC_MAXG * DEC_SPLIT + 2 * group);
            if smem > self.smem_optin as usize {
                return Err(Error::arg(format!(
                    "attention with {group} query heads per KV head needs {smem} bytes of shared memory"
                )));
            }
            let mut sc = self.scratch();
            let o_len = heads * splits * hd;
            let part = sc.get(&self.stream, Slot::Attn, 4 * (o_len + 2 * heads * splits), self.recording())?;
            let part_ml = part + 4 * o_len as u64;
            self.launch(
                &self.k.attn_decode,
                (kvh as u32, splits as u32, 1),
                (DEC_SPLIT as u32, 1, 1),
                smem as u32,
                &[
                    A::P(qb.ptr()),
                    A::P(kcp),
                    A::P(vcp),
                    A::P(st.start_ptr()),
                    A::I(heads_i),
                    A::I(kvh_i),
                    A::I(hd_i),
                    A::F(s.scale),
                    A::F(softcap),
                    A::U(window),
                    A::P(part),
                    A::P(part_ml),
                ],
            )?;
            self.launch(
                &self.k.attn_combine,
                (heads as u32, 1, 1),
                (128, 1, 1),
                0,
                &[
                    A::P(part),
                    A::P(part_ml),
                    A::P(st.start_ptr()),
                    A::I(hd_i),
                    A::U(window),
                    A::I(splits as i32),
                    A::P(cd.ptr()),
                ],
            )
        } else {
            let smem = 4 * (PF_BQ * hd + PF_BK * (hd + 4) + PF_BK * hd);
            if smem > self.smem_optin as usize {
                return Err(Error::arg(format!("attention over heads of {hd} needs {smem} bytes of shared memory")));
            }
            if heads > 65535 {
                return Err(Error::arg(format!("attention over {heads} heads is beyond the CUDA prefill kernel")));
            }
            self.launch(
                &self.k.attn_prefill,
                (u32_of(rows.div_ceil(PF_BQ), "rows")?, heads as u32, 1),
                (256, 1, 1),
                smem as u32,
                &[
                    A::P(qb.ptr()),
                    A::P(kcp),
                    A::P(vcp),
                    A::P(st.start_ptr()),
                    A::I(i32_of(rows, "rows")?),
                    A::I(heads_i),
                    A::I(kvh_i),
                    A::I(hd_i),
                    A::F(s.scale),
                    A::F(softcap),
                    A::U(window),
                    A::P(cd.ptr()),
                ],
            )
        }
    }

    fn gate_act(&self, act: Activation, a: &mut Buf, u: &Buf, len: usize) -> Result<()> {
        let ud = dev(u)?;
        let ad = dev_mut(a)?;
        need(ad, len, "gate_act")?;
        need(ud, len, "gate_act")?;
        self.pointwise(&self.k.gate_act, len, &[A::P(ad.ptr()), A::P(ud.ptr()), A::L(len as u64), A::I(act_code(act))])
    }

    fn observe(&self, a: &Buf, rows: usize, n: usize, acc: &mut Buf, offset: usize) -> Result<()> {
        let ad = dev(a)?;
        need(ad, rows * n, "observe")?;
        let accd = dev_mut(acc)?;
        need(accd, offset + 2 * n, "observe accumulator")?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let chunks = rows.div_ceil(OBSERVE_ROWS);
        if chunks > 65535 {
            return Err(Error::arg(format!("statistics of {rows} rows at once are beyond the CUDA kernel")));
        }
        let n_u = u32_of(n, "neurons")?;
        u32_of(2 * n, "statistics")?;
        let inv_bytes = (rows * 4).div_ceil(256) * 256;
        let partial_bytes = if chunks > 1 { chunks * 2 * n * 4 } else { 0 };
        let mut s = self.scratch();
        self.bind()?;
        let inv = s.get(&self.stream, Slot::Observe, inv_bytes + partial_bytes, self.recording())?;
        let partial = if chunks > 1 { inv + inv_bytes as u64 } else { 0 };
        let acc_ptr = accd.ptr() + 4 * offset as u64;
        self.launch(
            &self.k.observe_rows,
            (u32_of(rows, "rows")?, 1, 1),
            (256, 1, 1),
            0,
            &[A::P(ad.ptr()), A::U(n_u), A::P(inv)],
        )?;
        self.launch(
            &self.k.observe_cols,
            (n.div_ceil(256) as u32, chunks as u32, 1),
            (256, 1, 1),
            0,
            &[
                A::P(ad.ptr()),
                A::P(inv),
                A::U(rows as u32),
                A::U(n_u),
                A::U(OBSERVE_ROWS as u32),
                A::P(acc_ptr),
                A::P(partial),
            ],
        )?;
        if chunks > 1 {
            self.launch(
                &self.k.observe_reduce,
                ((2 * n).div_ceil(256) as u32, 1, 1),
                (256, 1, 1),
                0,
                &[A::P(partial), A::U(chunks as u32), A::U(2 * n_u), A::P(acc_ptr)],
            )?;
        }
        Ok(())
    }

    fn mask_cols(&self, a: &mut Buf, rows: usize, n: usize, scratch: &FfnScratch) -> Result<()> {
        let k = kept(scratch)?;
        // Never prepared: there is no selection to apply (as the CPU). Keeping every neuron changes
        // nothing, but a recording launches anyway so that it serves later selections too.
        let Some(p) = k.ptrs() else {
            return Ok(());
        };
        if k.all && !self.recording() {
            return Ok(());
        }
        if k.n != n {
            return Err(Error::Internal(format!("mask_cols over {n} neurons with a keep row of {}", k.n)));
        }
        let ad = dev_mut(a)?;
        need(ad, rows * n, "mask_cols")?;
        let total = rows * n;
        if total == 0 {
            return Ok(());
        }
        self.bind()?;
        self.launch(
            &self.k.mask_cols,
            (self.grid_for(total), 1, 1),
            (THREADS, 1, 1),
            0,
            &[A::P(ad.ptr()), A::P(p.keep), A::L(total as u64), A::U(u32_of(n, "neurons")?)],
        )
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
        let k = kept(scratch)?;
        // Never prepared: no selection to apply (as mask_cols).
        let Some(p) = k.ptrs() else {
            return self.gate_act(act, a, u, rows * n);
        };
        if k.n != n {
            return Err(Error::Internal(format!("sparse_act over {n} neurons with a keep row of {}", k.n)));
        }
        let ud = dev(u)?;
        let ad = dev_mut(a)?;
        let total = rows * n;
        need(ad, total, "sparse_act")?;
        need(ud, total, "sparse_act")?;
        self.bind()?;
        // One kernel whether or not the layer is gated: it reads the threshold where decoding does.
        self.pointwise(
            &self.k.sparse_act,
            total,
            &[
                A::P(ad.ptr()),
                A::P(ud.ptr()),
                A::P(p.keep),
                A::P(p.gate),
                A::P(p.counters),
                A::U(u32_of(rows, "rows")?),
                A::U(u32_of(n, "neurons")?),
                A::I(act_code(act)),
            ],
        )
    }

    fn ffn_counts(&self, scratch: &FfnScratch, version: u64) -> Option<(u64, u64)> {
        let k = kept(scratch).ok()?;
        let p = k.ptrs().filter(|_| k.version == Some(version))?;
        // A small synchronous read (after the queued kernels), when results are reported.
        let mut c = [0u64; 2];
        self.download_bytes(p.counters, as_bytes_mut(&mut c)).ok()?;
        Some((c[0], c[1]))
    }

    fn ffn_decode(
        &self,
        w: &FfnWeights<'_>,
        sparse: bool,
        scratch: &mut FfnScratch,
        x: &Buf,
        out: &mut Buf,
    ) -> Result<()> {
        let (g, u, dn) = (mat(w.gate)?, mat(w.up)?, mat(w.down_t)?);
        let (n, d) = (g.rows, g.cols);
        if [u.rows, dn.rows] != [n, n] || [u.cols, dn.cols] != [d, d] || u.dtype != g.dtype || dn.dtype != g.dtype {
            return Err(Error::Internal("FFN matrices of different shapes or dtypes".into()));
        }
        let di = dtype_index(g.dtype)?;
        let xd = dev(x)?;
        need(xd, d, "ffn input")?;
        let bg = opt_ptr(w.gate_bias, n, "gate bias")?;
        let bu = opt_ptr(w.up_bias, n, "up bias")?;
        // Sparse: the kept list, its count, the gate threshold and the gate's counters in device
        // memory (all neurons when the selection keeps every one; threshold 0 when it has no gate),
        // so that a recording serves every later selection.
        let (idx, count, gate, counters) = match sparse {
            false => (0, 0, 0, 0),
            true => {
                let k = kept(scratch)?;
                match k.ptrs() {
                    Some(p) if k.n == n => (p.idx, p.count, p.gate, p.counters),
                    _ => return Err(Error::Internal("sparse FFN decode before prepare_ffn".into())),
                }
            }
        };
        let od = dev_mut(out)?;
        need(od, d, "ffn output")?;
        if n == 0 || d == 0 {
            return self.memset_zero(od.ptr(), d * 4);
        }
        let mut s = self.scratch();
        self.bind()?;
        let a = s.get(&self.stream, Slot::FfnAct, 4 * n, self.recording())?;
        self.launch(
            &self.k.ffn_gate_up[di],
            (u32_of(n.div_ceil(8), "neurons")?, 1, 1),
            (256, 1, 1),
            0,
            &[
                A::P(g.ptr()),
                A::P(u.ptr()),
                A::P(bg),
                A::P(bu),
                A::P(xd.ptr()),
                A::I(i32_of(d, "hidden size")?),
                A::P(idx),
                A::P(count),
                A::P(gate),
                A::P(counters),
                A::U(u32_of(n, "neurons")?),
                A::I(act_code(w.act)),
                A::I(vec_ok(d, g.dtype) as i32),
                A::P(a),
            ],
        )?;
        self.transposed_product(&mut s, dn, a, idx, count, gate, n, 0, od.ptr())
    }

    fn soft_cap(&self, x: &mut Buf, cap: f32, len: usize) -> Result<()> {
        let xd = dev_mut(x)?;
        need(xd, len, "soft_cap")?;
        self.pointwise(&self.k.soft_cap, len, &[A::P(xd.ptr()), A::F(cap), A::L(len as u64)])
    }

    fn argmax(&self, x: &Buf, len: usize) -> Result<u32> {
        self.not_recording("argmax")?;
        let xd = dev(x)?;
        need(xd, len, "argmax")?;
        if len == 0 {
            return Ok(0);
        }
        let len_u = u32_of(len, "logits")?;
        // The result slot belongs to `readback`: hold it until the id is read.
        let mut rb = self.readback.lock().unwrap_or_else(|p| p.into_inner());
        let slot = rb.slot.ptr();
        self.bind()?;
        self.launch(&self.k.argmax, (1, 1, 1), (1024, 1, 1), 0, &[A::P(xd.ptr()), A::U(len_u), A::P(slot)])?;
        let mut word = [0u8; 4];
        rb.download(&self.stream, slot, &mut word)?;
        Ok(u32::from_le_bytes(word))
    }

    fn sample(&self, x: &Buf, len: usize, draw: &Draw) -> Option<Result<u32>> {
        let run = || -> Result<u32> {
            if !(draw.temperature > 0.0 && draw.temperature.is_finite()) {
                return self.argmax(x, len);
            }
            self.not_recording("sampling")?;
            let xd = dev(x)?;
            need(xd, len, "sample")?;
            if len == 0 {
                return Ok(0);
            }
            let len_u = u32_of(len, "logits")?;
            let inv_t = 1.0 / draw.temperature;
            let u = if draw.u >= 0.0 { draw.u.min(1.0 - f32::EPSILON / 2.0) } else { 0.0 };
            let top_p = if draw.top_p.is_nan() { 1.0 } else { draw.top_p };
            let min_p = if draw.min_p.is_nan() { 0.0 } else { draw.min_p };
            let top_k = draw.top_k.min(u32::MAX as usize) as u32;
            // The result slot and the work buffer belong to `readback`: hold it until the id is read.
            let mut rb = self.readback.lock().unwrap_or_else(|p| p.into_inner());
            self.bind()?;
            let work = rb.work(&self.stream, len)?;
            let slot = rb.slot.ptr();
            self.launch(
                &self.k.sample,
                (1, 1, 1),
                (1024, 1, 1),
                0,
                &[
                    A::P(xd.ptr()),
                    A::U(len_u),
                    A::F(inv_t),
                    A::U(top_k),
                    A::F(top_p),
                    A::F(min_p),
                    A::F(u),
                    A::P(work),
                    A::P(slot),
                ],
            )?;
            let mut word = [0u8; 4];
            rb.download(&self.stream, slot, &mut word)?;
            let id = u32::from_le_bytes(word);
            match (id as usize) < len {
                true => Ok(id),
                false => Err(Error::Internal(format!("the device sampler returned {id} for {len} logits"))),
            }
        };
        Some(run())
    }

    fn exclusive(&self) -> Option<MutexGuard<'_, ()>> {
        Some(self.device_guard())
    }

    fn output_buf(&self, host: Vec<f32>) -> Result<Buf> {
        let mut b = self.new_buf(host.len(), "an output buffer")?;
        self.memset_zero(b.ptr(), host.len() * 4)?;
        b.host = host;
        Ok(Buf::Cuda(b))
    }

    fn read_output(&self, b: Buf, host: &mut Vec<f32>) -> Result<()> {
        let Buf::Cuda(mut d) = b else {
            return Err(host_handle("buffer"));
        };
        let len = d.len();
        let mut v = std::mem::take(&mut d.host);
        v.resize(len, 0.0);
        self.download_bytes(d.ptr(), as_bytes_mut(&mut v[..len]))?;
        *host = v;
        Ok(())
    }

    fn copy(&self, src: &Buf, src_offset: usize, dst: &mut Buf, dst_offset: usize, len: usize) -> Result<()> {
        let sd = dev(src)?;
        need(sd, src_offset + len, "copy source")?;
        let dd = dev_mut(dst)?;
        need(dd, dst_offset + len, "copy destination")?;
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        let (to, from) = (dd.ptr() + 4 * dst_offset as u64, sd.ptr() + 4 * src_offset as u64);
        // SAFETY: both ranges lie in live allocations (checked above) and are distinct buffers.
        unsafe { result::memcpy_dtod_async(to, from, 4 * len, self.cur_stream()) }
            .map_err(|e| driver_error(e, "a device copy"))
    }

    fn row_sq_norms(&self, w: &Matrix) -> Result<Vec<f64>> {
        self.not_recording("row norms")?;
        let m = mat(w)?;
        let di = dtype_index(m.dtype)?;
        if m.rows == 0 {
            return Ok(Vec::new());
        }
        let out = self.alloc(8 * m.rows, "row norms")?;
        self.bind()?;
        self.launch(
            &self.k.row_sq_norms[di],
            (u32_of(m.rows.div_ceil(8), "rows")?, 1, 1),
            (256, 1, 1),
            0,
            &[A::P(m.ptr()), A::U(u32_of(m.rows, "rows")?), A::U(u32_of(m.cols, "columns")?), A::P(out.ptr())],
        )?;
        let mut v = vec![0f64; m.rows];
        self.download_bytes(out.ptr(), as_bytes_mut(&mut v))?;
        Ok(v)
    }
}
