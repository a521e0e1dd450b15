//! Decode benchmark: dense and sparse (TDA, GRIFFIN, CATS, hybrid) decoding side by side in one run, per dtype,
//! on a real checkpoint or on a synthetic model with the exact shapes of a named preset.
//!
//! ```text
//! cargo run --release -p tda-bench --bin decode -- (--preset smollm2-135m [--layers N] | --model PATH)
//!     [--dtype f32,bf16,f16,q4_0,q8_0,q4_k,auto] [--sparsity dense,tda:0.5,griffin:0.5,cats:0.5,hybrid:0.9,0.5]
//!     [--prompt-tokens 128] [--new-tokens 64] [--repeat 3] [--roofline-mib 1024]
//!     [--device cpu|cuda|cuda:N] [--json PATH]
//! ```
//!
//! On a GPU (`--device cuda`, a build with the `cuda` feature) the preset's random weights are made
//! on the device, and the roofline is the bandwidth of a device-to-device copy of `--roofline-mib`
//! MiB, (bytes read + bytes written) / time, measured around every timed decode like the CPU's.
//!
//! For every configuration it reports the kept FFN neurons, the weight bytes one decode step reads
//! (attention, norms and LM head included), prefill and decode tok/s, the decode speedup over dense
//! measured in the same run, the ideal speedup `bytes_dense / bytes_sparse`, and their ratio.
//! Repeats run the configurations round-robin and keep each one's best, so that drift in the
//! machine's speed hits all of them alike. TDA thresholds come from a quantile calibration on random
//! token windows of the prompt's length (the weights are random, so there is no text to use), gate
//! thresholds (CATS, hybrid) from the gate histogram of random windows of twice that length. With a
//! per-token gate, the bytes are those the kernels counted (gate rows of the set, up and down rows
//! of the neurons that passed), averaged over the decoded tokens.
//! Right before and right after every timed decode it measures the machine's streaming read
//! bandwidth (all threads, vectorised, best of 3 passes over a buffer larger than the cache): the
//! roofline. "% roof" is the achieved bandwidth (weight bytes per token x tok/s) over the larger
//! of the two measurements around the best run.
//! It also times the prefill with and without collecting the neuron statistics.

use std::path::PathBuf;
use std::time::Instant;
use tda_bench::machine;
use tda_core::kernels::Draw;
use tda_core::load::synthetic::{preset_config, RandomWeights, PRESETS};
use tda_core::model::{FfnMode, Logits, Model, State};
use tda_core::sparsity::calibrate::{gate_histogram, LengthProfile, Progress};
use tda_core::sparsity::gate::GateHistogram;
use tda_core::{Engine, Sparsity, Thresholds};

struct Args {
    model: Option<PathBuf>,
    preset: Option<String>,
    layers: Option<usize>,
    prompt_tokens: usize,
    new_tokens: usize,
    repeat: usize,
    dtypes: Vec<String>,
    sparsity: Vec<String>,
    roofline_mib: usize,
    device: String,
    json: Option<PathBuf>,
}

const USAGE: &str =
    "usage: decode (--preset NAME [--layers N] | --model PATH) [--dtype f32,bf16,f16,q4_0,q8_0,q4_k,auto] \
     [--sparsity dense,tda:0.5,cats:0.5,hybrid:0.9,0.5] [--prompt-tokens N] [--new-tokens N] [--repeat N] \
     [--roofline-mib N] [--device cpu|cuda[:N]] [--json PATH]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: None,
        preset: None,
        layers: None,
        prompt_tokens: 128,
        new_tokens: 64,
        repeat: 3,
        dtypes: vec!["f32".into()],
        sparsity: vec!["dense".into()],
        roofline_mib: 1024,
        device: "cpu".into(),
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String, f: &str| v.parse::<usize>().map_err(|e| format!("{f}: {e}"));
        match flag.as_str() {
            "--model" => a.model = Some(PathBuf::from(val()?)),
            "--preset" => a.preset = Some(val()?),
            "--layers" => a.layers = Some(num(val()?, "--layers")?),
            "--prompt-tokens" => a.prompt_tokens = num(val()?, "--prompt-tokens")?,
            "--new-tokens" => a.new_tokens = num(val()?, "--new-tokens")?,
            "--repeat" => a.repeat = num(val()?, "--repeat")?,
            "--roofline-mib" => a.roofline_mib = num(val()?, "--roofline-mib")?,
            "--device" => a.device = val()?,
            "--json" => a.json = Some(PathBuf::from(val()?)),
            "--dtype" => a.dtypes = val()?.split(',').map(str::to_string).collect(),
            "--sparsity" => a.sparsity = spec_list(&val()?),
            "-h" | "--help" => {
                println!("{USAGE}\npresets: {}", PRESETS.join(", "));
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if a.model.is_some() == a.preset.is_some() {
        return Err(format!("give one of --model PATH and --preset NAME\n{USAGE}"));
    }
    if a.prompt_tokens == 0 || a.new_tokens < 2 || a.repeat == 0 || a.roofline_mib == 0 {
        return Err("--prompt-tokens, --repeat and --roofline-mib must be >= 1, --new-tokens >= 2".into());
    }
    Ok(a)
}

struct Row {
    dtype: String,
    sparsity: String,
    kept_fraction: f64,
    /// FFN bytes read per decoded token, as a fraction of dense (counted by the kernels).
    ffn_bytes: f64,
    bytes: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    /// Read bandwidth around the best decode run, GB/s: (before, after).
    roofline: (f64, f64),
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("decode: {e}");
    std::process::exit(2);
}

/// Splits a comma-separated list of specs; a bare number continues the spec before it
/// (`dense,hybrid:0.9,0.5` is two specs).
fn spec_list(s: &str) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for part in s.split(',') {
        match (part.trim().parse::<f64>(), out.last_mut()) {
            (Ok(_), Some(prev)) => *prev = format!("{prev},{part}"),
            _ => out.push(part.to_string()),
        }
    }
    out
}

