//! Device memory of the CUDA backend: raw allocations ([`DevMem`]), the handle types the
//! backend-neutral enums of `kernels` carry ([`DeviceBuf`], [`DeviceMatrix`], [`DeviceStep`],
//! [`DeviceKept`]), the pinned staging buffers of host <-> device copies, and the grow-only
//! scratch that the kernels share.
//!
//! Allocations are stream-ordered (`cuMemAllocAsync` / `cuMemFreeAsync` on the backend's stream,
//! when the device has memory pools), so freeing a buffer that queued kernels still read is safe.
//! Weights reach the device through two 32 MiB pinned buffers in turn: a chunk is copied into one
//! while the other is being sent, and no host copy of the weights is kept.

use crate::error::{Error, Result};
use candle_core::DType;
use cudarc::driver::{result, sys, CudaEvent, CudaStream, DriverError};
use std::sync::Arc;

/// Bytes of each of the two pinned upload buffers.
pub(crate) const STAGE_BYTES: usize = 32 << 20;
/// Bytes of the pinned download buffer.
pub(crate) const READ_STAGE_BYTES: usize = 4 << 20;

/// One device allocation, freed (stream-ordered) when dropped.
pub(crate) struct DevMem {
    ptr: u64,
    bytes: usize,
    stream: Arc<CudaStream>,
}

impl DevMem {
    /// `bytes` of uninitialised device memory (at least 256, so that every pointer is distinct and
    /// 256-byte aligned). On out-of-memory, waits for pending frees once and retries.
    pub(crate) fn alloc(stream: &Arc<CudaStream>, bytes: usize, what: &str) -> Result<DevMem> {
        let ctx = stream.context();
        ctx.bind_to_thread().map_err(|e| super::driver_error(e, "binding the context"))?;
        let size = bytes.max(256);
        let try_alloc = || -> std::result::Result<u64, DriverError> {
            // SAFETY: plain allocation calls on a live stream of the current context.
            unsafe {
                if ctx.has_async_alloc() {
                    result::malloc_async(stream.cu_stream(), size)
                } else {
                    result::malloc_sync(size)
                }
            }
        };
        let ptr = match try_alloc() {
            Ok(p) => p,
            Err(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                // Frees queued on the stream return their memory to the pool once they have run.
                stream.synchronize().map_err(|e| super::driver_error(e, "synchronising"))?;
                try_alloc().map_err(|e| oom_or(e, stream, bytes, what))?
            }
            Err(e) => return Err(oom_or(e, stream, bytes, what)),
        };
        Ok(DevMem { ptr, bytes, stream: stream.clone() })
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        let ctx = self.stream.context();
        let _ = ctx.bind_to_thread();
        // SAFETY: `ptr` came from the matching allocation call and is freed once; the async free
        // is ordered after every kernel queued on the stream that may still read it.
        unsafe {
            if ctx.has_async_alloc() {
                let _ = result::free_async(self.ptr, self.stream.cu_stream());
            } else {
                let _ = self.stream.synchronize();
                let _ = result::free_sync(self.ptr);
            }
        }
    }
}

fn oom_or(e: DriverError, stream: &CudaStream, bytes: usize, what: &str) -> Error {
    let ctx = stream.context();
    match e {
        DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY) => {
            let free = match ctx.mem_get_info() {
                Ok((free, total)) => format!("; {} MiB of {} MiB free", free >> 20, total >> 20),
                Err(_) => String::new(),
            };
            Error::OutOfMemory(format!(
                "cuda:{}: out of device memory allocating {bytes} bytes for {what}{free}",
                ctx.ordinal()
            ))
        }
        e => super::driver_error(e, &format!("allocating {bytes} bytes for {what}")),
    }
}

/// Page-locked host memory.
pub(crate) struct Pinned {
    ptr: *mut u8,
    bytes: usize,
    stream: Arc<CudaStream>,
}

// SAFETY: the buffer is plain host memory owned by this value; the backend uses it under a lock.
unsafe impl Send for Pinned {}

