//! Kernel micro-benchmarks against the machine's streaming read bandwidth, as a table and JSON lines:
//!
//! - **gemv**: the decode matrix-vector product on a `rows x cols` matrix, per weight dtype (f32,
//!   bf16, f16, or a block type such as q4_0: quantized from the same random values), per
//!   instruction-set path this CPU has (portable, AVX2, AVX-512), with 1 thread and all threads;
//!   block types in both decode schemes (`i8`: activations quantized to 8 bits, integer products,
//!   what decode uses; `f32`: f32 activations against weights widened in registers);
//! - **ffn**: the fused sparse FFN of decode (`n = rows` neurons of width `d = cols`; for block types
//!   `Wd^T` in Q8_0, as the engine keeps it), all neurons and a random `density` share of them,
//!   two ways: reading the kept rows in place from the full matrices (`indexed`, what the engine
//!   does) and after copying the kept rows into compact matrices (`compacted`; the copy is timed
//!   apart); and gated per token (`gated`, CATS: every gate row, then the up and down rows of the
//!   neurons whose `|act(g)|` reaches a threshold chosen on this `x` so that a `--gated` share of
//!   them passes). Its bytes are the ones read: `n` gate rows plus the passing neurons' up and down
//!   rows; `ideal` is the dense bytes over those bytes, and `of ideal` the speed-up over it.
//!
//! ```text
//! cargo run --release -p tda-bench --bin kernels -- [--rows 11008] [--cols 4096] [--iters 20]
//!     [--dtype f32,bf16,f16,q4_0,q8_0,...] [--density 0.5,0.3] [--gated 0.8,0.5] [--roofline-mib 1024]
//! ```

use half::{bf16, f16};
use std::time::Instant;
use tda_bench::{arg, machine, num, print_probe, Roofline};
use tda_core::kernels::cpu::{
    available, cpu, ffn_decode, ffn_decode_gated, gemv_float_acts_with, gemv_with, huge_page_copy, kernels, rule,
    FfnRows, GatedScratch, WeightSlice, DTYPES, MAX_FFN_CHUNKS,
};
use tda_core::quant::{QBlocks, QType};

/// A matrix in the three float weight dtypes and in the block types asked for.
struct Mat {
    f32: Vec<f32>,
    bf16: Vec<bf16>,
    f16: Vec<f16>,
    q: Vec<QBlocks>,
}

/// The block types among `dtypes` (`q4_0`, `q8_0`, ...).
fn qtypes(dtypes: &[String]) -> Vec<QType> {
    dtypes.iter().filter_map(|d| QType::parse(d)).collect()
}

impl Mat {
    /// A `rows x cols` matrix of random values, also quantized to `qs`.
    fn random(rows: usize, cols: usize, seed: u64, qs: &[QType]) -> Self {
        let len = rows * cols;
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let f32: Vec<f32> = (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect();
        let bf16: Vec<bf16> = f32.iter().map(|&v| bf16::from_f32(v)).collect();
        let f16: Vec<f16> = f32.iter().map(|&v| f16::from_f32(v)).collect();
        let q = qs.iter().map(|&q| QBlocks::quantize(q, &f32, rows, cols).unwrap_or_else(|e| panic!("{e}"))).collect();
        // On huge pages, as the engine's weights are.
        Self { f32: huge_page_copy(&f32), bf16: huge_page_copy(&bf16), f16: huge_page_copy(&f16), q }
    }

    fn slice(&self, dtype: &str) -> WeightSlice<'_> {
        if let Some(q) = QType::parse(dtype) {
            let b = self.q.iter().find(|b| b.qtype() == q).expect("quantized at creation");
            return WeightSlice::Q(b.slice());
        }
        match dtype {
            "bf16" => WeightSlice::BF16(&self.bf16),
            "f16" => WeightSlice::F16(&self.f16),
            _ => WeightSlice::F32(&self.f32),
        }
    }

    /// The rows in `kept`, copied into a compact matrix.
    fn gather(&self, kept: &[u32], d: usize) -> Self {
        fn rows<T: Copy>(v: &[T], kept: &[u32], d: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(kept.len() * d);
            for &j in kept {
                out.extend_from_slice(&v[j as usize * d..(j as usize + 1) * d]);
            }
            huge_page_copy(&out)
        }
        let q = self
            .q
            .iter()
            .map(|b| {
                let mut c = QBlocks::zeros(b.qtype(), 0);
                c.gather(b.slice(), kept, d);
                c
            })
            .collect();
        Self { f32: rows(&self.f32, kept, d), bf16: rows(&self.bf16, kept, d), f16: rows(&self.f16, kept, d), q }
    }
}