/// A deterministic in-vocabulary token sequence.
fn tokens(n: usize, vocab: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(7919).wrapping_add(seed.wrapping_mul(104_729)) + 13) % vocab as u32).collect()
}

/// Resolves `tda:D`, `cats:K` and `hybrid:D,K` to thresholds calibrated on the bench's own
/// windows (the prompt-length profile, and the gate histogram of their second halves); other specs
/// parse as usual.
fn spec(s: &str, profile: &LengthProfile, gates: &GateHistogram, layers: usize) -> Sparsity {
    let (density, keep) = match Sparsity::parse(s).unwrap_or_else(|e| fail(e)) {
        Sparsity::TdaDensity(d) => (d, 1.0),
        Sparsity::Cats(k) => (1.0, k),
        Sparsity::Hybrid { density, keep } => (density, keep),
        other => return other,
    };
    let mut t = match density < 1.0 {
        true => profile.thresholds(&vec![density; layers]),
        false => Thresholds::fixed(vec![0.0; layers]),
    };
    if keep < 1.0 {
        t.gate = (0..layers).map(|l| gates.threshold(l, density, keep)).collect();
    }
    t.meta = serde_json::json!({"name": s});
    Sparsity::Tda(std::sync::Arc::new(t))
}

/// The greedy next token: on the device when the logits live there (only the id is read back).
fn greedy(model: &Model, st: &mut State, v: usize) -> u32 {
    if model.samples_on_device() {
        let draw = Draw { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.0 };
        return model.sample_on_device(st, &draw).unwrap_or_else(|e| fail(e)).unwrap_or(0);
    }
    let l = model.host_logits(st).unwrap_or_else(|e| fail(e));
    (0..v).max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a))).unwrap_or(0) as u32
}