impl Pinned {
    /// `write_combined` suits buffers the host only writes (uploads); reads from such memory are slow.
    pub(crate) fn alloc(stream: &Arc<CudaStream>, bytes: usize, write_combined: bool) -> Result<Pinned> {
        stream.context().bind_to_thread().map_err(|e| super::driver_error(e, "binding the context"))?;
        let flags = if write_combined { sys::CU_MEMHOSTALLOC_WRITECOMBINED } else { 0 };
        // SAFETY: a plain allocation; the pointer is checked below.
        let ptr = unsafe { result::malloc_host(bytes, flags) }
            .map_err(|e| super::driver_error(e, &format!("allocating {bytes} bytes of pinned host memory")))?
            as *mut u8;
        if ptr.is_null() {
            return Err(Error::Internal("pinned host allocation returned null".into()));
        }
        Ok(Pinned { ptr, bytes, stream: stream.clone() })
    }

    pub(crate) fn slice(&self, len: usize) -> &[u8] {
        // SAFETY: `len <= bytes` of memory owned by self (checked by the callers' chunking).
        unsafe { std::slice::from_raw_parts(self.ptr, len.min(self.bytes)) }
    }

    pub(crate) fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: as in `slice`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.bytes)) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: allocated by `malloc_host`, freed once; the stream is synchronised first so that
        // no copy still reads it.
        unsafe {
            let _ = self.stream.synchronize();
            let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}

/// Host -> device copies through two pinned buffers used in turn. Before a buffer is refilled,
/// the copy that last read it is waited for (its event), so the host never overwrites bytes the
/// DMA engine has not sent yet.
pub(crate) struct Staging {
    bufs: [Option<(Pinned, CudaEvent)>; 2],
    next: usize,
}

impl Staging {
    pub(crate) fn new() -> Staging {
        Staging { bufs: [None, None], next: 0 }
    }

    /// Queues the copy of `src` to device address `dst` on `stream`.
    pub(crate) fn upload(&mut self, stream: &Arc<CudaStream>, dst: u64, src: &[u8]) -> Result<()> {
        let mut off = 0usize;
        while off < src.len() {
            let len = (src.len() - off).min(STAGE_BYTES);
            let slot = self.next;
            self.next ^= 1;
            if self.bufs[slot].is_none() {
                let event =
                    stream.context().new_event(None).map_err(|e| super::driver_error(e, "creating an event"))?;
                self.bufs[slot] = Some((Pinned::alloc(stream, STAGE_BYTES, true)?, event));
            }
            let Some((buf, event)) = self.bufs[slot].as_mut() else {
                return Err(Error::Internal("staging buffer missing".into()));
            };
            event.synchronize().map_err(|e| super::driver_error(e, "waiting for an upload"))?;
            buf.slice_mut(len).copy_from_slice(&src[off..off + len]);
            // SAFETY: `dst + off .. + len` lies in a device allocation of the caller; the pinned
            // source stays untouched until the event recorded next has completed.
            unsafe { result::memcpy_htod_async(dst + off as u64, buf.slice(len), stream.cu_stream()) }
                .map_err(|e| super::driver_error(e, "copying to the device"))?;
            event.record(stream).map_err(|e| super::driver_error(e, "recording an event"))?;
            off += len;
        }
        Ok(())
    }
}

/// What argmax, sampling and downloads use: a device slot for a result, pinned host memory to
/// read it into, and the sampler's work buffer.
pub(crate) struct Readback {
    pub(crate) slot: DevMem,
    pub(crate) small: Pinned,
    pub(crate) stage: Option<Pinned>,
    pub(crate) work: Option<DevMem>,
}

impl Readback {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Readback> {
        Ok(Readback {
            slot: DevMem::alloc(stream, 256, "a result slot")?,
            small: Pinned::alloc(stream, 256, false)?,
            stage: None,
            work: None,
        })
    }

