//! The CUDA backend (Cargo feature `cuda`): the decoder's operations as CUDA kernels on one
//! device, through cudarc's driver API with the CUDA libraries loaded at run time (a build needs
//! no CUDA library; a machine without a driver gets a clear error from [`CudaBackend::new`]).
//!
//! # Runtime
//! One context and one stream per backend; every call queues work on that stream in order, and
//! only `download`, `argmax`, `sample` and the few calls that return host data wait for it.
//! cudarc's per-buffer event tracking is off (one stream needs none); allocations are raw and
//! stream-ordered (`memory.rs`). The kernels are nvcc-built PTX (`build.rs`, `*.cu`), loaded once
//! per backend (`launch.rs`). Decode steps can be recorded as CUDA graphs and replayed
//! (`graph.rs`, which records on a second, private stream): every kernel reads the step's token
//! ids and first position, and a layer's kept-neuron list, count and gate threshold, from device
//! memory, and sizes its grid by capacities, so a recording stays valid from token to token.
//!
//! # Kernels (the files beside this one)
//! - `gemv.cu`: decode products (one row): a warp per output row streaming 16-byte vectors, q/k/v
//!   in one launch, and the transposed product `sum_i a_i W[row_i, :]` split over row slices with
//!   a fixed-order reduction (no float atomics anywhere: results repeat run to run).
//! - `ffn.cu`: the sparse/dense fused FFN: a warp per kept neuron computes
//!   `act(g.x + bg) * (u.x + bu)` reading the kept list in place; the down projection is the
//!   transposed product over the same list. Per-token gating (CATS, the hybrid): the gate row
//!   first, then the up and down rows only of the neurons whose `|act(g.x + bg)|` reaches the
//!   layer's threshold, counted on the device (integer atomics) for `ffn_counts`.
//! - `attention.cu`: the cache write, flash-decoding for one row (grid fixed by the cache
//!   capacity) and a tiled online-softmax kernel for prefill.
//! - `norm.cu`, `elementwise.cu`, `stats.cu`, `weights.cu`: RMSNorm, element-wise ops (among them
//!   the many-row sparse activation, gated row by row as decoding gates), embed and rope (reading
//!   the step on the device), prompt statistics, random fills and row norms.
//! - `sample.cu`: argmax and the top-k / top-p / min-p draw in one block.
//!
//! Prefill products (many rows) go through cuBLAS (`gemm.rs`). All activations are f32; weights stay
//! f32, bf16 or f16 and are widened in registers.
//!
//! Locks: `Backend::exclusive` hands out `device_lock` (the caller holds it for a forward);
//! `scratch` guards the kernels' shared scratch and cuBLAS for the length of one call; `readback`
//! (argmax, sampling, downloads) and `staging` (uploads) are separate, so argmax and sampling,
//! called after a forward, never wait for `device_lock`.
//!
//! Not done: a compact copy of the kept rows per selection (the CPU's short-row path); the
//! kernels read the kept rows in place through the index list.
//!
//! # Checks
//! - `tests.rs`: parity with the CPU backend, op by op, on a machine with a GPU
//!   (`cargo test --release -p tda-core --features cuda kernels::cuda`).
//! - `emu/`: the `.cu` sources compiled as C++ under a CPU emulation of blocks, warps, barriers
//!   and shuffles, against references of the CPU semantics (`bash src/kernels/cuda/emu/run.sh`;
//!   g++ only, no GPU): index arithmetic, masking, splits, ties and the sampler's cuts.

mod gemm;
mod graph;
mod launch;
mod memory;
mod ops;
#[cfg(test)]
mod tests;

pub use memory::{DeviceBuf, DeviceKept, DeviceMatrix, DeviceStep};

use crate::error::{Error, Result};
use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};
use memory::{DevMem, Readback, Scratch, Staging};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

thread_local! {
    /// The capture stream (as an integer) this thread is recording a graph on, 0 when none.
    static RECORDING: Cell<usize> = const { Cell::new(0) };
}

