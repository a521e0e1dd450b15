//! Shared pieces of the benchmark binaries: the machine's streaming read bandwidth (the roofline
//! that decoding is measured against) and a description of the machine.

pub mod timed;

use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;
use tda_core::kernels::cpu::kernels;
use tda_core::kernels::Backend;

/// A buffer much larger than the last-level cache, read end to end by all threads. The machine's
/// limit is the highest read rate anything reaches, so [`Roofline::new`] tries several read loops
/// once ([`Roofline::variants`]: vector width, streams per thread, prefetch distance and hint,
/// threads pinned to CPUs or not) and keeps the fastest; [`Roofline::measure`] reruns that one.
/// Decode reads its weights the same way, once per token, so "% of roofline" above 100% would mean
/// that the probe, not the kernel, is wrong.
pub struct Roofline {
    buf: Vec<f32>,
    best: ReadLoop,
    pinned: Option<rayon::ThreadPool>,
    /// Every variant's best GB/s at calibration, for the report.
    pub tried: Vec<(String, f64)>,
}

/// One way of streaming the buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReadLoop {
    /// 256 (AVX2) or 512 (AVX-512) bit loads; 0: the kernels' own sum loop.
    pub width: u32,
    /// Independent sequential streams per thread (its chunk cut in that many parts).
    pub streams: usize,
    /// Software prefetch distance in bytes (0: none, the hardware prefetcher alone).
    pub prefetch: usize,
    /// `prefetchnta` (non-temporal) instead of `prefetcht0`.
    pub nta: bool,
    /// Threads pinned one per CPU.
    pub pinned: bool,
}

impl std::fmt::Display for ReadLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.width == 0 {
            return write!(f, "kernels' sum{}", if self.pinned { ", pinned" } else { "" });
        }
        write!(f, "{}-bit x{} streams", self.width, self.streams)?;
        match self.prefetch {
            0 => write!(f, ", no prefetch")?,
            p => write!(f, ", prefetch{} {p} B", if self.nta { "nta" } else { "t0" })?,
        }
        if self.pinned {
            write!(f, ", pinned")?;
        }
        Ok(())
    }
}

impl Roofline {
    /// Allocates and touches `mib` MiB (so that page faults stay out of the timing), then tries
    /// every read loop (2 passes each) and keeps the fastest.
    pub fn new(mib: usize) -> Self {
        let buf = vec![1.0f32; (mib << 20) / 4];
        let threads = rayon::current_num_threads().max(1);
        let pinned = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .start_handler(move |i| pin_to_cpu(i % std::thread::available_parallelism().map_or(1, |n| n.get())))
            .build()
            .ok();
        let mut r = Self {
            buf,
            best: ReadLoop { width: 0, streams: 1, prefetch: 0, nta: false, pinned: false },
            pinned,
            tried: vec![],
        };
        let mut best = (r.best, 0.0);
        for v in Self::variants() {
            if v.pinned && r.pinned.is_none() {
                continue;
            }
            let gbs = r.run(v, 2);
            r.tried.push((v.to_string(), gbs));
            if gbs > best.1 {
                best = (v, gbs);
            }
        }
        r.best = best.0;
        r
    }

    /// The read loops tried: the kernels' own sum, and 256/512-bit loads with 1, 2 or 4 streams
    /// per thread, no prefetch or t0/nta prefetch at 1, 2 or 4 KiB; each unpinned and pinned.
    pub fn variants() -> Vec<ReadLoop> {
        let mut v = vec![];
        for pinned in [false, true] {
            v.push(ReadLoop { width: 0, streams: 1, prefetch: 0, nta: false, pinned });
            for width in [256, 512] {
                if width == 512 && !has_avx512() || !has_avx2() {
                    continue;
                }
                for streams in [1, 2, 4] {
                    for (prefetch, nta) in [(0, false), (1024, false), (2048, false), (4096, false), (2048, true)] {
                        v.push(ReadLoop { width, streams, prefetch, nta, pinned });
                    }
                }
            }
        }
        v
    }

    /// The read loop the probe keeps.
    pub fn best(&self) -> ReadLoop {
        self.best
    }

    /// The best of `passes` whole-buffer reads with the fastest loop, in GB/s (1e9 bytes per second).
    pub fn measure(&self, passes: usize) -> f64 {
        self.run(self.best, passes)
    }

