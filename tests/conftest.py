"""Shared helpers of the tda-engine test suite.

The fixtures under tests/fixtures/ are tiny random-weight models with reference outputs computed by
Hugging Face transformers (see tests/fixtures/manifest.json and each model's reference.npz /
reference.json).  Engines are cached per (model, dtype, config layout) for the whole session so that
each model is loaded once.
"""

from __future__ import annotations

import json
import shutil
import threading
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
MODELS_DIR = FIXTURES / "models"
MANIFEST = FIXTURES / "manifest.json"

# The models the fixture generator is expected to produce; the manifest is the authority when present.
EXPECTED_MODELS = ["llama2", "llama3", "llama_linear", "mistral", "gemma", "gemma2", "gemma3", "qwen2", "qwen3"]
# Models whose attention uses a sliding window on (some) layers.
SLIDING_MODELS = ["mistral", "gemma2", "gemma3"]


def _manifest_models() -> list[str]:
    if not MANIFEST.exists():
        return list(EXPECTED_MODELS)
    data = json.loads(MANIFEST.read_text())
    models = data.get("models", data) if isinstance(data, dict) else data
    names: list[str] = []
    if isinstance(models, dict):
        names = list(models.keys())
    else:
        for m in models:
            names.append(m if isinstance(m, str) else m["name"])
    return names


MODELS: list[str] = _manifest_models()


def model_dir(name: str) -> Path:
    d = MODELS_DIR / name
    if not (d / "config.json").exists():
        pytest.fail(f"fixture model {name!r} is missing: {d} (regenerate tests/fixtures)")
    return d


@cache
def _load_ref(name: str):
    d = model_dir(name)
    with np.load(d / "reference.npz") as z:
        npz = {k: z[k] for k in z.files}
    js = json.loads((d / "reference.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    return npz, js, cfg


class Ref:
    """The reference data of one fixture model."""

    def __init__(self, name: str):
        npz, js, cfg = _load_ref(name)
        self.name = name
        self.dir = model_dir(name)
        self.npz = npz
        self.json = js
        self.config = cfg
        self.prompt_ids: list[int] = [int(x) for x in npz["prompt_ids"].reshape(-1)]
        self.logits: np.ndarray = npz["logits"].reshape(len(self.prompt_ids), -1).astype(np.float32)
        self.greedy: list[int] = [int(x) for x in npz["greedy"].reshape(-1)]
        self.vocab_size: int = self.logits.shape[-1]

    def __getitem__(self, key: str) -> Any:
        return self.json[key]

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.json.get("eos_token_ids")
        if e is None:
            return []
        return [int(e)] if isinstance(e, int) else [int(x) for x in e]

    def text_config(self) -> dict[str, Any]:
        """The decoder's part of config.json (gemma3 nests it under text_config)."""
        c = self.config
        return c["text_config"] if "hidden_size" not in c and "text_config" in c else c

    @property
    def max_position_embeddings(self) -> int:
        return int(self.text_config()["max_position_embeddings"])


@cache
def ref_for(name: str) -> Ref:
    return Ref(name)


_ENGINES: dict[Any, Any] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(name: str, dtype: str = "float32", layout: str = "classic", tmp_root: Path = None):
    """A session-wide cached Engine for a fixture model.

    layout "classic" loads the fixture dir itself; "v5" loads a copy whose config.json is the
    transformers-5 layout (config.v5.json).
    """
    from tda_engine import Engine

    key = (name, dtype, layout)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            if layout == "classic":
                path = model_dir(name)
            elif layout == "v5":
                assert tmp_root is not None
                path = v5_copy(name, tmp_root)
            else:
                raise AssertionError(layout)
            _ENGINES[key] = Engine.from_pretrained(str(path), device="cpu", dtype=dtype)
        return _ENGINES[key]


def copy_model(name: str, dest: Path) -> Path:
    """A private copy of a fixture model dir (to corrupt or modify)."""
    src = model_dir(name)
    shutil.copytree(src, dest)
    return dest


def v5_copy(name: str, root: Path) -> Path:
    dest = root / f"{name}-v5"
    if not dest.exists():
        copy_model(name, dest)
        v5 = dest / "config.v5.json"
        if not v5.exists():
            pytest.fail(f"{name}: fixture has no config.v5.json")
        shutil.copyfile(v5, dest / "config.json")
    return dest


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tda")


@pytest.fixture(scope="session")
def engine_for(session_tmp):
    """engine_for(name, dtype="float32", layout="classic") -> cached Engine."""

    def _get(name: str, dtype: str = "float32", layout: str = "classic"):
        return get_engine(name, dtype, layout, session_tmp)

    return _get


@pytest.fixture(params=MODELS)
def model(request) -> str:
    return request.param


@pytest.fixture
def ref(model) -> Ref:
    return ref_for(model)


@pytest.fixture
def engine(model, engine_for):
    return engine_for(model)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def greedy(engine, prompt, n: int = 24, **kw):
    """Greedy generation that never stops early (the reference continuation ignores EOS)."""
    return engine.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


def assert_engine_ok(engine, ref: Ref) -> None:
    """The engine still reproduces the reference greedy continuation."""
    out = greedy(engine, ref.prompt_ids, len(ref.greedy))
    assert out.token_ids == ref.greedy, f"{ref.name}: engine no longer reproduces the reference greedy tokens"
