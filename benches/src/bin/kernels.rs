//! GEMV micro-benchmark: the decode kernel on a weight matrix of a given shape and dtype, with
//! 1 thread and with all threads, as a table and JSON lines.
//!
//! cargo run --release -p tda-bench --bin kernels -- [--rows 49152] [--cols 576] [--iters 50]

use half::{bf16, f16};
use std::time::Instant;
use tda_core::kernels::cpu::{gemv, WeightSlice};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{name}: {e}")))
        .unwrap_or(default)
}

fn main() {
    let (rows, cols, iters) = (arg("--rows", 49152), arg("--cols", 576), arg("--iters", 50));
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut out = vec![0f32; rows];
    let all = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("{:<6} {:>8} {:>10} {:>10}", "dtype", "threads", "us/call", "GB/s");
    for (name, ws, bytes) in
        [("f32", WeightSlice::F32(&w), 4), ("bf16", WeightSlice::BF16(&wb), 2), ("f16", WeightSlice::F16(&wh), 2)]
    {
        for threads in [1, all] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
            let mut best = f64::MAX;
            pool.install(|| {
                for _ in 0..iters {
                    let t = Instant::now();
                    gemv(ws, cols, &x, &mut out);
                    best = best.min(t.elapsed().as_secs_f64());
                }
            });
            let gbs = (rows * cols * bytes) as f64 / best / 1e9;
            println!("{name:<6} {threads:>8} {:>10.1} {gbs:>10.2}", best * 1e6);
            println!(
                "{}",
                serde_json::json!({"bench": "gemv", "dtype": name, "rows": rows, "cols": cols, "threads": threads,
                    "us_per_call": best * 1e6, "gb_s": gbs})
            );
        }
    }
}
