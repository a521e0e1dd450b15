//! Batched decode benchmark: total decode tokens/s of B sequences decoded together by
//! `Model::decode_batch` (one read of the weights per step for all B rows), for each B, side by side
//! in one run, on a synthetic model with the shapes of a preset.
//!
//! ```text
//! cargo run --release -p tda-bench --bin batch -- --preset llama-2-7b --layers 2 [--dtype f32,bf16]
//!     [--batch 1,2,4,8] [--prompt-tokens 64] [--new-tokens 16] [--repeat 3]
//! ```
//!
//! Every sequence has its own prompt (different lengths, so that positions differ) and its own
//! state; they are prefilled one by one (not timed), then `--new-tokens` batched greedy steps are
//! timed. Batch sizes run round-robin and keep each one's best, so that drift in the machine's
//! speed hits all of them alike. "vs B=1" is the total tokens/s over that of one sequence alone:
//! what B clients gain over taking turns. Prints a table, then one JSON line per configuration.

use std::time::Instant;
use tda_bench::{arg, machine, num};
use tda_core::load::synthetic::{preset_config, RandomWeights};
use tda_core::model::{BatchRow, FfnMode, Logits, Model, State};

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("batch: {e}");
    std::process::exit(2);
}

/// Greedy: the largest logit (the first on ties).
fn greedy(model: &Model, st: &mut State) -> u32 {
    let l = model.host_logits(st).unwrap_or_else(|e| fail(e));
    (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a))).unwrap_or(0) as u32
}

/// `b` sequences prefilled densely, each with its own prompt of about `p` tokens; returns the
/// states, the next tokens and the positions.
fn prefill(model: &Model, b: usize, p: usize, cap: usize) -> (Vec<State>, Vec<u32>, Vec<usize>) {
    let v = model.cfg.vocab_size as u32;
    let mut out = (vec![], vec![], vec![]);
    for i in 0..b {
        let len = p - i.min(p / 2);
        let prompt: Vec<u32> = (0..len as u32).map(|t| (t * 7919 + i as u32 * 104_729 + 13) % v).collect();
        let mut st = model.new_state(len, cap).unwrap_or_else(|e| fail(e));
        model.forward(&prompt, 0, &mut st, FfnMode::Dense, Logits::Last).unwrap_or_else(|e| fail(e));
        out.1.push(greedy(model, &mut st));
        out.0.push(st);
        out.2.push(len);
    }
    out
}

/// Seconds for `new` batched steps of `b` sequences.
fn run(model: &Model, b: usize, p: usize, new: usize) -> f64 {
    let (mut states, mut toks, mut pos) = prefill(model, b, p, p + new + 1);
    let mut batch = model.new_batch(b).unwrap_or_else(|e| fail(e));
    let t0 = Instant::now();
    for _ in 0..new {
        let mut rows: Vec<BatchRow> = states
            .iter_mut()
            .zip(&toks)
            .zip(&pos)
            .map(|((state, &token), &position)| BatchRow { state, token, position, mode: FfnMode::Dense })
            .collect();
        model.decode_batch(&mut rows, &mut batch).unwrap_or_else(|e| fail(e));
        for ((st, t), p) in states.iter_mut().zip(&mut toks).zip(&mut pos) {
            *t = greedy(model, st);
            *p += 1;
        }
    }
    t0.elapsed().as_secs_f64()
}

fn main() {
    let preset = arg("--preset", "smollm2-135m");
    let layers: Option<usize> =
        std::env::args().any(|a| a == "--layers").then(|| num("--layers", &arg("--layers", "")));
    let dtypes = arg("--dtype", "f32");
    let sizes: Vec<usize> = arg("--batch", "1,2,4,8").split(',').map(|b| num("--batch", b)).collect();
    let p: usize = num("--prompt-tokens", &arg("--prompt-tokens", "64"));
    let new: usize = num("--new-tokens", &arg("--new-tokens", "16"));
    let repeat: usize = num("--repeat", &arg("--repeat", "3"));
    if sizes.iter().any(|&b| b == 0) || p < 2 || new == 0 || repeat == 0 {
        fail("--batch sizes, --new-tokens and --repeat must be >= 1, --prompt-tokens >= 2");
    }
    let (be, _) = tda_bench::device("cpu", 64).unwrap_or_else(|e| fail(e));
    let m = machine();
    println!("machine: {} ({}), kernels {}", m["cpu"].as_str().unwrap_or(""), m["simd"], m["kernels"]);
    println!(
        "model {preset}{}, {} threads, prompts of {}-{p} tokens, {new} new tokens per sequence",
        layers.map_or(String::new(), |l| format!(", {l} layers")),
        rayon::current_num_threads(),
        p - p / 2
    );
    println!("{:<6} {:>5} {:>12} {:>10} {:>8}", "dtype", "batch", "total tok/s", "step ms", "vs B=1");
    let mut json_lines = vec![];
    for dtype in dtypes.split(',') {
        let cfg = preset_config(&preset, layers).unwrap_or_else(|e| fail(e));
        let dt = tda_core::engine::parse_dtype(dtype)
            .unwrap_or_else(|e| fail(e))
            .unwrap_or(tda_core::load::Precision::Float(candle_core::DType::F32));
        let model = Model::load(cfg, &RandomWeights { seed: 7 }, dt, be.clone()).unwrap_or_else(|e| fail(e));
        let mut best = vec![f64::INFINITY; sizes.len()];
        for _ in 0..repeat {
            for (i, &b) in sizes.iter().enumerate() {
                best[i] = best[i].min(run(&model, b, p, new));
            }
        }
        let one = sizes.iter().position(|&b| b == 1).map(|i| new as f64 / best[i]);
        for (&b, &s) in sizes.iter().zip(&best) {
            let tok_s = (b * new) as f64 / s;
            let gain = one.map_or(f64::NAN, |o| tok_s / o);
            println!("{dtype:<6} {b:>5} {tok_s:>12.1} {:>10.2} {gain:>7.2}x", 1e3 * s / new as f64);
            let j = serde_json::json!({"bench": "batch", "model": preset, "layers_override": layers, "dtype": dtype,
                "batch": b, "new_tokens": new, "prompt_tokens": p, "total_tok_s": tok_s, "step_s": s / new as f64,
                "vs_batch_1": gain, "threads": rayon::current_num_threads(), "machine": m});
            json_lines.push(j);
        }
    }
    for j in json_lines {
        println!("{j}");
    }
}