/// The CUDA backend of one device.
pub struct CudaBackend {
    pub(crate) ordinal: usize,
    // Field order is drop order: kernels, cuBLAS and buffers go before the streams and context.
    pub(crate) k: launch::Kernels,
    pub(crate) blas: gemm::Blas,
    pub(crate) scratch: Mutex<Scratch>,
    pub(crate) readback: Mutex<Readback>,
    pub(crate) staging: Mutex<Staging>,
    device_lock: Mutex<()>,
    pub(crate) capture_lock: Mutex<()>,
    /// Streaming multiprocessors (sizes the split grids).
    pub(crate) sms: u32,
    /// Opt-in shared memory per block.
    pub(crate) smem_optin: u32,
    pub(crate) use_graphs: bool,
    pub(crate) capture_stream: Arc<CudaStream>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) ctx: Arc<CudaContext>,
}

/// Whether the CUDA driver library can be loaded (checked once).
fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the library by its usual names.
    *PRESENT.get_or_init(|| std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false))
}

fn cublas_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: as in `driver_present`.
    *PRESENT.get_or_init(|| {
        std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() }).unwrap_or(false)
    })
}

/// A driver error as `Error::Internal` (out-of-memory as `Error::OutOfMemory`).
pub(crate) fn driver_error(e: DriverError, what: &str) -> Error {
    match e.0 {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory(format!("CUDA {what}: out of device memory")),
        _ => Error::Internal(format!("CUDA {what} failed: {e:?}")),
    }
}

/// An error that surfaced when waiting for queued work: a kernel of one of the calls before failed.
pub(crate) fn kernel_error(e: DriverError, what: &str) -> Error {
    Error::Internal(format!("CUDA error reported at {what} (from a kernel queued before it): {e:?}"))
}

/// Runs `f`, turning a panic inside cudarc (a library or symbol missing at run time) into an error.
fn guarded<T>(device: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::InvalidArgument(format!("device '{device}' is not available: {msg}")))
        }
    }
}

/// The number of CUDA devices; 0 when there is no driver (or it finds no device).
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Ok(0);
    }
    guarded("cuda", || {
        if result::init().is_err() {
            return Ok(0);
        }
        match result::device::get_count() {
            Ok(n) => Ok(n.max(0) as usize),
            Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => Ok(0),
            Err(e) => Err(driver_error(e, "counting devices")),
        }
    })
}

