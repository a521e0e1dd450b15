//! The prefill matrix product on every path (`tiles-avx2`, our blocked 6 x 16 tiles; `gemm-crate`)
//! per weight dtype, on the projections of a prefill, against the machine's fused multiply-add
//! peak measured in the same run. Prints a table and one JSON line per row.
//!
//! ```text
//! cargo run --release -p tda-bench --bin gemm -- [--tokens 512] [--model 7b,smollm2] [--dtype f32,bf16,f16] [--iters 3]
//! ```

use half::{bf16, f16};
use rayon::prelude::*;
use std::time::Instant;
use tda_bench::{arg, machine, num};
use tda_core::kernels::cpu::{huge_page_copy, matmul_on, prefill_path, WeightSlice, PREFILL_PATHS};

/// The products of one layer's prefill: name, output width, input width, `W` stored transposed
/// (`out x in`, the projections) or not (`in x out`, the down projection kept as `down^T`).
fn shapes(model: &str) -> Vec<(&'static str, usize, usize, bool)> {
    match model {
        "smollm2" => vec![
            ("q/o 576x576", 576, 576, true),
            ("gate/up 1536x576", 1536, 576, true),
            ("down 576<-1536", 576, 1536, false),
        ],
        _ => vec![
            ("q/o 4096x4096", 4096, 4096, true),
            ("gate/up 11008x4096", 11008, 4096, true),
            ("down 4096<-11008", 4096, 11008, false),
        ],
    }
}

/// Multiply-adds per second one thread sustains with 12 independent FMA chains (the shape of the
/// 6 x 16 tile), all threads at once, on 8 lanes or, where the CPU has AVX-512, 16 (the `gemm`
/// crate's kernels there): the faster of the two, the peak no product can pass.
fn fma_peak() -> f64 {
    /// Best multiply-adds per second of `chains(iters)` (12 chains of `lanes`) on every thread.
    fn rate(lanes: usize, iters: usize, chains: impl Fn(usize) -> f32 + Sync) -> f64 {
        let threads = rayon::current_num_threads();
        let mut best = 0f64;
        for _ in 0..3 {
            let t = Instant::now();
            let s: f32 = (0..threads).into_par_iter().map(|_| chains(iters)).sum();
            std::hint::black_box(s);
            best = best.max((threads * iters * 12 * lanes) as f64 / t.elapsed().as_secs_f64());
        }
        best
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx2,fma")]
        unsafe fn chains8(iters: usize) -> f32 {
            let mut acc = [_mm256_set1_ps(0.5); 12];
            let (a, b) = (_mm256_set1_ps(0.999), _mm256_set1_ps(1e-3));
            for _ in 0..iters {
                acc.iter_mut().for_each(|v| *v = _mm256_fmadd_ps(*v, a, b));
            }
            let mut x = [0f32; 8];
            acc.iter()
                .map(|v| {
                    _mm256_storeu_ps(x.as_mut_ptr(), *v);
                    x.iter().sum::<f32>()
                })
                .sum()
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn chains16(iters: usize) -> f32 {
            let mut acc = [_mm512_set1_ps(0.5); 12];
            let (a, b) = (_mm512_set1_ps(0.999), _mm512_set1_ps(1e-3));
            for _ in 0..iters {
                acc.iter_mut().for_each(|v| *v = _mm512_fmadd_ps(*v, a, b));
            }
            acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
        }
        let mut peak = f64::NAN;
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA checked above.
            peak = rate(8, 20_000_000, |i| unsafe { chains8(i) });
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F checked above.
            peak = peak.max(rate(16, 10_000_000, |i| unsafe { chains16(i) }));
        }
        peak
    }
    #[cfg(not(target_arch = "x86_64"))]
    f64::NAN
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

fn main() {
    let tokens: usize = num("--tokens", &arg("--tokens", "512"));
    let iters: usize = num("--iters", &arg("--iters", "3"));
    let models = arg("--model", "7b,smollm2");
    let dtypes = arg("--dtype", "f32,bf16,f16");
    let threads = rayon::current_num_threads();
    let m = machine();
    println!(
        "machine: {} ({}), {threads} threads; prefill path here: {}",
        m["cpu"].as_str().unwrap_or(""),
        m["simd"],
        prefill_path()
    );
    let mut paths: Vec<&str> = vec!["gemm-crate"];
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        paths.insert(0, PREFILL_PATHS[0]);
    }
    let peak = fma_peak();
    println!("fused multiply-add peak, 12 chains x 8 or 16 lanes per thread: {:.1} GFLOP/s\n", 2e-9 * peak);
    println!(
        "{:<8} {:<20} {:<6} {:>14} {:>14} {:>10} {:>8}",
        "model", "product", "dtype", "tiles GFLOP/s", "crate GFLOP/s", "tiles/crate", "% peak"
    );
    let mut json = vec![];
    for model in models.split(',') {
        for (name, n_out, n_in, transposed) in shapes(model) {
            let x = random(tokens * n_in, 1);
            let w = random(n_out * n_in, 2);
            let wb: Vec<bf16> = huge_page_copy(&w.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>());
            let wh: Vec<f16> = huge_page_copy(&w.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>());
            let w = huge_page_copy(&w);
            let mut out = vec![0f32; tokens * n_out];
            let (w_rows, w_cols) = if transposed { (n_out, n_in) } else { (n_in, n_out) };
            for dtype in dtypes.split(',') {
                let ws = match dtype {
                    "bf16" => WeightSlice::BF16(&wb),
                    "f16" => WeightSlice::F16(&wh),
                    _ => WeightSlice::F32(&w),
                };
                let mut rate = std::collections::BTreeMap::new();
                // Paths alternate within each round, so that drift of the shared machine hits both.
                for _ in 0..iters {
                    for &path in &paths {
                        let t = Instant::now();
                        matmul_on(path, &x, tokens, ws, w_rows, w_cols, transposed, &mut out);
                        let flops = 2.0 * (tokens * n_out * n_in) as f64 / t.elapsed().as_secs_f64();
                        let r = rate.entry(path).or_insert(0f64);
                        *r = r.max(flops);
                    }
                }
                let tiles = rate.get("tiles-avx2").copied().unwrap_or(f64::NAN);
                let krate = rate["gemm-crate"];
                println!(
                    "{model:<8} {name:<20} {dtype:<6} {:>14.1} {:>14.1} {:>10.2}x {:>7.0}%",
                    1e-9 * tiles,
                    1e-9 * krate,
                    tiles / krate,
                    100.0 * tiles.max(krate) / (2.0 * peak)
                );
                json.push(serde_json::json!({"bench": "prefill_gemm", "model": model, "product": name, "dtype": dtype,
                    "tokens": tokens, "out": n_out, "in": n_in, "threads": threads, "tiles_gflops": 1e-9 * tiles,
                    "crate_gflops": 1e-9 * krate, "fma_peak_gflops": 2e-9 * peak, "machine": m}));
            }
        }
    }
    for j in json {
        println!("{j}");
    }
}