    /// The sampler's work buffer, for `len` floats.
    pub(crate) fn work(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<u64> {
        let bytes = len * 4;
        if self.work.as_ref().is_none_or(|w| w.bytes() < bytes) {
            self.work = None;
            self.work = Some(DevMem::alloc(stream, bytes, "the sampler's work buffer")?);
        }
        Ok(self.work.as_ref().map_or(0, DevMem::ptr))
    }

    /// Copies `out.len()` bytes from device address `src` into `out` and waits for them: through
    /// the pinned buffer, in chunks, for anything larger than a few bytes.
    pub(crate) fn download(&mut self, stream: &Arc<CudaStream>, src: u64, out: &mut [u8]) -> Result<()> {
        if self.stage.is_none() && out.len() > 256 {
            self.stage = Some(Pinned::alloc(stream, READ_STAGE_BYTES, false)?);
        }
        let mut off = 0usize;
        while off < out.len() {
            let buf = match self.stage.as_mut() {
                Some(s) if out.len() > 256 => s,
                _ => &mut self.small,
            };
            let len = (out.len() - off).min(buf.bytes);
            // SAFETY: `src + off .. + len` lies in a device allocation of the caller; the pinned
            // buffer is ours and is read only after the stream has been synchronised.
            unsafe { result::memcpy_dtoh_async(buf.slice_mut(len), src + off as u64, stream.cu_stream()) }
                .map_err(|e| super::driver_error(e, "copying from the device"))?;
            stream.synchronize().map_err(|e| super::kernel_error(e, "a download"))?;
            out[off..off + len].copy_from_slice(buf.slice(len));
            off += len;
        }
        Ok(())
    }
}

/// An f32 buffer in device memory.
pub struct DeviceBuf {
    pub(crate) mem: DevMem,
    len: usize,
    /// The host vector handed to `output_buf`, kept for `read_output` to fill and hand back.
    pub(crate) host: Vec<f32>,
}

impl DeviceBuf {
    pub(crate) fn new(mem: DevMem, len: usize) -> DeviceBuf {
        DeviceBuf { mem, len, host: Vec::new() }
    }

    /// Elements (f32).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.mem.ptr()
    }
}

/// A `rows x cols` row-major weight matrix in device memory, in its dtype (f32, bf16 or f16).
pub struct DeviceMatrix {
    pub(crate) mem: DevMem,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) dtype: DType,
}

impl DeviceMatrix {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.mem.ptr()
    }
}

/// The step of a forward where the kernels read it: `[start, token 0, token 1, ...]` as u32 in
/// device memory (room for `rows` tokens). The host keeps the last values it wrote, for checks.
pub struct DeviceStep {
    pub(crate) mem: DevMem,
    pub(crate) rows: usize,
    pub(crate) start: usize,
    pub(crate) tokens: usize,
}

impl DeviceStep {
    /// Tokens the step can hold.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The first position last written by `set_step`.
    pub fn start(&self) -> usize {
        self.start
    }

    /// The number of tokens last written by `set_step`.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub(crate) fn start_ptr(&self) -> u64 {
        self.mem.ptr()
    }

    pub(crate) fn tokens_ptr(&self) -> u64 {
        self.mem.ptr() + 4
    }
}

/// One FFN layer's kept neurons in device memory: one allocation holding a header (the kept count
/// (u32), the per-token gate threshold (f32, 0: no gate), and the gate's counters: token rows run
/// gated and neurons that passed in them (two u64)), the kept indices (u32, room for all `n`
/// neurons) and the 0/1 keep row (f32, `n`), written by `prepare_ffn` once per selection (which
/// zeroes the counters). Count and threshold live on the device, so that a recorded decode step
/// reads the current selection. Allocated at the first `prepare_ffn` (which knows `n`).
#[derive(Default)]
pub struct DeviceKept {
    pub(crate) n: usize,
    pub(crate) mem: Option<DevMem>,
    /// The selection last uploaded.
    pub(crate) version: Option<u64>,
    /// The selection keeps every neuron (the indices are then 0..n).
    pub(crate) all: bool,
}

