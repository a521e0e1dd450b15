#!/usr/bin/env python3
"""Decode speed of Hugging Face transformers on the GPU, in the shape of a decode-bench preset, as
the peer of ``decode --device cuda`` (scripts/gpu_check.sh runs both on the same GPU).

    python3 scripts/hf_gpu_decode.py --preset llama-2-7b --json out.jsonl            # eager, static cache
    python3 scripts/hf_gpu_decode.py --preset llama-2-7b --compile --json out.jsonl  # torch.compile'd
    python3 scripts/hf_gpu_decode.py --preset llama-2-7b --layers 2 --new-tokens 8 --repeat 1  # a quick check

Model: ``LlamaForCausalLM`` built from a ``LlamaConfig`` with the preset's shape (llama-2-7b: hidden
4096, intermediate 11008, 32 layers, 32 heads, 32 KV heads, vocab 32000; llama-3-8b: intermediate
14336, 8 KV heads, vocab 128256), made directly on the GPU in the chosen dtype (default bf16), its
weights then redrawn uniformly at random (seeded; norm gains 1), so that no time is measured on
zeros or on uninitialised memory. No download, no tokenizer: the prompt is seeded random token ids.

Generation: batch 1, greedy (``do_sample=False``), ``cache_implementation="static"``, EOS disabled
(``eos_token_id=None``) so that every run makes exactly ``--new-tokens`` tokens (checked). On CUDA
with a static cache, transformers compiles the forward by itself; the default here turns that off
(``disable_compile=True``: eager PyTorch), ``--compile`` leaves it on (transformers' default
``CompileConfig``, a compiled decode step) and reports whether a compiled forward was made.

Timing: a streamer records a host clock at every ``put()``, which generate calls with the prompt,
then with each new token after copying it to the host (a device synchronisation). The first new
token comes from the prefill; decode tok/s is the other ``new_tokens - 1`` tokens over the time
from the first new token's ``put`` to the last one's, i.e. the single-token steps alone, as the
decode bench counts them (its first token also comes from the prefill). Prefill tok/s is the prompt
length over the time from the prompt's ``put`` to the first token's. One warm-up run (two with
``--compile``, which compiles and records CUDA graphs in them), then ``--repeat`` runs; the best of
each is kept. With ``--prefill-tokens N`` it also times generations of 2 tokens from an N-token
prompt (best of ``--repeat``) for prefill speed.

Output: a short report, and one JSON line per run appended to ``--json`` (bench "hf_decode").
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import platform
import sys
import time

PRESETS = {
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
}
ROPE_THETA = {"llama-2-7b": 10000.0, "llama-3-8b": 500000.0}
DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
SEED = 1234


class StepClock:
    """A streamer that only records when generate hands it something (prompt, then each token)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.counts: list[int] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        self.counts.append(int(value.numel()))

    def end(self) -> None:
        pass


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-2-7b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prefill-tokens", type=int, default=0, help="also time a prefill of N tokens (0: no)")
    ap.add_argument("--compile", action="store_true", help="let transformers compile the forward")
    ap.add_argument("--json", default=None, help="append the JSON lines to this file")
    a = ap.parse_args(argv)
    if a.prompt_tokens < 1 or a.new_tokens < 2 or a.repeat < 1:
        ap.error("--prompt-tokens and --repeat must be >= 1, --new-tokens >= 2")
    return a


