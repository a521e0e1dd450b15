"""Sparse decode on quantized weights, the third option for the down projection: keep `Wd` as
stored (block-quantized along the neurons) and skip whole blocks of neurons. Measures what that
costs (BENCHMARKS.md, issue 13), in two steps that run in different environments:

    .venv/bin/python scripts/wd_blocks.py masks MODEL OUT.npz   # the engine: windows and masks
    /tmp/tda-peers-venv/bin/python scripts/wd_blocks.py ppl HF_DIR OUT.npz   # HF transformers

`masks` takes 8 windows of 512 tokens of lee_background.cor (BOS + 511 tokens), the engine's TDA
0.5 mask of each from its first 256 tokens (`select_neurons`), how many blocks of 32 and of 256
neurons that mask touches, and a block-granular mask with the same neuron count per layer: the
blocks of 32 (or 256) with the highest summed TDA score (`neuron_scores`). `ppl` runs HF's float
model over each window with the FFN activations of positions 256.. zeroed outside a mask (the
prefix dense, as the engine's `score()` does) and prints the perplexity of the last 256 tokens for
dense, the neuron mask and each block mask.
"""

from __future__ import annotations

import sys

import numpy as np

WINDOWS, LEN, PREFIX = 8, 512, 256


def masks(model: str, out: str, text_path: str = "/tmp/gs/lee_background.cor") -> None:
    from tda_engine import Engine

    eng = Engine.from_pretrained(model)
    n = eng.model_info["intermediate_size"]
    ids = eng.tokenize(open(text_path).read(), add_special_tokens=False)
    bos = eng.bos_prefix()
    wins, neuron, blocks = [], [], {32: [], 256: []}
    touched = {32: [], 256: []}
    for w in range(WINDOWS):
        win = bos + ids[w * (LEN - len(bos)) : (w + 1) * (LEN - len(bos))]
        wins.append(win)
        kept = [np.asarray(k) for k in eng.select_neurons(win[:PREFIX], "tda:0.5")]
        scores = [np.asarray(s) for s in eng.neuron_scores(win[:PREFIX])["tda"]]
        m = np.zeros((len(kept), n), np.float32)
        for li, k in enumerate(kept):
            m[li, k] = 1
        neuron.append(m)
        for b in blocks:
            mb = np.zeros_like(m)
            for li, (k, s) in enumerate(zip(kept, scores, strict=True)):
                touched[b].append(len(np.unique(k // b)) / (n // b))
                per_block = s[: n // b * b].reshape(-1, b).sum(1)
                keep_blocks = np.argsort(-per_block)[: int(round(len(k) / b))]
                for kb in keep_blocks:
                    mb[li, kb * b : (kb + 1) * b] = 1
            blocks[b].append(mb)
    np.savez(
        out,
        windows=np.asarray(wins),
        neuron=np.asarray(neuron),
        block32=np.asarray(blocks[32]),
        block256=np.asarray(blocks[256]),
    )
    dens = np.mean([m.mean() for m in neuron])
    print(
        f"{model}: TDA 0.5 keeps {dens:.3f} of the neurons; blocks it touches: "
        + ", ".join(f"{np.mean(v):.4f} of the {b}-neuron blocks" for b, v in touched.items())
    )


def ppl(hf_dir: str, path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    data = np.load(path)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    layers = model.model.layers
    current: dict = {"mask": None}

    def hook(li):
        def pre(_mod, args):
            if current["mask"] is None:
                return None
            a = args[0].clone()
            a[:, PREFIX:, :] *= torch.from_numpy(current["mask"][li])
            return (a,)

        return pre

    for li, layer in enumerate(layers):
        layer.mlp.down_proj.register_forward_pre_hook(hook(li))
    for name in ("dense", "neuron", "block32", "block256"):
        nll, count = 0.0, 0
        for w in range(len(data["windows"])):
            current["mask"] = None if name == "dense" else data[name][w]
            ids = torch.tensor(data["windows"][w][None, :], dtype=torch.long)
            with torch.no_grad():
                logits = model(ids).logits[0].double()
            lp = torch.log_softmax(logits[PREFIX - 1 : -1], -1)
            tgt = ids[0, PREFIX:]
            nll -= lp[torch.arange(len(tgt)), tgt].sum().item()
            count += len(tgt)
        kept = 1.0 if name == "dense" else float(np.mean(data[name]))
        print(f"{name:9s} kept {kept:.3f}  ppl {np.exp(nll / count):.3f}")


if __name__ == "__main__":
    {"masks": masks, "ppl": ppl}[sys.argv[1]](*sys.argv[2:])
