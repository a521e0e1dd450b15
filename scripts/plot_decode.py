#!/usr/bin/env python3
"""Plot of decode speed against FFN density, per dtype, with the roofline (BENCHMARKS.md).

Input: the output of the ``decode`` benchmark binary (its JSON lines; other lines are skipped),
one file per model. Output: ``docs/decode_density.png``, a panel per model: decode tok/s against
the fraction of FFN neurons kept (dense = 1), a solid line per dtype through the TDA points
(GRIFFIN as separate squares), and dashed, the roofline: the streaming read bandwidth measured
around each configuration divided by the weight bytes that configuration reads per token.

    pip install matplotlib     # not a dependency of tda-engine
    cargo run --release -p tda-bench --bin decode -- --preset llama-2-7b --layers 4 \\
        --dtype f32,bf16 --sparsity dense,tda:0.7,tda:0.5,tda:0.3,griffin:0.5 > llama.txt
    python scripts/plot_decode.py llama.txt smollm2.txt
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "decode_density.png")
COLORS = {"f32": "tab:blue", "bf16": "tab:orange", "f16": "tab:green"}


def rows(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            if line.startswith("{"):
                r = json.loads(line)
                if r.get("bench") == "decode":
                    out.append(r)
    return out


def panel(ax, data: list[dict]) -> None:
    for dtype in dict.fromkeys(r["dtype"] for r in data):
        mine = [r for r in data if r["dtype"] == dtype]
        tda = sorted((r for r in mine if not r["sparsity"].startswith("griffin")), key=lambda r: r["ffn_kept_fraction"])
        c = COLORS.get(dtype, "black")
        x = [r["ffn_kept_fraction"] for r in tda]
        ax.plot(x, [r["decode_tok_s"] for r in tda], "o-", color=c, label=f"{dtype} (TDA, dense at 1)")
        roof = [r["roofline_gb_s"] * 1e9 / r["weight_bytes_per_token"] for r in tda]
        ax.plot(x, roof, "--", color=c, alpha=0.7, label=f"{dtype} roofline")
        g = [r for r in mine if r["sparsity"].startswith("griffin")]
        if g:
            ax.plot([r["ffn_kept_fraction"] for r in g], [r["decode_tok_s"] for r in g], "s", color=c, mfc="none")
    m = data[0]
    layers = f", {m['layers_override']} layers" if m.get("layers_override") else ""
    ax.set_title(f"{m['model']}{layers}, {m['threads']} threads")
    ax.set_xlabel("FFN neurons kept (fraction)")
    ax.set_ylabel("decode tok/s")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit(__doc__)
    fig, axes = plt.subplots(1, len(paths), figsize=(5.5 * len(paths), 4.2), squeeze=False)
    for ax, p in zip(axes[0], paths, strict=True):
        panel(ax, rows(p))
    fig.suptitle("Decode speed against FFN density (squares: GRIFFIN)", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1:])
