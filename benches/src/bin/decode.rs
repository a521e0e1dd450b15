//! Decode benchmark on a real checkpoint directory: prefill and decode speed per dtype, measured
//! side by side in one run, with the weight bytes one decode step reads and the bandwidth achieved.
//!
//! cargo run --release -p tda-bench --bin decode -- --model DIR [--prompt-tokens 128]
//!     [--new-tokens 64] [--repeat 3] [--dtype f32,bf16,f16]

use std::path::PathBuf;
use tda_core::{Engine, GenerateOptions};

struct Args {
    model: PathBuf,
    prompt_tokens: usize,
    new_tokens: usize,
    repeat: usize,
    dtypes: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a =
        Args { model: PathBuf::new(), prompt_tokens: 128, new_tokens: 64, repeat: 3, dtypes: vec!["f32".into()] };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(val()?),
            "--prompt-tokens" => a.prompt_tokens = val()?.parse().map_err(|e| format!("--prompt-tokens: {e}"))?,
            "--new-tokens" => a.new_tokens = val()?.parse().map_err(|e| format!("--new-tokens: {e}"))?,
            "--repeat" => a.repeat = val()?.parse().map_err(|e| format!("--repeat: {e}"))?,
            "--dtype" => a.dtypes = val()?.split(',').map(str::to_string).collect(),
            "-h" | "--help" => {
                println!("usage: decode --model DIR [--prompt-tokens N] [--new-tokens N] [--repeat N] [--dtype f32,bf16,f16]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.model.as_os_str().is_empty() {
        return Err("--model DIR is required".into());
    }
    if a.prompt_tokens == 0 || a.new_tokens < 2 || a.repeat == 0 {
        return Err("--prompt-tokens and --repeat must be >= 1, --new-tokens >= 2".into());
    }
    Ok(a)
}

struct Row {
    dtype: String,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    bytes_per_token: usize,
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("decode: {e}");
        std::process::exit(2);
    });
    let mut rows = Vec::new();
    for dtype in &args.dtypes {
        let engine = Engine::from_pretrained(&args.model, "cpu", dtype).unwrap_or_else(|e| {
            eprintln!("decode: {e}");
            std::process::exit(2);
        });
        let vocab = engine.config().vocab_size as u32;
        // A deterministic prompt of in-vocabulary ids.
        let prompt: Vec<u32> = (0..args.prompt_tokens as u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let opts = GenerateOptions {
            max_new_tokens: Some(args.new_tokens as i64),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        };
        let (mut best_prefill, mut best_decode) = (0f64, 0f64);
        for _ in 0..args.repeat {
            let out = engine.generate(prompt.clone(), &opts).expect("generation failed");
            best_prefill = best_prefill.max(args.prompt_tokens as f64 / out.timings.prefill_s);
            best_decode = best_decode.max(out.timings.decode_tokens_per_s());
        }
        rows.push(Row {
            dtype: dtype.clone(),
            prefill_tok_s: best_prefill,
            decode_tok_s: best_decode,
            bytes_per_token: engine.model().decode_weight_bytes(),
        });
    }
    let base = rows[0].decode_tok_s;
    println!(
        "{:<6} {:>14} {:>13} {:>14} {:>10} {:>12}",
        "dtype", "prefill tok/s", "decode tok/s", "MB read/token", "GB/s", "vs first"
    );
    for r in &rows {
        println!(
            "{:<6} {:>14.1} {:>13.1} {:>14.2} {:>10.2} {:>11.2}x",
            r.dtype,
            r.prefill_tok_s,
            r.decode_tok_s,
            r.bytes_per_token as f64 / 1e6,
            r.bytes_per_token as f64 * r.decode_tok_s / 1e9,
            r.decode_tok_s / base
        );
    }
    for r in &rows {
        println!(
            "{}",
            serde_json::json!({
                "bench": "decode",
                "model": args.model.display().to_string(),
                "dtype": r.dtype,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                "prefill_tok_s": r.prefill_tok_s,
                "decode_tok_s": r.decode_tok_s,
                "weight_bytes_per_token": r.bytes_per_token,
                "achieved_gb_s": r.bytes_per_token as f64 * r.decode_tok_s / 1e9,
                "decode_ratio_vs_first": r.decode_tok_s / base,
            })
        );
    }
}
