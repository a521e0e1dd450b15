//! Where a decode token's time goes: a model with the exact shapes of a preset (random weights),
//! every backend operation timed ([`tda_bench::timed::Timed`]), then the cost of the thread pool's
//! fork-joins on their own. Prints a table per dtype and JSON lines.
//!
//! ```text
//! cargo run --release -p tda-bench --bin profile -- [--preset smollm2-135m] [--layers N]
//!     [--dtype f32,bf16,f16] [--prompt-tokens 128] [--new-tokens 64]
//! ```
//!
//! "outside the ops" is the token's wall time less the operations' sum: the model code between
//! them, reading the logits and the host argmax.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tda_bench::timed::Timed;
use tda_bench::{arg, num};
use tda_core::kernels::cpu::CpuBackend;
use tda_core::load::synthetic::{preset_config, RandomWeights};
use tda_core::model::{FfnMode, Logits, Model};

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("profile: {e}");
    std::process::exit(2);
}

/// Mean microseconds of one fork-join of two trivial tasks: back to back (the pool awake), and
/// each after `idle` of sleep (the pool's threads gone to sleep, so the join must wake them).
fn fork_join_us(idle: Duration, reps: usize) -> (f64, f64) {
    let hot = {
        let t = Instant::now();
        for i in 0..reps * 10 {
            rayon::join(|| std::hint::black_box(i), || std::hint::black_box(i + 1));
        }
        t.elapsed().as_secs_f64() * 1e6 / (reps * 10) as f64
    };
    let mut cold = 0.0;
    for i in 0..reps {
        std::thread::sleep(idle);
        let t = Instant::now();
        rayon::join(|| std::hint::black_box(i), || std::hint::black_box(i + 1));
        cold += t.elapsed().as_secs_f64();
    }
    (hot, cold * 1e6 / reps as f64)
}

/// Prints the operations' share of `wall` seconds over `per` steps (tokens, or one prefill) and
/// adds one JSON line per operation (`base` plus the operation's numbers).
fn report(
    totals: tda_bench::timed::Totals,
    wall: f64,
    per: usize,
    json: &mut Vec<serde_json::Value>,
    base: serde_json::Value,
) {
    let per_f = per as f64;
    let mut ops: Vec<(String, u64, f64)> = totals.into_iter().map(|(k, (c, s))| (k, c, s / per_f)).collect();
    ops.sort_by(|a, b| b.2.total_cmp(&a.2));
    let step = wall / per_f;
    let inside: f64 = ops.iter().map(|o| o.2).sum();
    println!("{:<20} {:>10} {:>10} {:>7}", "operation", "calls", "us", "share");
    for (name, calls, s) in ops.iter().chain(std::iter::once(&("outside the ops".to_string(), 0, step - inside))) {
        let c = *calls as f64 / per_f;
        println!("{name:<20} {c:>10.1} {:>10.1} {:>6.1}%", s * 1e6, 100.0 * s / step);
        let mut j = base.clone();
        j["bench"] = serde_json::json!("profile");
        j["op"] = serde_json::json!(name);
        j["calls"] = serde_json::json!(c);
        j["us"] = serde_json::json!(s * 1e6);
        j["share"] = serde_json::json!(s / step);
        json.push(j);
    }
}

fn main() {
    let preset = arg("--preset", "smollm2-135m");
    let layers = std::env::args().any(|a| a == "--layers").then(|| num::<usize>("--layers", &arg("--layers", "")));
    let p: usize = num("--prompt-tokens", &arg("--prompt-tokens", "128"));
    let new: usize = num("--new-tokens", &arg("--new-tokens", "64"));
    let threads = rayon::current_num_threads();
    let m = tda_bench::machine();
    println!(
        "machine: {} ({}), {threads} threads, kernels {}",
        m["cpu"].as_str().unwrap_or(""),
        m["simd"],
        m["kernels"]
    );
    let (hot, cold) = fork_join_us(Duration::from_millis(2), 200);
    let (in_hot, in_cold) = rayon::scope(|_| fork_join_us(Duration::from_millis(2), 200));
    println!("fork-join of 2 trivial tasks, from a thread outside the pool: {hot:.2} us back to back, {cold:.2} us after 2 ms idle");
    println!("                             from a thread of the pool:      {in_hot:.2} us back to back, {in_cold:.2} us after 2 ms idle");
    let mut json = vec![serde_json::json!({"bench": "fork_join", "outside_hot_us": hot, "outside_after_idle_us": cold,
        "inside_hot_us": in_hot, "inside_after_idle_us": in_cold, "threads": threads})];
    for dtype in arg("--dtype", "f32,bf16,f16").split(',') {
        let cfg = preset_config(&preset, layers).unwrap_or_else(|e| fail(e));
        let (vocab, nl) = (cfg.vocab_size, cfg.num_layers);
        let dt = tda_core::engine::parse_dtype(dtype)
            .unwrap_or_else(|e| fail(e))
            .unwrap_or(tda_core::load::Precision::Float(candle_core::DType::F32));
        let timed = Arc::new(Timed::new(Arc::new(CpuBackend), vocab));
        let model = Model::load(cfg, &RandomWeights { seed: 7 }, dt, timed.clone()).unwrap_or_else(|e| fail(e));
        let mut st = model.new_state(p, p + new + 1).unwrap_or_else(|e| fail(e));
        let prompt: Vec<u32> = (0..p as u32).map(|i| (i * 7919 + 13) % vocab as u32).collect();
        timed.take();
        let t = Instant::now();
        model.forward(&prompt, 0, &mut st, FfnMode::Dense, Logits::Last).unwrap_or_else(|e| fail(e));
        let wall = t.elapsed().as_secs_f64();
        println!(
            "\n{preset} ({nl} layers), {dtype}, {threads} threads: prefill of {p} tokens in {:.1} ms ({:.1} tok/s)",
            wall * 1e3,
            p as f64 / wall
        );
        report(
            timed.take(),
            wall,
            1,
            &mut json,
            serde_json::json!({"phase": "prefill", "preset": preset,
            "dtype": dtype, "threads": threads, "prompt_tokens": p, "ms": wall * 1e3}),
        );
        let mut tok = 0u32;
        timed.take();
        let t = Instant::now();
        for i in 0..new {
            model.forward(&[tok], p + i, &mut st, FfnMode::Dense, Logits::Last).unwrap_or_else(|e| fail(e));
            let l = model.host_logits(&mut st).unwrap_or_else(|e| fail(e));
            tok = (0..vocab).max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a))).unwrap_or(0) as u32;
        }
        let wall = t.elapsed().as_secs_f64() / new as f64;
        println!(
            "\n{preset} ({nl} layers), {dtype}, {threads} threads: {:.2} ms per decoded token ({:.1} tok/s), after {p} prompt tokens",
            wall * 1e3,
            1.0 / wall
        );
        report(
            timed.take(),
            wall * new as f64,
            new,
            &mut json,
            serde_json::json!({"phase": "decode", "preset": preset,
            "dtype": dtype, "threads": threads, "token_ms": wall * 1e3}),
        );
    }
    println!();
    for j in json {
        println!("{j}");
    }
}