    fn run(&self, v: ReadLoop, passes: usize) -> f64 {
        let pass = || {
            let threads = rayon::current_num_threads().max(1);
            let chunk = self.buf.len().div_ceil(threads);
            let mut best = f64::INFINITY;
            for _ in 0..passes.max(1) {
                let t = Instant::now();
                let s: f32 = self.buf.par_chunks(chunk).map(|c| read(c, v)).sum();
                best = best.min(t.elapsed().as_secs_f64());
                std::hint::black_box(s);
            }
            (self.buf.len() * 4) as f64 / best / 1e9
        };
        match (&self.pinned, v.pinned) {
            (Some(pool), true) => pool.install(pass),
            _ => pass(),
        }
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx2");
    #[allow(unreachable_code)]
    false
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f");
    #[allow(unreachable_code)]
    false
}

/// Pins the calling thread to CPU `cpu` (Linux; elsewhere a no-op).
fn pin_to_cpu(cpu: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays inside it for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu < 1024 {
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
}

/// Sums `a` with read loop `v`.
fn read(a: &[f32], v: ReadLoop) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if v.width != 0 {
        // SAFETY: `variants` offers a width only where the CPU has its features.
        return unsafe {
            match (v.width, v.nta) {
                (512, false) => x86::read512::<false>(a, v.streams, v.prefetch),
                (512, true) => x86::read512::<true>(a, v.streams, v.prefetch),
                (_, false) => x86::read256::<false>(a, v.streams, v.prefetch),
                (_, true) => x86::read256::<true>(a, v.streams, v.prefetch),
            }
        };
    }
    let _ = v;
    kernels().sum(a)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    macro_rules! read_loop {
        ($name:ident, $features:literal, $vec:ty, $zero:expr, $load:expr, $add:expr, $lanes:expr, $reduce:expr) => {
            /// Sums `a` as `streams` sequential parts read side by side, one cache line of each
            /// per step, prefetching `prefetch` bytes ahead in each.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const NTA: bool>(a: &[f32], streams: usize, prefetch: usize) -> f32 {
                let streams = streams.clamp(1, 4);
                // Two cache lines of each stream per step, into independent accumulators so that
                // no add latency chain caps the rate.
                let part = a.len() / streams / 32 * 32;
                let p = a.as_ptr();
                let mut acc: [$vec; 8] = [$zero; 8];
                let mut i = 0;
                while i < part {
                    for s in 0..streams {
                        let q = p.add(s * part + i);
                        if prefetch > 0 {
                            for line in [0, 64] {
                                let ahead = (q as *const i8).wrapping_add(prefetch + line);
                                if NTA {
                                    _mm_prefetch(ahead, _MM_HINT_NTA);
                                } else {
                                    _mm_prefetch(ahead, _MM_HINT_T0);
                                }
                            }
                        }
                        let mut k = 0;
                        while k < 32 {
                            let j = (s * 4 + k / $lanes) % 8;
                            acc[j] = $add(acc[j], $load(q.add(k)));
                            k += $lanes;
                        }
                    }
                    i += 32;
                }
                let mut total = 0f32;
                for v in acc {
                    total += $reduce(v);
                }
                total + a[streams * part..].iter().sum::<f32>()
            }
        };
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), v);
        l.iter().sum()
    }

    read_loop!(
        read256,
        "avx2",
        __m256,
        _mm256_setzero_ps(),
        |q| _mm256_loadu_ps(q),
        |a, b| _mm256_add_ps(a, b),
        8,
        |v| hsum256(v)
    );
    read_loop!(
        read512,
        "avx512f",
        __m512,
        _mm512_setzero_ps(),
        |q| _mm512_loadu_ps(q),
        |a, b| _mm512_add_ps(a, b),
        16,
        |v| _mm512_reduce_add_ps(v)
    );
}

/// The value after `--name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or(default.to_string())
}

/// `v` (the value of option `name`) parsed; exits with status 2 and a message naming it otherwise.
pub fn num<T: std::str::FromStr>(name: &str, v: &str) -> T
where
    T::Err: std::fmt::Display,
{
    v.parse().unwrap_or_else(|e| {
        eprintln!("{name} {v}: {e}");
        std::process::exit(2)
    })
}

/// Prints the probe's read loops, fastest first, and the one it keeps.
pub fn print_probe(roof: &Roofline) {
    let mut tried = roof.tried.clone();
    tried.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("\nroofline probe: {} read loops tried, kept: {}", tried.len(), roof.best());
    for (name, gbs) in tried.iter().take(6) {
        println!("  {gbs:>7.2} GB/s  {name}");
    }
    if let Some((name, gbs)) = tried.last() {
        println!("  slowest: {gbs:.2} GB/s  {name}");
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
        "kernel_paths": tda_core::kernels::cpu::DTYPES.iter().zip(kernels().paths).map(|(d, p)| (d.to_string(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>(),
        "prefill_path": tda_core::kernels::cpu::prefill_path(),
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
            Bandwidth::Host(_) => "streaming read, all threads, the fastest of the probe's read loops",
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
