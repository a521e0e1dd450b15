#!/usr/bin/env python3
"""Plots of the sparse-decoding quality evaluation (docs/SPARSITY.md).

Input: JSON files written by ``tda-engine eval ... --json FILE`` (one per model). Output:
  docs/sparsity_quality.png   perplexity against the fraction of FFN weights read, a line per method
  docs/sparsity_layers.png    per-layer kept fractions (TDA at each density, and the budget modes)

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
STYLE = {"tda": ("tab:blue", "o"), "griffin": ("tab:orange", "s"), "tda-budget": ("tab:green", "*")}


def title(res: dict, path: str) -> str:
    name = res.get("model_path", os.path.basename(path))
    return {"default": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma 3 270M"}.get(name, name)


def main(paths: list[str]) -> None:
    results = [(p, json.load(open(p))) for p in paths]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (path, res) in zip(axes[0], results, strict=True):
        rows = res["rows"]
        dense = next(r for r in rows if r["method"] == "dense")
        for method in ("tda", "griffin"):
            pts = sorted((r["density"], r["ppl"]) for r in rows if r["method"] == method)
            pts.append((1.0, dense["ppl"]))
            c, m = STYLE[method]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=m, color=c, label=method.upper())
        budget = [r for r in rows if r["method"] == "tda-budget"]
        if budget:
            c, m = STYLE["tda-budget"]
            ax.scatter(
                [r["density"] for r in budget],
                [r["ppl"] for r in budget],
                marker=m,
                s=140,
                color=c,
                label="TDA quality budget",
                zorder=3,
            )
            for r in budget:
                ax.annotate(
                    r["name"].split(":")[1],
                    (r["density"], r["ppl"]),
                    textcoords="offset points",
                    xytext=(-24, 8),
                    fontsize=8,
                )
        ax.scatter([1.0], [dense["ppl"]], marker="D", color="black", label="dense", zorder=4)
        ax.set_yscale("log")
        ax.set_xlabel("fraction of FFN weights read per decoded token")
        ax.set_ylabel("perplexity (held-out lee_background.cor)")
        ax.set_title(f"{title(res, path)}: {res['windows']} windows, {res['scored_tokens']} tokens scored")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "sparsity_quality.png"), dpi=110)

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (path, res) in zip(axes[0], results, strict=True):
        for r in res["rows"]:
            if r["method"] == "tda" or r["method"] == "tda-budget":
                style = "-" if r["method"] == "tda" else "--"
                ax.plot(range(len(r["layer_kept"])), r["layer_kept"], style, marker=".", label=r["name"])
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of FFN neurons kept")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{title(res, path)}: kept per layer (mean over windows)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "sparsity_layers.png"), dpi=110)
    print("wrote docs/sparsity_quality.png and docs/sparsity_layers.png")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