/// Dense prefill (observing when sparse), mask, then `new` decode steps; (prefill s, decode s,
/// kept, FFN bytes read per token as a fraction of dense).
fn run(model: &Model, st: &mut State, prompt: &[u32], new: usize, sp: &Sparsity) -> (f64, f64, Vec<usize>, f64) {
    let v = model.cfg.vocab_size;
    let dense = sp.is_dense();
    let t0 = Instant::now();
    st.stats.reset();
    let mode = if dense { FfnMode::Dense } else { FfnMode::Observe };
    model.forward(prompt, 0, st, mode, Logits::Last).unwrap_or_else(|e| fail(e));
    st.mask.select(&sp.selector().unwrap_or_else(|e| fail(e)), &st.stats).unwrap_or_else(|e| fail(e));
    let prefill = t0.elapsed().as_secs_f64();
    let mut tok = greedy(model, st, v);
    let mode = if dense { FfnMode::Dense } else { FfnMode::Sparse };
    let t1 = Instant::now();
    for i in 0..new {
        model.forward(&[tok], prompt.len() + i, st, mode, Logits::Last).unwrap_or_else(|e| fail(e));
        tok = greedy(model, st, v);
    }
    let ffn_bytes = if dense { 1.0 } else { model.ffn_bytes(st) };
    (prefill, t1.elapsed().as_secs_f64(), st.mask.counts(), ffn_bytes)
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| fail(e));
    let threads = rayon::current_num_threads();
    let (be, roof) = tda_bench::device(&args.device, args.roofline_mib).unwrap_or_else(|e| fail(e));
    let name = args.model.as_ref().map_or_else(|| args.preset.clone().unwrap_or_default(), |p| p.display().to_string());
    let mut rows = Vec::new();
    let mut overheads = Vec::new();
    for dtype in &args.dtypes {
        let engine;
        let synthetic;
        let model: &Model = match (&args.model, &args.preset) {
            (Some(path), _) => {
                engine = Engine::from_pretrained(path, &args.device, dtype).unwrap_or_else(|e| fail(e));
                engine.model()
            }
            (None, Some(p)) => {
                let cfg = preset_config(p, args.layers).unwrap_or_else(|e| fail(e));
                let dt = tda_core::engine::parse_dtype(dtype)
                    .unwrap_or_else(|e| fail(e))
                    .unwrap_or(tda_core::load::Precision::Float(candle_core::DType::F32));
                synthetic = Model::load(cfg, &RandomWeights { seed: 7 }, dt, be.clone()).unwrap_or_else(|e| fail(e));
                &synthetic
            }
            _ => unreachable!(),
        };
        let (vocab, layers) = (model.cfg.vocab_size, model.cfg.num_layers);
        let p = args.prompt_tokens;
        let mut st = model.new_state(p, p + args.new_tokens + 1).unwrap_or_else(|e| fail(e));
        let windows: Vec<Vec<u32>> = (1..=4).map(|s| tokens(p, vocab, s)).collect();
        let profile = LengthProfile::collect(model, &mut st, &windows, &[p], &mut Progress::new(None))
            .unwrap_or_else(|e| fail(e));
        let gated = args.sparsity.iter().any(|s| s.starts_with("cats") || s.starts_with("hybrid"));
        let gates = match gated {
            true => {
                let wins: Vec<Vec<u32>> = (5..=8).map(|s| tokens(2 * p, vocab, s)).collect();
                let mut st2 = model.new_state(2 * p, 2 * p).unwrap_or_else(|e| fail(e));
                gate_histogram(model, &mut st2, &wins, p, &mut Progress::new(None)).unwrap_or_else(|e| fail(e))
            }
            false => GateHistogram::new(layers, model.cfg.intermediate_size, model.cfg.act, vec![vec![]; layers]),
        };
        let specs: Vec<(String, Sparsity)> =
            args.sparsity.iter().map(|s| (s.clone(), spec(s, &profile, &gates, layers))).collect();
        let prompt = tokens(p, vocab, 0);

        // Prefill with and without the statistics, back to back in alternating order; the median
        // of the per-pair ratios is robust to the machine's drift.
        let (mut plain, mut observed, mut ratios) = (f64::INFINITY, f64::INFINITY, vec![]);
        for rep in 0..args.repeat.max(7) {
            let mut t = [0f64; 2];
            let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let mode = if i == 0 { FfnMode::Dense } else { FfnMode::Observe };
                st.stats.reset();
                let t0 = Instant::now();
                model.forward(&prompt, 0, &mut st, mode, Logits::Last).unwrap_or_else(|e| fail(e));
                t[i] = t0.elapsed().as_secs_f64();
            }
            plain = plain.min(t[0]);
            observed = observed.min(t[1]);
            ratios.push(t[1] / t[0]);
        }
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        overheads.push((dtype.clone(), plain, observed, median, ratios.len()));

        let mut best = vec![(f64::INFINITY, f64::INFINITY, vec![], (0.0, 0.0), 1.0); specs.len()];
        for _ in 0..args.repeat {
            for (i, (_, sp)) in specs.iter().enumerate() {
                let before = roof.measure(3);
                let (pf, dec, kept, ffn_bytes) = run(model, &mut st, &prompt, args.new_tokens, sp);
                let after = roof.measure(3);
                let b = &mut best[i];
                b.0 = b.0.min(pf);
                if dec < b.1 {
                    b.1 = dec;
                    b.3 = (before, after);
                }
                b.2 = kept;
                b.4 = ffn_bytes;
            }
        }
        let n = model.cfg.intermediate_size;
        let ffn_dense = model.ffn_dense_bytes() as f64;
        for ((label, _), (pf, dec, kept, roofline, ffn_bytes)) in specs.iter().zip(best) {
            rows.push(Row {
                dtype: dtype.clone(),
                sparsity: label.clone(),
                kept_fraction: kept.iter().sum::<usize>() as f64 / (kept.len() * n) as f64,
                ffn_bytes,
                bytes: (model.decode_weight_bytes() as f64 - (1.0 - ffn_bytes) * ffn_dense).round() as usize,
                prefill_tok_s: p as f64 / pf,
                decode_tok_s: args.new_tokens as f64 / dec,
                roofline,
            });
        }
    }

    let m = machine();
    println!(
        "machine: {} ({}), kernels {}, prefill {}",
        m["cpu"].as_str().unwrap_or(""),
        m["simd"],
        m["kernels"],
        m["prefill_path"]
    );
    println!("device {}, roofline: {}", be.device(), roof.kind());
    #[allow(irrefutable_let_patterns)]
    if let tda_bench::Bandwidth::Host(r) = &roof {
        tda_bench::print_probe(r);
    }
    println!("model {name}, {threads} threads, prompt {} tokens, {} new tokens", args.prompt_tokens, args.new_tokens);
    println!(
        "{:<6} {:<14} {:>6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>7} {:>8} {:>7} {:>8}",
        "dtype",
        "sparsity",
        "kept",
        "FFN bytes",
        "MB/token",
        "prefill",
        "decode",
        "GB/s",
        "roof GB/s",
        "% roof",
        "speedup",
        "ideal",
        "of ideal"
    );
    let dense_of = |dtype: &str| rows.iter().find(|r| r.dtype == dtype && r.sparsity == "dense");
    // The machine's limit is the highest read rate anything reached in this run: every probe
    // reading and every configuration's own rate (a drifting machine can read faster during a
    // decode than during the probe next to it; then that rate is the limit, never "over 100%").
    let roofline = rows
        .iter()
        .flat_map(|r| [r.roofline.0, r.roofline.1, r.bytes as f64 * r.decode_tok_s / 1e9])
        .fold(0f64, f64::max);
    let mut json_lines = Vec::new();
    for r in &rows {
        let (speedup, ideal) = match dense_of(&r.dtype) {
            Some(d) => (r.decode_tok_s / d.decode_tok_s, d.bytes as f64 / r.bytes as f64),
            None => (f64::NAN, f64::NAN),
        };
        let achieved = r.bytes as f64 * r.decode_tok_s / 1e9;
        println!(
            "{:<6} {:<14} {:>6.3} {:>9.3} {:>9.2} {:>9.1} {:>9.1} {:>8.2} {:>9.2} {:>6.0}% {:>7.2}x {:>6.2}x {:>8.2}",
            r.dtype,
            r.sparsity,
            r.kept_fraction,
            r.ffn_bytes,
            r.bytes as f64 / 1e6,
            r.prefill_tok_s,
            r.decode_tok_s,
            achieved,
            roofline,
            100.0 * achieved / roofline,
            speedup,
            ideal,
            speedup / ideal
        );
        json_lines.push(serde_json::json!({
            "bench": "decode", "model": name, "layers_override": args.layers, "dtype": r.dtype,
            "sparsity": r.sparsity, "threads": threads, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "ffn_kept_fraction": r.kept_fraction, "ffn_bytes": r.ffn_bytes,
            "weight_bytes_per_token": r.bytes, "prefill_tok_s": r.prefill_tok_s, "decode_tok_s": r.decode_tok_s,
            "achieved_gb_s": achieved, "roofline_gb_s": roofline, "roofline_before_gb_s": r.roofline.0,
            "roofline_after_gb_s": r.roofline.1, "fraction_of_roofline": achieved / roofline,
            "machine": m, "device": be.device(), "roofline_kind": roof.kind(), "speedup_vs_dense": speedup,
            "ideal_speedup": ideal, "fraction_of_ideal": speedup / ideal,
        }));
    }
    println!("\nprefill of {} tokens: plain vs collecting the neuron statistics", args.prompt_tokens);
    for (dtype, plain, observed, median, pairs) in &overheads {
        println!(
            "{dtype:<6} best plain {:.1} ms, best observing {:.1} ms; median overhead over {pairs} pairs {:+.1}%",
            plain * 1e3,
            observed * 1e3,
            (median - 1.0) * 100.0
        );
        json_lines.push(serde_json::json!({
            "bench": "prefill_stats_overhead", "model": name, "dtype": dtype, "prompt_tokens": args.prompt_tokens,
            "best_plain_s": plain, "best_observing_s": observed, "median_overhead": median - 1.0, "pairs": pairs,
        }));
    }
    let text: String = json_lines.iter().map(|j| format!("{j}\n")).collect();
    print!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, text).unwrap_or_else(|e| fail(format!("{}: {e}", path.display())));
    }
}
