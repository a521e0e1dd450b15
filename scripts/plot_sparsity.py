#!/usr/bin/env python3
"""Plots of the sparse-decoding quality evaluation (docs/SPARSITY.md).

Input: JSON files written by ``tda-engine eval ... --json FILE`` (one per model). Output:
  docs/sparsity_quality.png   perplexity against the FFN bytes read per decoded token: a line per
                              method (TDA, GRIFFIN, CATS, hybrid), the per-layer budget searches as points
  docs/sparsity_layers.png    per layer: TDA's kept fraction, and the budget searches' set x keep

    pip install matplotlib     # not a dependency of tda-engine
    python scripts/plot_sparsity.py results/smollm2.json results/gemma3.json
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
LINES = {
    "tda": ("TDA (prompt set)", "tab:blue", "o"),
    "griffin": ("GRIFFIN (prompt set)", "tab:orange", "s"),
    "cats": ("CATS (per-token gate)", "tab:red", "^"),
    "hybrid": ("hybrid (gate inside the prompt set)", "tab:purple", "v"),
}
POINTS = {
    "budget": ("per-layer search, perplexity budget", "tab:green", "*"),
    "tda-budget": ("per-layer search, perplexity budget", "tab:green", "*"),
    "bytes": ("per-layer search, byte budget", "tab:brown", "X"),
}


def title(res: dict, path: str) -> str:
    name = res.get("model_path", os.path.basename(path))
    return {"default": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma 3 270M"}.get(name, name)


def nbytes(r: dict) -> float:
    """FFN bytes read per decoded token (older files: the kept density)."""
    return r.get("ffn_bytes", r["density"])


def main(paths: list[str]) -> None:
    results = [(p, json.load(open(p))) for p in paths]
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    for ax, (path, res) in zip(axes[0], results, strict=True):
        rows = res["rows"]
        for method, (label, c, m) in LINES.items():
            pts = sorted((nbytes(r), r["ppl_ratio"]) for r in rows if r["method"] == method)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=m, color=c, label=label)
        for method, (label, c, m) in POINTS.items():
            pts = [r for r in rows if r["method"] == method]
            if not pts:
                continue
            ax.scatter(
                [nbytes(r) for r in pts], [r["ppl_ratio"] for r in pts], marker=m, s=150, color=c, label=label, zorder=3
            )
            for r in pts:
                ax.annotate(
                    r["name"], (nbytes(r), r["ppl_ratio"]), textcoords="offset points", xytext=(6, 6), fontsize=8
                )
        ax.scatter([1.0], [1.0], marker="D", color="black", label="dense", zorder=4)
        ax.set_yscale("log")
        ax.set_xlabel("FFN weight bytes read per decoded token (fraction of dense, as counted)")
        ax.set_ylabel("perplexity / dense (held-out lee_background.cor)")
        ax.set_title(f"{title(res, path)}: {res['windows']} windows, {res['scored_tokens']} tokens scored")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "sparsity_quality.png"), dpi=110)

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    for ax, (path, res) in zip(axes[0], results, strict=True):
        for r in res["rows"]:
            if r["method"] == "tda":
                ax.plot(range(len(r["layer_kept"])), r["layer_kept"], "-", marker=".", label=f"{r['name']} (set)")
            rep = r.get("budget") or {}
            if "layer_keeps" in rep:
                # per layer, the fraction of neurons whose up and down rows a token reads
                frac = [d * k for d, k in zip(rep["layer_densities"], rep["layer_keeps"], strict=True)]
                ax.plot(range(len(frac)), frac, "--", marker="x", label=f"{r['name']} (set x keep)")
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of FFN neurons computed")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{title(res, path)}: per layer (mean over windows)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "sparsity_layers.png"), dpi=110)
    print("wrote docs/sparsity_quality.png and docs/sparsity_layers.png")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
