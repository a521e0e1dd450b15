#!/usr/bin/env python3
"""Plot of decode speed against the FFN bytes read, per dtype, with the roofline (BENCHMARKS.md).

Input: the output of the ``decode`` benchmark binary (its JSON lines; other lines are skipped),
one file per model. Output: ``docs/decode_density.png``, a panel per model: decode tok/s against
the FFN weight bytes a decoded token reads, as the kernels counted them (dense = 1), a solid line
per dtype through the TDA points (GRIFFIN squares, CATS and hybrid triangles, all measured with the
real kernels), and dashed, the roofline: the streaming read bandwidth measured around each
configuration divided by the weight bytes that configuration reads per token.

    pip install matplotlib     # not a dependency of tda-engine
    cargo run --release -p tda-bench --bin decode -- --preset llama-2-7b --layers 4 \\
        --dtype f32,bf16 --sparsity dense,tda:0.7,tda:0.5,cats:0.5,hybrid:0.9,0.5 > llama.txt
    python scripts/plot_decode.py llama.txt smollm2.txt [--out docs/decode_density.png]
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


def ffn_bytes(r: dict) -> float:
    """FFN bytes read per decoded token (older files: the kept fraction)."""
    return r.get("ffn_bytes", r["ffn_kept_fraction"])


MARKERS = {"tda": "o", "dense": "o", "griffin": "s", "cats": "^", "hybrid": "v"}


def panel(ax, data: list[dict]) -> None:
    for dtype in dict.fromkeys(r["dtype"] for r in data):
        mine = [r for r in data if r["dtype"] == dtype]
        c = COLORS.get(dtype, "black")
        line = sorted((r for r in mine if r["sparsity"].split(":")[0] in ("tda", "dense")), key=ffn_bytes)
        x = [ffn_bytes(r) for r in line]
        ax.plot(x, [r["decode_tok_s"] for r in line], "o-", color=c, label=f"{dtype} (TDA, dense at 1)")
        roof = [r["roofline_gb_s"] * 1e9 / r["weight_bytes_per_token"] for r in line]
        ax.plot(x, roof, "--", color=c, alpha=0.7, label=f"{dtype} roofline")
        for method in ("griffin", "cats", "hybrid"):
            pts = [r for r in mine if r["sparsity"].startswith(method)]
            if pts:
                ax.plot(
                    [ffn_bytes(r) for r in pts],
                    [r["decode_tok_s"] for r in pts],
                    MARKERS[method],
                    color=c,
                    mfc="none",
                    ms=8,
                    label=f"{dtype} {method}",
                )
    m = data[0]
    layers = f", {m['layers_override']} layers" if m.get("layers_override") else ""
    ax.set_title(f"{m['model']}{layers}, {m['threads']} threads")
    ax.set_xlabel("FFN weight bytes read per decoded token (fraction of dense)")
    ax.set_ylabel("decode tok/s")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def main(args: list[str]) -> None:
    out = OUT
    if "--out" in args:
        i = args.index("--out")
        if i + 1 >= len(args):
            sys.exit("--out needs a path")
        out = args[i + 1]
        args = args[:i] + args[i + 2 :]
    paths = args
    if not paths:
        sys.exit(__doc__)
    fig, axes = plt.subplots(1, len(paths), figsize=(5.5 * len(paths), 4.2), squeeze=False)
    for ax, p in zip(axes[0], paths, strict=True):
        panel(ax, rows(p))
    fig.suptitle("Decode speed against FFN bytes read (squares: GRIFFIN, triangles: CATS / hybrid)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