/// Bytes of a row of `cols` values in `dtype`.
fn row_bytes(dtype: &str, cols: usize) -> usize {
    match (dtype, QType::parse(dtype)) {
        (_, Some(q)) => q.row_bytes(cols),
        ("f32", _) => 4 * cols,
        _ => 2 * cols,
    }
}

/// A layout of the FFN weights: name, (gate, up, down^T), kept neurons (None: all), neuron count.
type Variant<'a> = (&'static str, [&'a Mat; 3], Option<&'a [u32]>, usize);

/// Best seconds per call over `iters`, with the bandwidth measured before and after. Before each
/// call a pass over the roofline buffer evicts the weights from the cache, as the other layers'
/// weights do in a real decode step (the last-level cache can exceed a single matrix).
fn time(roof: &Roofline, iters: usize, mut f: impl FnMut()) -> (f64, f64) {
    let before = roof.measure(3);
    let mut best = f64::INFINITY;
    for _ in 0..iters {
        roof.measure(1);
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, before.max(roof.measure(3)))
}

/// A sorted random subset of `0..n` with `round(density * n)` elements (at least 1).
fn random_kept(n: usize, density: f64, seed: u64) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let mut s = seed | 1;
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        idx.swap(i, (s % (i as u64 + 1)) as usize);
    }
    let mut kept = idx[..((density * n as f64).round() as usize).clamp(1, n)].to_vec();
    kept.sort_unstable();
    kept
}

