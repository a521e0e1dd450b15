"""Quality evaluation of sparse decoding: perplexity on held-out text, per method and density.

Protocol (the one the README and docs/SPARSITY.md report): the text is split into a calibration
part (its first ``calibration_fraction``, cut at a line break) and an evaluation part. The
evaluation part is cut into windows of ``window`` tokens, each starting with BOS like a prompt;
the first ``prefix`` tokens of a window run densely and choose the mask, the rest are scored
(:meth:`Engine.score_many`: the first scored token comes from the dense prefix, the others from
the sparse FFN). Perplexity is ``exp(mean negative log-likelihood)`` over all scored tokens.

Methods: dense; TDA at each density (thresholds calibrated on the calibration part); GRIFFIN at
each density; CATS at each keep fraction and the hybrid at each (density, keep) pair (gate
thresholds calibrated on the calibration part); the per-layer budget search for each perplexity
budget (``max_ppl_increase``) and each byte budget (``ffn_bytes``). For each, the delivered
density (FFN neurons in the prompt's superset, over windows and layers), the FFN bytes a decoded
token reads (as the kernels count them, per-token gate included) and the fraction of all decode
weight bytes read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from .sparsity import Sparsity

DEFAULT_DENSITIES = (0.9, 0.7, 0.5, 0.3)
DEFAULT_BUDGETS = (0.01, 0.03)
DEFAULT_KEEPS = (0.8, 0.7, 0.5, 0.4)
DEFAULT_HYBRIDS = ((0.9, 0.5), (0.8, 0.5))
DEFAULT_BYTE_BUDGETS = (0.85, 0.6)
METHODS = ("tda", "griffin", "cats", "hybrid")
LENGTHS = (16, 32, 64, 128, 256, 512, 1024)


def split_text(text: str, fraction: float) -> tuple[str, str]:
    """(calibration part, evaluation part), cut at the first line break after ``fraction``."""
    cut = int(len(text) * fraction)
    nl = text.find("\n", cut)
    cut = nl + 1 if nl >= 0 else cut
    return text[:cut], text[cut:]


def windows(engine, text: str, length: int, count: int) -> list[list[int]]:
    bos = engine.bos_prefix()
    ids = engine.tokenize(text, add_special_tokens=False)
    body = length - len(bos)
    out = [bos + ids[i : i + body] for i in range(0, len(ids) - body + 1, body)]
    return out[:count]


def evaluate(
    engine,
    text: str,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    methods: Sequence[str] = METHODS,
    keeps: Sequence[float] = DEFAULT_KEEPS,
    hybrids: Sequence[tuple[float, float]] = DEFAULT_HYBRIDS,
    byte_budgets: Sequence[float] = (),
    window: int = 512,
    prefix: int = 256,
    max_windows: int = 32,
    calibration_fraction: float = 0.2,
    calibration_text: str | None = None,
    log=print,
    progress=None,
) -> dict:
    """Runs the protocol above; returns a JSON-able dict (see :func:`format_table`).

    ``progress``, if given, is called as ``progress(phase, done, total)``: each calibration (phase
    ``"calibrate densities"``, ``"calibrate gates"``, ``"calibrate budget B"``, ``"calibrate bytes
    B"``) with its windows and search steps, then
    ``"score"`` with the windows scored. Ctrl-C (``KeyboardInterrupt``) or an exception from
    ``progress`` stops the evaluation."""

    def phase(name: str):
        return None if progress is None else (lambda done, total: progress(name, done, total))

    if not 0 < prefix < window:
        raise ValueError(f"prefix must be in [1, window - 1], got prefix={prefix}, window={window}")
    if calibration_text is None:
        calibration_text, eval_text = split_text(text, calibration_fraction)
        calib_source = f"first {calibration_fraction:.0%} of the text"
    else:
        eval_text = text
        calib_source = "separate text" if calibration_text else "default corpus"
    wins = windows(engine, eval_text, window, max_windows)
    if not wins:
        raise ValueError(f"the evaluation text is too short for one window of {window} tokens")
    info = engine.model_info
    n, layers = info["intermediate_size"], info["num_layers"]
    total, ffn = info["decode_weight_bytes"], info["ffn_weight_bytes"]
    calib_texts = [calibration_text] if calibration_text else None

    specs: list[tuple[str, str, float | None, Sparsity]] = [("dense", "dense", 1.0, Sparsity.dense())]
    t0 = time.perf_counter()
    if "tda" in methods and densities:
        ths = engine.calibrate_densities(calib_texts, list(densities), progress=phase("calibrate densities"))
        specs += [(f"tda:{d:g}", "tda", d, Sparsity.tda(thresholds=t)) for d, t in zip(densities, ths, strict=False)]
    if "griffin" in methods:
        specs += [(f"griffin:{d:g}", "griffin", d, Sparsity.griffin(d)) for d in densities]
    gated = [("cats", 1.0, k) for k in keeps if "cats" in methods]
    gated += [("hybrid", d, k) for d, k in hybrids if "hybrid" in methods]
    if gated:
        ths = engine.calibrate_gates(calib_texts, [(d, k) for _, d, k in gated], progress=phase("calibrate gates"))
        for (method, d, k), th in zip(gated, ths, strict=True):
            name = f"cats:{k:g}" if method == "cats" else f"hybrid:{d:g},{k:g}"
            specs.append((name, method, None if method == "cats" else d, Sparsity.tda(thresholds=th)))
    budget_reports = {}
    for b in budgets:
        th = engine.calibrate(calib_texts, max_ppl_increase=b, progress=phase(f"calibrate budget {b:g}"))
        budget_reports[f"budget:{b:g}"] = th.report
        specs.append((f"budget:{b:g}", "budget", None, Sparsity.tda(thresholds=th)))
    for b in byte_budgets:
        th = engine.calibrate(calib_texts, ffn_bytes=b, progress=phase(f"calibrate bytes {b:g}"))
        budget_reports[f"bytes:{b:g}"] = th.report
        specs.append((f"bytes:{b:g}", "bytes", None, Sparsity.tda(thresholds=th)))
    calib_s = time.perf_counter() - t0
    log(f"calibrated {len(specs) - 1} specs in {calib_s:.1f} s; scoring {len(wins)} windows of {window} tokens")

    nll = np.zeros(len(specs))
    count = 0
    kept = np.zeros((len(specs), layers))
    ffn_bytes = np.zeros(len(specs))
    t0 = time.perf_counter()
    scoring = phase("score")
    for wi, ids in enumerate(wins):
        if scoring:
            scoring(wi, len(wins))
        res = engine.score_many(ids, prefix, [s for *_, s in specs], return_ffn_bytes=True)
        for si, (lp, active, nbytes) in enumerate(res):
            nll[si] -= float(np.sum(lp, dtype=np.float64))
            kept[si] += np.asarray(active, dtype=np.float64) / n
            ffn_bytes[si] += nbytes
        count += len(ids) - prefix
        log(f"  window {wi + 1}/{len(wins)}: dense ppl so far {math.exp(nll[0] / count):.3f}")
    if scoring:
        scoring(len(wins), len(wins))
    score_s = time.perf_counter() - t0
    kept /= len(wins)
    ffn_bytes /= len(wins)

    rows = []
    ppl_dense = math.exp(nll[0] / count)
    for si, (name, method, target, _) in enumerate(specs):
        ppl = math.exp(nll[si] / count)
        density = float(kept[si].mean())
        rows.append(
            {
                "name": name,
                "method": method,
                "target_density": target,
                "density": density,
                "ffn_bytes": float(ffn_bytes[si]),
                "weight_fraction": (total - (1 - float(ffn_bytes[si])) * ffn) / total,
                "ppl": ppl,
                "ppl_ratio": ppl / ppl_dense,
                "layer_kept": kept[si].tolist(),
                "budget": budget_reports.get(name),
            }
        )
    return {
        "model": info,
        "windows": len(wins),
        "window": window,
        "prefix": prefix,
        "scored_tokens": count,
        "calibration": calib_source,
        "calibration_s": calib_s,
        "scoring_s": score_s,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    lines = [
        f"{result['windows']} windows of {result['window']} tokens ({result['prefix']} dense, "
        f"{result['scored_tokens']} scored in all); calibration: {result['calibration']}",
        f"{'method':<18} {'target':>7} {'density':>8} {'FFN bytes':>10} {'weights read':>13} {'perplexity':>11} "
        f"{'vs dense':>9}",
    ]
    for r in result["rows"]:
        target = "-" if r["target_density"] is None else f"{r['target_density']:.2f}"
        lines.append(
            f"{r['name']:<18} {target:>7} {r['density']:>8.3f} {r['ffn_bytes']:>10.3f} {r['weight_fraction']:>13.3f} "
            f"{r['ppl']:>11.3f} {r['ppl_ratio']:>8.3f}x"
        )
    return "\n".join(lines)


def length_check(
    engine,
    text: str,
    density: float = 0.5,
    lengths: Sequence[int] = LENGTHS,
    prompts: int = 16,
    calibration_fraction: float = 0.2,
    plain_length: int = 256,
) -> dict:
    """Delivered TDA density against prompt length: length-aware calibration (the default) vs plain
    quantile calibration on ``plain_length``-token windows. Prompts are the first L tokens of
    held-out windows of ``max(lengths)`` tokens."""
    calib, held = split_text(text, calibration_fraction)
    aware = engine.calibrate(calib, density=density)
    plain = engine.calibrate(calib, density=density, lengths=[plain_length])
    top = max(lengths)
    wins = windows(engine, held, top, prompts)
    if not wins:
        raise ValueError(f"the held-out text is too short for a prompt of {top} tokens")
    out = {"density": density, "prompts": len(wins), "plain_length": plain_length, "rows": []}
    for L in lengths:
        got = {"aware": [], "plain": []}
        for ids in wins:
            scores = engine.neuron_scores(ids[:L])["tda"]
            for key, th in (("aware", aware), ("plain", plain)):
                taus = th.at(L)
                got[key].append(np.mean([np.mean(s >= t) for s, t in zip(scores, taus, strict=False)]))
        out["rows"].append({"length": L, "aware": float(np.mean(got["aware"])), "plain": float(np.mean(got["plain"]))})
    return out


def format_length_table(res: dict) -> str:
    lines = [
        f"delivered TDA density, target {res['density']}, mean over {res['prompts']} held-out prompts",
        f"{'prompt tokens':>13} {'length-aware':>13} {'plain (' + str(res['plain_length']) + ')':>12}",
    ]
    for r in res["rows"]:
        lines.append(f"{r['length']:>13} {r['aware']:>13.3f} {r['plain']:>12.3f}")
    return "\n".join(lines)
