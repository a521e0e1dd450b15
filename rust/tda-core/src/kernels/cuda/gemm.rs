//! Prefill products (many rows) through cuBLAS, row-major on top of column-major cuBLAS:
//! a row-major `r x c` matrix is a column-major `c x r` one, so `out = x W^T` (out `rows x o`,
//! x `rows x i`, W `o x i`) is the column-major `out^T (o x rows) = W' (o x i, W read transposed)
//! * x^T (i x rows)`, and `out = x W` (W `i x o`) is `out^T = W^T (o x i, as stored) * x^T`.
//!
//! bf16/f16 weights: x is narrowed to the weight type into scratch (round to nearest even) and
//! multiplied with `cublasGemmEx` on the tensor cores, f32 output and `CUBLAS_COMPUTE_32F`.
//! f32 weights: `cublasSgemm` in the default math mode (no TF32), for f32 logits within 1e-3 of
//! the CPU. Only the entry points that cudarc loads from the versioned `libcublas.so.13` are used
//! (`cublasGemmEx`, `cublasSgemm_v2`; not cudarc's `hgemm`, which opens the unversioned name).

use super::driver_error;
use super::memory::DevMem;
use crate::error::{Error, Result};
use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// cuBLAS workspace (the size NVIDIA recommends for Hopper), set explicitly so that cuBLAS
/// never allocates one itself.
const WORKSPACE_BYTES: usize = 32 << 20;

pub(crate) struct Blas {
    handle: bsys::cublasHandle_t,
    _workspace: DevMem,
    stream: Arc<CudaStream>,
}

// SAFETY: the handle is only used with the backend's scratch lock held (one thread at a time).
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

fn blas_error(e: blas::CublasError, what: &str) -> Error {
    match e.0 {
        bsys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED => Error::OutOfMemory(format!("cuBLAS {what}: out of memory")),
        s => Error::Internal(format!("cuBLAS {what} failed: {s:?}")),
    }
}

/// Element type of a GEMM operand.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    BF16,
    F16,
}

impl Blas {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Blas> {
        stream.context().bind_to_thread().map_err(|e| driver_error(e, "binding the context"))?;
        let workspace = DevMem::alloc(stream, WORKSPACE_BYTES, "the cuBLAS workspace")?;
        let handle = blas::create_handle().map_err(|e| blas_error(e, "create"))?;
        let b = Blas { handle, _workspace: workspace, stream: stream.clone() };
        // SAFETY: a live handle, stream and workspace allocation (kept alive by `b`).
        unsafe {
            blas::set_stream(handle, stream.cu_stream() as bsys::cudaStream_t)
                .map_err(|e| blas_error(e, "set stream"))?;
            bsys::cublasSetWorkspace_v2(handle, b._workspace.ptr() as *mut std::ffi::c_void, WORKSPACE_BYTES)
                .result()
                .map_err(|e| blas_error(e, "set workspace"))?;
            bsys::cublasSetMathMode(handle, bsys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                .result()
                .map_err(|e| blas_error(e, "set math mode"))?;
        }
        Ok(b)
    }

    /// Column-major `C (m x n, ldc m) = op(A) B`, `op(A)` `m x k` (A stored `k x m` with lda `k` when
    /// `trans_a`, else `m x k` with lda `m`), B `k x n` with ldb `k`; A and B of type `elem`, C f32.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        elem: Elem,
        trans_a: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<()> {
        let dims = [m, n, k];
        if dims.iter().any(|&d| d > i32::MAX as usize) {
            return Err(Error::arg(format!("GEMM of {m} x {n} x {k} exceeds cuBLAS's 32-bit sizes")));
        }
        let (m, n, k) = (m as i32, n as i32, k as i32);
        let (op_a, lda) =
            if trans_a { (bsys::cublasOperation_t::CUBLAS_OP_T, k) } else { (bsys::cublasOperation_t::CUBLAS_OP_N, m) };
        let op_b = bsys::cublasOperation_t::CUBLAS_OP_N;
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.stream.context().bind_to_thread().map_err(|e| driver_error(e, "binding the context"))?;
        // SAFETY: a, b, c are device allocations holding the operands' sizes (checked by the caller).
        let r = unsafe {
            match elem {
                Elem::F32 => blas::sgemm(
                    self.handle,
                    op_a,
                    op_b,
                    m,
                    n,
                    k,
                    &alpha,
                    a as *const f32,
                    lda,
                    b as *const f32,
                    k,
                    &beta,
                    c as *mut f32,
                    m,
                ),
                Elem::BF16 | Elem::F16 => {
                    let t = if elem == Elem::BF16 {
                        bsys::cudaDataType_t::CUDA_R_16BF
                    } else {
                        bsys::cudaDataType_t::CUDA_R_16F
                    };
                    blas::gemm_ex(
                        self.handle,
                        op_a,
                        op_b,
                        m,
                        n,
                        k,
                        (&alpha) as *const f32 as *const std::ffi::c_void,
                        a as *const std::ffi::c_void,
                        t,
                        lda,
                        b as *const std::ffi::c_void,
                        t,
                        k,
                        (&beta) as *const f32 as *const std::ffi::c_void,
                        c as *mut std::ffi::c_void,
                        bsys::cudaDataType_t::CUDA_R_32F,
                        m,
                        bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
            }
        };
        r.map_err(|e| blas_error(e, "GEMM"))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: the handle was created by `create_handle` and is destroyed once.
        let _ = unsafe { blas::destroy_handle(self.handle) };
    }
}