impl CudaBackend {
    /// Opens device `ordinal`: context, stream, kernels, cuBLAS; then a short self-test (which also
    /// loads every driver and cuBLAS entry point the backend uses, so that a missing one fails here,
    /// as an error, rather than later).
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        let name = format!("cuda:{ordinal}");
        if !driver_present() {
            return Err(Error::InvalidArgument(format!(
                "device '{name}' is not available: the CUDA driver library (libcuda.so.1) was not found \
                 (no NVIDIA driver on this machine, or its folder is not on the loader path)"
            )));
        }
        guarded(&name, || {
            let count = match result::init() {
                Ok(()) => result::device::get_count().map_err(|e| driver_error(e, "counting devices"))?.max(0) as usize,
                Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => 0,
                Err(e) => {
                    return Err(Error::InvalidArgument(format!(
                        "device '{name}' is not available: the CUDA driver failed to start ({e:?})"
                    )))
                }
            };
            if ordinal >= count {
                return Err(Error::InvalidArgument(match count {
                    0 => format!("device '{name}' is not available: the CUDA driver finds no device"),
                    n => format!(
                        "device '{name}' is not available: this machine has {n} CUDA device(s), cuda:0 to cuda:{}",
                        n - 1
                    ),
                }));
            }
            if !cublas_present() {
                return Err(Error::InvalidArgument(format!(
                    "device '{name}' is not available: the cuBLAS library (libcublas.so.13) was not found; put the \
                     CUDA 13 libraries on the loader path (e.g. LD_LIBRARY_PATH=.../site-packages/nvidia/cu13/lib \
                     of the nvidia-cublas wheel)"
                )));
            }
            let be = Self::open(ordinal)?;
            be.self_test()?;
            Ok(be)
        })
    }

    fn open(ordinal: usize) -> Result<CudaBackend> {
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error(e, "creating a context"))?;
        // SAFETY: this backend uses its own streams and synchronises them itself; nothing of it
        // relies on cudarc's per-buffer events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| driver_error(e, "creating a stream"))?;
        let capture_stream = ctx.new_stream().map_err(|e| driver_error(e, "creating a stream"))?;
        let attr = |a| ctx.attribute(a).map_err(|e| driver_error(e, "reading a device attribute"));
        let sms = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let smem_optin =
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(48 << 10) as u32;
        let (k, smem_optin) = launch::Kernels::load(&ctx, smem_optin)?;
        let blas = gemm::Blas::new(&stream)?;
        let readback = Readback::new(&stream)?;
        let use_graphs = std::env::var("TDA_ENGINE_CUDA_GRAPHS").map_or(true, |v| v != "0");
        Ok(CudaBackend {
            ordinal,
            k,
            blas,
            scratch: Mutex::new(Scratch::new()),
            readback: Mutex::new(readback),
            staging: Mutex::new(Staging::new()),
            device_lock: Mutex::new(()),
            capture_lock: Mutex::new(()),
            sms,
            smem_optin,
            use_graphs,
            capture_stream,
            stream,
            ctx,
        })
    }

    /// The device's name (e.g. "NVIDIA H200").
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(|e| driver_error(e, "reading the device name"))
    }

    /// Makes the context current on the calling thread (cheap when it already is).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_error(e, "binding the context"))
    }

    /// Whether the calling thread is recording a graph for this backend.
    pub(crate) fn recording(&self) -> bool {
        let r = RECORDING.with(Cell::get);
        r != 0 && r == self.capture_stream.cu_stream() as usize
    }

    /// The stream the calling thread queues kernels on: the capture stream while it records.
    pub(crate) fn cur_stream(&self) -> sys::CUstream {
        if self.recording() {
            self.capture_stream.cu_stream()
        } else {
            self.stream.cu_stream()
        }
    }

    /// Fails inside a recording: for calls that copy from or to the host, or wait.
    pub(crate) fn not_recording(&self, what: &str) -> Result<()> {
        match self.recording() {
            true => Err(Error::Internal(format!("{what} cannot be part of a recorded decode step"))),
            false => Ok(()),
        }
    }

    pub(crate) fn scratch(&self) -> MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn scratch_generation(&self) -> u64 {
        self.scratch().generation
    }

    pub(crate) fn device_guard(&self) -> MutexGuard<'_, ()> {
        self.device_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn alloc(&self, bytes: usize, what: &str) -> Result<DevMem> {
        self.bind()?;
        DevMem::alloc(&self.stream, bytes, what)
    }

    /// Queues the copy of `src` to device address `dst` (through the pinned staging buffers).
    pub(crate) fn upload_bytes(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.not_recording("a host-to-device copy")?;
        self.bind()?;
        self.staging.lock().unwrap_or_else(|p| p.into_inner()).upload(&self.stream, dst, src)
    }

    /// Copies `out.len()` bytes from device address `src` (after the work queued before).
    pub(crate) fn download_bytes(&self, src: u64, out: &mut [u8]) -> Result<()> {
        self.not_recording("a device-to-host copy")?;
        self.bind()?;
        self.readback.lock().unwrap_or_else(|p| p.into_inner()).download(&self.stream, src, out)
    }

    /// Device-to-device copy bandwidth in GB/s, counted as (bytes read + bytes written) / time for a
    /// copy of `bytes` bytes, best of `iters` timed copies.
    pub fn copy_bandwidth(&self, bytes: usize, iters: usize) -> Result<f64> {
        self.not_recording("a bandwidth measurement")?;
        let src = self.alloc(bytes, "a bandwidth test")?;
        let dst = self.alloc(bytes, "a bandwidth test")?;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev = |what| self.ctx.new_event(timing).map_err(|e| driver_error(e, what));
        let (start, end) = (ev("creating an event")?, ev("creating an event")?);
        let copy = || {
            // SAFETY: two live allocations of `bytes` bytes.
            unsafe { result::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, self.stream.cu_stream()) }
                .map_err(|e| driver_error(e, "a device copy"))
        };
        copy()?;
        let mut best = f64::INFINITY;
        for _ in 0..iters.max(1) {
            start.record(&self.stream).map_err(|e| driver_error(e, "recording an event"))?;
            copy()?;
            end.record(&self.stream).map_err(|e| driver_error(e, "recording an event"))?;
            let ms = start.elapsed_ms(&end).map_err(|e| kernel_error(e, "a bandwidth measurement"))? as f64;
            best = best.min(ms);
        }
        self.stream.synchronize().map_err(|e| kernel_error(e, "a bandwidth measurement"))?;
        Ok(2.0 * bytes as f64 / (best.max(1e-6) * 1e-3) / 1e9)
    }
}
