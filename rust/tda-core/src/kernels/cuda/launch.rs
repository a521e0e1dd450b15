//! The kernels: PTX built by nvcc in `build.rs` (embedded, JIT-compiled by the driver once per
//! module when the backend starts), their function handles, and the launch call.

use super::{driver_error, CudaBackend};
use crate::error::{Error, Result};
use candle_core::DType;
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
use std::sync::Arc;

/// The architecture the PTX was built for (`CUDA_ARCH` at build time).
pub(crate) const ARCH: &str = env!("TDA_CUDA_ARCH");

const SOURCES: [(&str, &str); 8] = [
    ("gemv", include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx"))),
    ("ffn", include_str!(concat!(env!("OUT_DIR"), "/ffn.ptx"))),
    ("attention", include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"))),
    ("norm", include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"))),
    ("elementwise", include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"))),
    ("stats", include_str!(concat!(env!("OUT_DIR"), "/stats.ptx"))),
    ("weights", include_str!(concat!(env!("OUT_DIR"), "/weights.ptx"))),
    ("sample", include_str!(concat!(env!("OUT_DIR"), "/sample.ptx"))),
];

/// Index of a weight dtype in the per-dtype kernel arrays (`_f32`, `_bf16`, `_f16`).
pub(crate) fn dtype_index(d: DType) -> Result<usize> {
    match d {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        d => Err(Error::arg(format!("the CUDA backend has no kernels for {d:?} weights (f32, bf16 or f16)"))),
    }
}

/// Every kernel of the backend. Arrays are indexed by [`dtype_index`].
pub(crate) struct Kernels {
    pub gemv: [CudaFunction; 3],
    pub linear3: [CudaFunction; 3],
    pub rows_axpy: [CudaFunction; 3],
    pub reduce_partials: CudaFunction,
    pub ffn_gate_up: [CudaFunction; 3],
    pub kv_write: CudaFunction,
    pub attn_decode: CudaFunction,
    pub attn_combine: CudaFunction,
    pub attn_prefill: CudaFunction,
    pub rms_norm: CudaFunction,
    pub add: CudaFunction,
    pub soft_cap: CudaFunction,
    pub gate_act: CudaFunction,
    pub mask_cols: CudaFunction,
    pub sparse_act: CudaFunction,
    pub bias_rows: CudaFunction,
    pub to_bf16: CudaFunction,
    pub to_f16: CudaFunction,
    pub embed: [CudaFunction; 3],
    pub rope: CudaFunction,
    pub observe_rows: CudaFunction,
    pub observe_cols: CudaFunction,
    pub observe_reduce: CudaFunction,
    pub random_fill: [CudaFunction; 3],
    pub row_sq_norms: [CudaFunction; 3],
    pub argmax: CudaFunction,
    pub sample: CudaFunction,
}

impl Kernels {
    /// Loads the modules, and grants the attention kernels (whose tiles exceed the default 48 KiB
    /// for large heads) up to `smem_optin` bytes of shared memory per block. Returns the kernels
    /// and the shared memory granted (48 KiB if the device refuses more: launches that need more
    /// then fail with a clear error instead of the backend failing to start).
    pub(crate) fn load(ctx: &Arc<CudaContext>, smem_optin: u32) -> Result<(Kernels, u32)> {
        let mut modules: Vec<(&str, Arc<CudaModule>)> = Vec::with_capacity(SOURCES.len());
        for (name, src) in SOURCES {
            let m = ctx.load_module(Ptx::from_src(src)).map_err(|e| {
                Error::Internal(format!(
                    "cuda:{}: loading the '{name}' kernels failed ({e:?}); they are PTX for {ARCH} built by \
                     CUDA 13.0, which needs a driver for CUDA 13.0 or newer and a GPU of that architecture \
                     or newer (rebuild with CUDA_ARCH=sm_XX for another one)",
                    ctx.ordinal()
                ))
            })?;
            modules.push((name, m));
        }
        let f = |module: &str, name: &str| -> Result<CudaFunction> {
            let m = modules
                .iter()
                .find(|(n, _)| *n == module)
                .ok_or_else(|| Error::Internal(format!("no kernel module '{module}'")))?;
            m.1.load_function(name).map_err(|e| driver_error(e, &format!("loading kernel '{name}'")))
        };
        let typed = |module: &str, name: &str| -> Result<[CudaFunction; 3]> {
            Ok([
                f(module, &format!("{name}_f32"))?,
                f(module, &format!("{name}_bf16"))?,
                f(module, &format!("{name}_f16"))?,
            ])
        };
        let k = Kernels {
            gemv: typed("gemv", "gemv")?,
            linear3: typed("gemv", "linear3")?,
            rows_axpy: typed("gemv", "rows_axpy")?,
            reduce_partials: f("gemv", "reduce_partials")?,
            ffn_gate_up: typed("ffn", "ffn_gate_up")?,
            kv_write: f("attention", "kv_write")?,
            attn_decode: f("attention", "attn_decode")?,
            attn_combine: f("attention", "attn_combine")?,
            attn_prefill: f("attention", "attn_prefill")?,
            rms_norm: f("norm", "rms_norm")?,
            add: f("elementwise", "add_f32")?,
            soft_cap: f("elementwise", "soft_cap")?,
            gate_act: f("elementwise", "gate_act")?,
            mask_cols: f("elementwise", "mask_cols")?,
            sparse_act: f("elementwise", "sparse_act")?,
            bias_rows: f("elementwise", "bias_rows")?,
            to_bf16: f("elementwise", "f32_to_bf16")?,
            to_f16: f("elementwise", "f32_to_f16")?,
            embed: typed("elementwise", "embed")?,
            rope: f("elementwise", "rope")?,
            observe_rows: f("stats", "observe_rows")?,
            observe_cols: f("stats", "observe_cols")?,
            observe_reduce: f("stats", "observe_reduce")?,
            random_fill: typed("weights", "random_fill")?,
            row_sq_norms: typed("weights", "row_sq_norms")?,
            argmax: f("sample", "argmax_f32")?,
            sample: f("sample", "sample_f32")?,
        };
        let big = sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let granted = [&k.attn_decode, &k.attn_prefill].iter().all(|f| f.set_attribute(big, smem_optin as i32).is_ok());
        Ok((k, if granted { smem_optin } else { 48 << 10 }))
    }
}

/// One kernel parameter. Each is passed as 8 bytes of which the kernel reads its own size
/// (little-endian: a 4-byte `int` / `unsigned` / `float` is the low half).
#[derive(Clone, Copy)]
pub(crate) enum A {
    /// A device pointer (0 = null).
    P(u64),
    I(i32),
    U(u32),
    F(f32),
    /// `unsigned long long`.
    L(u64),
}

/// The most parameters a kernel takes (`linear3`: 15).
const MAX_ARGS: usize = 16;

/// Threads of the 1-D element-wise launches.
pub(crate) const THREADS: u32 = 256;

impl CudaBackend {
    /// Queues kernel `f` on the current stream (the recording stream while this thread records).
    pub(crate) fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[A],
    ) -> Result<()> {
        if args.len() > MAX_ARGS {
            return Err(Error::Internal(format!("kernel launch with {} parameters", args.len())));
        }
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        self.bind()?;
        let mut vals = [0u64; MAX_ARGS];
        for (v, a) in vals.iter_mut().zip(args) {
            *v = match *a {
                A::P(p) | A::L(p) => p,
                A::I(i) => i as u32 as u64,
                A::U(u) => u as u64,
                A::F(x) => x.to_bits() as u64,
            };
        }
        let mut ptrs = [std::ptr::null_mut::<std::ffi::c_void>(); MAX_ARGS];
        for (p, v) in ptrs.iter_mut().zip(vals.iter_mut()) {
            *p = v as *mut u64 as *mut std::ffi::c_void;
        }
        // SAFETY: the parameters match the kernel's signature (the callers in ops.rs mirror the .cu
        // declarations) and point at `vals`, which outlives the call; every pointer parameter is a
        // live device allocation of the sizes the kernel reads (checked by the callers).
        unsafe { result::launch_kernel(f.cu_function(), grid, block, smem, self.cur_stream(), &mut ptrs[..args.len()]) }
            .map_err(|e| driver_error(e, "launching a kernel"))
    }

    /// Queues a grid-stride kernel over `n` elements (nothing when `n` is 0).
    pub(crate) fn pointwise(&self, f: &CudaFunction, n: usize, args: &[A]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.launch(f, (self.grid_for(n), 1, 1), (THREADS, 1, 1), 0, args)
    }

    /// Grid of a grid-stride launch over `n` elements.
    pub(crate) fn grid_for(&self, n: usize) -> u32 {
        (n.div_ceil(THREADS as usize)).clamp(1, self.sms as usize * 16) as u32
    }
}
