#!/usr/bin/env python3
"""Per-layer sensitivity to TDA sparsity: held-out perplexity when only one layer is sparse.

    python scripts/layer_sensitivity.py MODEL TEXT [--density 0.5] [--windows 4]

The text is split as by ``tda-engine eval`` (first 20% calibrates); each window of 512 tokens has
256 dense tokens and 256 scored. Prints the dense perplexity and, per layer, the ratio of the
perplexity with only that layer at ``density`` to dense. All specs share each window's dense prefix.
"""

from __future__ import annotations

import argparse

import numpy as np
from tda_engine import Engine, Sparsity, Thresholds
from tda_engine.evaluate import split_text, windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--windows", type=int, default=4)
    a = ap.parse_args()
    eng = Engine.from_pretrained(a.model)
    calib, held = split_text(open(a.text, encoding="utf-8").read(), 0.2)
    th = eng.calibrate_densities([calib], [a.density])[0]
    L = th.num_layers
    specs = [Sparsity.dense()]
    for layer in range(L):
        vals = [[row[k] if k == layer else 0.0 for k in range(L)] for row in th.values]
        specs.append(Sparsity.tda(thresholds=Thresholds(vals, th.prompt_lengths)))
    nll, count = np.zeros(len(specs)), 0
    for ids in windows(eng, held, 512, a.windows):
        for i, (lp, _) in enumerate(eng.score_many(ids, 256, specs)):
            nll[i] -= lp.astype(np.float64).sum()
        count += len(ids) - 256
    ppl = np.exp(nll / count)
    print(f"dense perplexity {ppl[0]:.3f} ({count} tokens); only one layer at density {a.density}:")
    print("layer  ppl / dense")
    for layer in range(L):
        print(f"{layer:>5}  {ppl[layer + 1] / ppl[0]:.4f}")


if __name__ == "__main__":
    main()