/// Device addresses of the parts of a [`DeviceKept`].
#[derive(Clone, Copy)]
pub(crate) struct KeptPtrs {
    /// The kept count (u32).
    pub count: u64,
    /// The gate threshold (f32).
    pub gate: u64,
    /// `[rows, passed]` (u64).
    pub counters: u64,
    /// The kept indices (u32).
    pub idx: u64,
    /// The keep row (f32).
    pub keep: u64,
}

impl DeviceKept {
    /// Byte offset of the threshold in the header (the count is at 0).
    pub(crate) const GATE: usize = 4;
    /// Byte offset of the counters (8-byte aligned, for the kernels' 64-bit atomics).
    const COUNTERS: usize = 8;
    /// Bytes of the header (the indices start 16-byte aligned).
    const HEADER: usize = 32;

    /// Neurons the index buffer has room for (0 before the first `prepare_ffn`).
    pub fn capacity(&self) -> usize {
        self.n
    }

    /// The selection last uploaded.
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// Byte offsets of the indices and of the keep row in the allocation.
    pub(crate) fn offsets(n: usize) -> (usize, usize) {
        let idx = Self::HEADER;
        (idx, idx + (4 * n).div_ceil(16) * 16)
    }

    pub(crate) fn bytes(n: usize) -> usize {
        Self::offsets(n).1 + 4 * n
    }

    pub(crate) fn ptrs(&self) -> Option<KeptPtrs> {
        let base = self.mem.as_ref()?.ptr();
        let (i, k) = Self::offsets(self.n);
        Some(KeptPtrs {
            count: base,
            gate: base + Self::GATE as u64,
            counters: base + Self::COUNTERS as u64,
            idx: base + i as u64,
            keep: base + k as u64,
        })
    }
}

/// The kernels' shared device scratch, one grow-only buffer per use. Recorded graphs hold the
/// addresses, so a buffer that grows bumps `generation` and the graphs recorded before are
/// recorded again (`graph.rs`); inside a recording nothing may grow. The GEMM conversion buffer
/// is never part of a recording (cuBLAS runs outside graphs), so its growth (a longer prompt)
/// leaves the recordings valid.
pub(crate) struct Scratch {
    pub(crate) generation: u64,
    bufs: [Option<DevMem>; SLOTS],
}

/// The uses of [`Scratch`]; the buffers one call needs at once are distinct slots.
#[derive(Clone, Copy)]
pub(crate) enum Slot {
    /// Activations narrowed to bf16/f16 for a GEMM.
    Convert = 0,
    /// The decode FFN's activations (one per kept neuron).
    FfnAct = 1,
    /// Split-K partial rows of the transposed products.
    Partial = 2,
    /// Flash-decoding partials.
    Attn = 3,
    /// Statistics: row norms, then partial column sums.
    Observe = 4,
}

const SLOTS: usize = 5;

impl Scratch {
    pub(crate) fn new() -> Scratch {
        Scratch { generation: 0, bufs: [None, None, None, None, None] }
    }

    /// The address of slot `slot` with room for `bytes`; grows it (to a power of two) if needed,
    /// unless the calling thread is recording a graph.
    pub(crate) fn get(&mut self, stream: &Arc<CudaStream>, slot: Slot, bytes: usize, recording: bool) -> Result<u64> {
        let b = &mut self.bufs[slot as usize];
        if let Some(m) = b {
            if m.bytes() >= bytes {
                return Ok(m.ptr());
            }
        }
        if recording {
            return Err(Error::Internal("device scratch would grow inside a recorded graph".into()));
        }
        let size = bytes.next_power_of_two().max(64 << 10);
        *b = None;
        let m = DevMem::alloc(stream, size, "kernel scratch")?;
        let ptr = m.ptr();
        *b = Some(m);
        if !matches!(slot, Slot::Convert) {
            self.generation += 1;
        }
        Ok(ptr)
    }
}