fn main() {
    let rows: usize = num("--rows", &arg("--rows", "11008"));
    let cols: usize = num("--cols", &arg("--cols", "4096"));
    let iters: usize = num("--iters", &arg("--iters", "20"));
    let roof = Roofline::new(num("--roofline-mib", &arg("--roofline-mib", "1024")));
    let dtypes: Vec<String> = arg("--dtype", "f32,bf16,f16").split(',').map(str::to_string).collect();
    let densities: Vec<f64> =
        arg("--density", "0.5,0.3").split(',').map(|d| num::<f64>("--density", d).clamp(0.0, 1.0)).collect();
    let gated: Vec<f64> = arg("--gated", "0.8,0.5")
        .split(',')
        .filter(|g| !g.trim().is_empty())
        .map(|g| num::<f64>("--gated", g).clamp(0.0, 1.0))
        .collect();
    let all = rayon::current_num_threads();
    let m = machine();
    println!("machine: {} ({}), {all} threads", m["cpu"].as_str().unwrap_or(""), m["simd"]);
    print_probe(&roof);
    let cpu = cpu();
    let have: Vec<&str> = available().iter().map(|k| k.name).collect();
    println!(
        "\nkernel path per weight dtype (vendor {}, family {:#x}; paths here: {})",
        cpu.vendor,
        cpu.family,
        have.join(", ")
    );
    let mut json = vec![];
    for (i, dtype) in DTYPES.iter().enumerate() {
        let (rule_path, why) = rule(&cpu, &have, dtype);
        let used = kernels().paths[i];
        let forced = if used == rule_path { String::new() } else { format!(" (TDA_ENGINE_KERNELS: {used})") };
        println!("  {dtype:<5} {rule_path}{forced}: {why}");
        json.push(serde_json::json!({"bench": "path", "dtype": dtype, "rule": rule_path, "used": used, "why": why,
            "vendor": cpu.vendor, "family": cpu.family}));
    }

    // Rows are printed at the end, against the highest read rate of the whole run (probe readings
    // and kernels alike): the machine's limit, never "over 100%".
    let mut run_max = 0f64;
    let mut gemv_rows: Vec<(String, f64, &str)> = vec![];
    let mut ffn_rows: Vec<(String, f64, String)> = vec![];
    let mut qs = qtypes(&dtypes);
    if !qs.is_empty() && !qs.contains(&QType::Q8_0) {
        // The engine's transposed down projection of a quantized FFN (`sparse_down_type`).
        qs.push(QType::Q8_0);
    }
    let w = Mat::random(rows, cols, 1, &qs);
    let x: Vec<f32> = (0..cols).map(|i| ((i % 13) as f32 - 6.0) / 13.0).collect();
    let mut out = vec![0f32; rows];
    for dtype in &dtypes {
        // Block types run both decode schemes: 8-bit activations and integer products (`i8`, what
        // decode uses), and f32 activations against weights widened in registers (`f32`).
        let schemes: &[&str] = if QType::parse(dtype).is_some() { &["i8", "f32"] } else { &[""] };
        for k in available() {
            for &scheme in schemes {
                for threads in [1, all] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
                    let (best, rl) = pool.install(|| {
                        time(&roof, iters, || match (scheme, w.slice(dtype)) {
                            ("f32", WeightSlice::Q(q)) => gemv_float_acts_with(k, q, cols, &x, &mut out),
                            (_, ws) => gemv_with(k, ws, cols, &x, &mut out),
                        })
                    });
                    let gbs = (rows * row_bytes(dtype, cols)) as f64 / best / 1e9;
                    let di = DTYPES.iter().position(|d| d == dtype).unwrap_or(if scheme.is_empty() { 0 } else { 3 });
                    let mark = if kernels().paths[di] == k.name && scheme != "f32" { " (in use)" } else { "" };
                    run_max = run_max.max(rl).max(gbs);
                    let label = if scheme.is_empty() { dtype.clone() } else { format!("{dtype} {scheme}") };
                    gemv_rows.push((
                        format!("{label:<9} {:<11} {threads:>7} {:>10.1} {gbs:>8.2} {rl:>9.2}", k.name, best * 1e6),
                        gbs,
                        mark,
                    ));
                    json.push(serde_json::json!({"bench": "gemv", "dtype": dtype, "activations": scheme,
                        "path": k.name, "rows": rows, "cols": cols, "threads": threads, "us_per_call": best * 1e6,
                        "gb_s": gbs, "roofline_gb_s": rl}));
                }
            }
        }
    }
    drop(w);

    let (n, d) = (rows, cols);
    let (g, u, dt) = (Mat::random(n, d, 2, &qs), Mat::random(n, d, 3, &qs), Mat::random(n, d, 4, &qs));
    let mut partials = vec![0f32; MAX_FFN_CHUNKS * d];
    let mut y = vec![0f32; d];
    let act = |v: f32| v / (1.0 + (-v).exp());
    for dtype in &dtypes {
        let mut dense_s = f64::NAN;
        for &density in std::iter::once(&1.0).chain(&densities) {
            let kept = random_kept(n, density, 7);
            let t0 = Instant::now();
            let compact = [&g, &u, &dt].map(|m| m.gather(&kept, d));
            let copy_ms = t0.elapsed().as_secs_f64() * 1e3;
            let variants: Vec<Variant> = if density >= 1.0 {
                vec![("dense", [&g, &u, &dt], None, n)]
            } else {
                vec![
                    ("indexed", [&g, &u, &dt], Some(&kept[..]), n),
                    ("compacted", [&compact[0], &compact[1], &compact[2]], None, kept.len()),
                ]
            };
            for (layout, [mg, mu, md], sel, rows) in variants {
                let w = FfnRows {
                    gate: mg.slice(dtype),
                    up: mu.slice(dtype),
                    // As the engine stores it: requantized to Q8_0 for every block type.
                    down_t: md.slice(if QType::parse(dtype).is_some() { "q8_0" } else { dtype }),
                    gate_bias: None,
                    up_bias: None,
                    d,
                };
                let (best, rl) =
                    time(&roof, iters, || ffn_decode(kernels(), w, rows, sel, &x, act, &mut partials, &mut y));
                if density >= 1.0 {
                    dense_s = best;
                }
                let down = if QType::parse(dtype).is_some() { "q8_0" } else { dtype };
                let bytes = kept.len() * (2 * row_bytes(dtype, d) + row_bytes(down, d));
                let gbs = bytes as f64 / best / 1e9;
                let copy = if layout == "compacted" { copy_ms } else { 0.0 };
                run_max = run_max.max(rl).max(gbs);
                ffn_rows.push((
                    format!("{dtype:<6} {density:>7.2} {layout:<10} {:>10.1} {gbs:>8.2} {rl:>9.2}", best * 1e6),
                    gbs,
                    format!(
                        " {:>7.2}x {:>5.2}x {copy:>9.1} {:>7.2}",
                        dense_s / best,
                        n as f64 / kept.len() as f64,
                        dense_s / best / (n as f64 / kept.len() as f64)
                    ),
                ));
                json.push(serde_json::json!({"bench": "ffn", "dtype": dtype, "path": kernels().name, "n": n, "d": d,
                    "density": density, "layout": layout, "threads": all, "us_per_call": best * 1e6, "gb_s": gbs,
                    "roofline_gb_s": rl, "speedup_vs_dense": dense_s / best,
                    "ideal_speedup": n as f64 / kept.len() as f64,
                    "of_ideal": dense_s / best / (n as f64 / kept.len() as f64), "copy_ms": copy}));
            }
        }
        // Gated per token (CATS): the threshold from this x's dense |act(g)|, so that a `keep`
        // share of the neurons passes.
        let down = if QType::parse(dtype).is_some() { "q8_0" } else { dtype };
        let w = FfnRows {
            gate: g.slice(dtype),
            up: u.slice(dtype),
            down_t: dt.slice(down),
            gate_bias: None,
            up_bias: None,
            d,
        };
        let mut gate = vec![0f32; n];
        gemv_with(kernels(), w.gate, d, &x, &mut gate);
        let mut mags: Vec<f32> = gate.iter().map(|&v| act(v).abs()).collect();
        mags.sort_by(f32::total_cmp);
        let mut scratch = GatedScratch::with_capacity(n);
        let dense_bytes = n * (2 * row_bytes(dtype, d) + row_bytes(down, d));
        for &keep in &gated {
            let t = if keep >= 1.0 { 0.0 } else { mags[(((1.0 - keep) * n as f64).round() as usize).min(n - 1)] };
            let mut passed = 0;
            let (best, rl) = time(&roof, iters, || {
                passed = ffn_decode_gated(kernels(), w, n, None, t, &x, act, &mut scratch, &mut partials, &mut y)
            });
            let bytes = n * row_bytes(dtype, d) + passed * (row_bytes(dtype, d) + row_bytes(down, d));
            let gbs = bytes as f64 / best / 1e9;
            let (speedup, ideal) = (dense_s / best, dense_bytes as f64 / bytes as f64);
            let share = passed as f64 / n as f64;
            run_max = run_max.max(rl).max(gbs);
            ffn_rows.push((
                format!("{dtype:<6} {share:>7.2} {:<10} {:>10.1} {gbs:>8.2} {rl:>9.2}", "gated", best * 1e6),
                gbs,
                format!(" {speedup:>7.2}x {ideal:>5.2}x {:>9} {:>7.2}", "", speedup / ideal),
            ));
            json.push(serde_json::json!({"bench": "ffn", "dtype": dtype, "path": kernels().name, "n": n, "d": d,
                "density": share, "layout": "gated", "threshold": t, "passed": passed, "threads": all,
                "us_per_call": best * 1e6, "gb_s": gbs, "bytes": bytes, "roofline_gb_s": rl,
                "speedup_vs_dense": speedup, "ideal_speedup": ideal, "of_ideal": speedup / ideal}));
        }
    }
    println!("\nroofline: {run_max:.2} GB/s, the highest read rate of this run (probe readings and kernels)");
    println!("\ngemv {rows} x {cols} (probe GB/s: the reading around that row)");
    println!(
        "{:<9} {:<11} {:>7} {:>10} {:>8} {:>9} {:>7}",
        "dtype", "path", "threads", "us/call", "GB/s", "probe", "% roof"
    );
    for (line, gbs, mark) in &gemv_rows {
        println!("{line} {:>6.0}%{mark}", 100.0 * gbs / run_max);
    }
    println!("\nfused FFN decode, {n} neurons of width {d}, {all} threads, paths {}", kernels().name);
    println!(
        "{:<6} {:>7} {:<10} {:>10} {:>8} {:>9} {:>7} {:>8} {:>6} {:>9} {:>7}",
        "dtype", "density", "layout", "us/call", "GB/s", "probe", "% roof", "speedup", "ideal", "copy ms", "of ideal"
    );
    for (line, gbs, tail) in &ffn_rows {
        println!("{line} {:>6.0}%{tail}", 100.0 * gbs / run_max);
    }
    for j in json.iter_mut().filter(|j| j["gb_s"].is_number()) {
        let g = j["gb_s"].as_f64().unwrap_or(0.0);
        j["run_roofline_gb_s"] = serde_json::json!(run_max);
        j["fraction_of_roofline"] = serde_json::json!(g / run_max);
    }
    let huge = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    println!("{}", huge.lines().find(|l| l.starts_with("AnonHugePages")).unwrap_or(""));
    for j in json {
        println!("{j}");
    }
}