def build_model(args, torch, transformers):
    shape = dict(PRESETS[args.preset])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    dtype = getattr(torch, DTYPES[args.dtype])
    # transformers 5 configs take rope_parameters; 4.x took rope_theta.
    theta = ROPE_THETA[args.preset]
    if dataclasses.is_dataclass(transformers.LlamaConfig):
        names = {f.name for f in dataclasses.fields(transformers.LlamaConfig)}
    else:
        names = set(inspect.signature(transformers.LlamaConfig.__init__).parameters)
    if "rope_parameters" in names:
        shape["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        shape["rope_theta"] = theta
    cfg = transformers.LlamaConfig(
        **shape,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    t0 = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(device="cuda", dtype=dtype).eval()
    # Redraw every weight on the device: uniform with variance 1/fan_in for matrices (as the decode
    # bench's random weights), 1 for norm gains. Whatever the constructor did (initialised or not),
    # nothing is timed on zeros.
    gen = torch.Generator(device="cuda").manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                bound = (3.0 / p.shape[-1]) ** 0.5
                p.uniform_(-bound, bound, generator=gen)
    torch.cuda.synchronize()
    gc = model.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = 0
    gc.bos_token_id = 1
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc, k):
            setattr(gc, k, None)
    return model, cfg, time.perf_counter() - t0


def weight_bytes_per_token(model) -> int:
    """Bytes of the weights one decode step reads: every parameter, but one row of the embedding."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    if not torch.cuda.is_available():
        print("hf_gpu_decode: torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(SEED)
    model, cfg, build_s = build_model(args, torch, transformers)
    bytes_tok = weight_bytes_per_token(model)
    vocab = cfg.vocab_size
    g = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(3, vocab, (1, args.prompt_tokens), generator=g).to("cuda")
    variant = "compiled-static" if args.compile else "eager-static"
    gen_kw = dict(do_sample=False, cache_implementation="static")
    if not args.compile:
        gen_kw["disable_compile"] = True

    def run(ids, n):
        clock = StepClock()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, streamer=clock, **gen_kw)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        made = out.shape[1] - ids.shape[1]
        if made != n:
            raise RuntimeError(f"generate made {made} tokens, not {n}")
        # put() #0 is the prompt, #1 the token from the prefill, #2.. one per decode step
        # (transformers 4.4x-5.x); without the prompt's put, the prefill counts from t0.
        times = clock.times
        if len(times) == n:
            times = [t0, *times]
        if len(times) != n + 1:
            raise RuntimeError(f"the streamer saw {len(clock.times)} puts, expected {n + 1}")
        prefill = times[1] - times[0]
        decode = times[-1] - times[1]
        return prefill, decode, total, out[0, ids.shape[1] :].tolist()

    print(
        f"hf_gpu_decode: {args.preset} ({cfg.num_hidden_layers} layers) {args.dtype} {variant} on "
        f"{torch.cuda.get_device_name(0)}; built in {build_s:.1f} s, {bytes_tok / 1e9:.2f} GB of weights per token",
        flush=True,
    )
    t0 = time.perf_counter()
    warm = []
    for _ in range(2 if args.compile else 1):
        warm.append(run(prompt, args.new_tokens))
    warmup_s = time.perf_counter() - t0
    compiled = getattr(model, "_compiled_call", None) is not None
    print(f"  warm-up {warmup_s:.1f} s ({len(warm)} runs), compiled forward: {compiled}", flush=True)
    runs = []
    for i in range(args.repeat):
        r = run(prompt, args.new_tokens)
        runs.append(r)
        print(
            f"  run {i}: prefill {args.prompt_tokens / r[0]:.1f} tok/s, decode "
            f"{(args.new_tokens - 1) / r[1]:.2f} tok/s, generate {r[2]:.2f} s",
            flush=True,
        )
    tokens_same = all(r[3] == runs[0][3] for r in runs)
    best_decode = min(r[1] for r in runs)
    best_prefill = min(r[0] for r in runs)
    decode_tok_s = (args.new_tokens - 1) / best_decode
    rec = {
        "bench": "hf_decode",
        "engine": "transformers",
        "variant": variant,
        "compiled": compiled,
        "preset": args.preset,
        "layers": cfg.num_hidden_layers,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeat": args.repeat,
        "decode_tok_s": decode_tok_s,
        "decode_tok_s_runs": [(args.new_tokens - 1) / r[1] for r in runs],
        "prefill_tok_s": args.prompt_tokens / best_prefill,
        "weight_bytes_per_token": bytes_tok,
        "achieved_gb_s": bytes_tok * decode_tok_s / 1e9,
        "tokens_identical_across_runs": tokens_same,
        "warmup_s": warmup_s,
        "build_s": build_s,
        "timing": "streamer put() times: decode = new_tokens-1 steps after the prefill's token; best of repeat",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "compile_config": repr(getattr(model.generation_config, "compile_config", None)) if args.compile else None,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    lines = [rec]
    if args.prefill_tokens:
        ids = torch.randint(3, vocab, (1, args.prefill_tokens), generator=g).to("cuda")
        run(ids, 2)  # warm-up at this length
        best = min(run(ids, 2)[0] for _ in range(args.repeat))
        pre = {k: rec[k] for k in ("bench", "engine", "variant", "compiled", "preset", "layers", "dtype", "device")}
        pre.update(
            kind="prefill",
            prompt_tokens=args.prefill_tokens,
            prefill_tok_s=args.prefill_tokens / best,
            timing="streamer put() times: prompt to first token; best of repeat",
        )
        lines.append(pre)
        print(f"  prefill of {args.prefill_tokens} tokens: {pre['prefill_tok_s']:.0f} tok/s", flush=True)
    print(
        f"{args.preset} {args.dtype} {variant}: decode {decode_tok_s:.2f} tok/s "
        f"({rec['achieved_gb_s']:.0f} GB/s of weights), prefill {rec['prefill_tok_s']:.0f} tok/s"
    )
    for line in lines:
        s = json.dumps(line)
        print(s)
        if args.json:
            with open(args.json, "a") as f:
                f.write(s + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
