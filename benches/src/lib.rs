//! Shared pieces of the benchmark binaries: the machine's streaming read bandwidth (the roofline
//! that decoding is measured against) and a description of the machine.

use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;
use tda_core::kernels::cpu::kernels;
use tda_core::kernels::Backend;

/// A buffer much larger than the last-level cache, read end to end by all threads with the
/// fastest vectorised sum this CPU has. Its best pass is the machine's streaming read bandwidth
/// right now; decode reads its weights the same way, once per token.
pub struct Roofline {
    buf: Vec<f32>,
}

impl Roofline {
    /// Allocates and touches `mib` MiB (so that page faults stay out of the timing).
    pub fn new(mib: usize) -> Self {
        let buf = vec![1.0f32; (mib << 20) / 4];
        Self { buf }
    }

    /// The best of `passes` whole-buffer reads, in GB/s (1e9 bytes per second).
    pub fn measure(&self, passes: usize) -> f64 {
        let k = kernels();
        let threads = rayon::current_num_threads().max(1);
        let chunk = self.buf.len().div_ceil(threads);
        let mut best = f64::INFINITY;
        for _ in 0..passes.max(1) {
            let t = Instant::now();
            let s: f32 = self.buf.par_chunks(chunk).map(|c| k.sum(c)).sum();
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(s);
        }
        (self.buf.len() * 4) as f64 / best / 1e9
    }
}

/// CPU model, the SIMD features that matter here, and the kernel path in use, for the report.
pub fn machine() -> serde_json::Value {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let wanted =
        ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16"];
    let have: Vec<&str> = wanted.iter().copied().filter(|f| flags.split(' ').any(|x| x == *f)).collect();
    serde_json::json!({
        "cpu": field("model name"), "simd": have, "threads": rayon::current_num_threads(),
        "kernels": kernels().name,
    })
}

/// The roofline of a device: the CPU's streaming read bandwidth, or on a GPU the bandwidth of a
/// device-to-device copy (bytes read plus bytes written per second), the highest rate a plain
/// stream of HBM reaches there.
pub enum Bandwidth {
    Host(Roofline),
    #[cfg(feature = "cuda")]
    Cuda {
        be: Arc<tda_core::kernels::cuda::CudaBackend>,
        bytes: usize,
    },
}

impl Bandwidth {
    /// The best of `passes`, in GB/s.
    pub fn measure(&self, passes: usize) -> f64 {
        match self {
            Bandwidth::Host(r) => r.measure(passes),
            #[cfg(feature = "cuda")]
            Bandwidth::Cuda { be, bytes } => be.copy_bandwidth(*bytes, passes.max(1)).unwrap_or(f64::NAN),
        }
    }

    /// What the number is, for the report.
    pub fn kind(&self) -> &'static str {
        match self {
            Bandwidth::Host(_) => "streaming read, all threads",
            #[cfg(feature = "cuda")]
            Bandwidth::Cuda { .. } => "device-to-device copy, (read + write) / time",
        }
    }
}

/// The backend of `device` (`cpu`, `cuda`, `cuda:N`) and its roofline probe over `mib` MiB.
pub fn device(device: &str, mib: usize) -> tda_core::Result<(Arc<dyn Backend>, Bandwidth)> {
    #[cfg(feature = "cuda")]
    if let Some(rest) = device.strip_prefix("cuda") {
        let ordinal = rest
            .strip_prefix(':')
            .map_or(Ok(0), |i| i.parse::<usize>())
            .map_err(|_| tda_core::Error::arg(format!("unknown device '{device}'")))?;
        let be = Arc::new(tda_core::kernels::cuda::CudaBackend::new(ordinal)?);
        return Ok((be.clone(), Bandwidth::Cuda { be, bytes: mib << 20 }));
    }
    let be = tda_core::engine::backend(device)?;
    Ok((be, Bandwidth::Host(Roofline::new(mib))))
}
