"""Sparse FFN decoding specs: :class:`Sparsity` (what decoding keeps) and :class:`Thresholds`
(calibrated TDA thresholds, saved as JSON).

Definitions, for layer ``l`` with gated FFN ``y = (act(x Wg^T) * (x Wu^T)) Wd^T`` and ``A`` the
``S x n`` intermediate activation ``act(x Wg^T) * (x Wu^T)`` of the ``S`` prompt tokens:

- TDA: score ``s_j = sqrt(mean_t A[t, j]^2)``; keep neuron ``j`` iff ``s_j >= tau_l``.
- GRIFFIN: ``Z[t, :] = A[t, :] / ||A[t, :]||``; score ``s_j = ||Z[:, j]||``; keep the top
  ``floor(density * n)`` neurons (at least 1).
- CATS (arXiv 2404.08763): per decoded token, the gate ``a_j = act(x Wg^T)_j`` of every neuron;
  up and down only where ``|a_j| >= t_l``, a per-layer threshold that a fraction ``keep`` of gate
  values passes on calibration text.
- Hybrid: the prompt chooses a superset as TDA at ``density``; each decoded token computes the gate
  over the superset only, then up and down for the neurons that pass the layer's gate threshold.
- Dense: keep all.

The prompt runs densely and gives the first generated token; every later token computes only the
kept neurons (the same set for the whole generation), and of those, with a gate, only the ones
whose gate passes for that token.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["Sparsity", "Thresholds"]

_FORMAT = "tda-engine-thresholds"


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    d = float(value)
    if not (0.0 < d <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return d


def _check_density(density: Any) -> float:
    return _check_fraction(density, "density")


def _check_keep(keep: Any) -> float:
    return _check_fraction(keep, "keep")


def _check_values(row: Sequence, what: str) -> list[float]:
    for li, v in enumerate(row):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"thresholds: layer {li} {what}is {type(v).__name__} {v!r}, expected a number")
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"thresholds: layer {li} has {what}{v}; thresholds must be finite and >= 0")
    return [float(v) for v in row]


class Thresholds:
    """Per-layer TDA thresholds, optionally depending on the prompt length.

    ``values[i][l]`` is layer ``l``'s threshold for prompts of ``prompt_lengths[i]`` tokens; a prompt
    of ``S`` tokens uses the interpolation in ``log S`` (clamped at both ends). With
    ``prompt_lengths`` empty, ``values`` has one row, used for every prompt. ``gate`` is empty (no
    per-token gate) or holds one gate threshold per layer: a decoded token computes up and down
    only for the kept neurons whose ``|act(gate)|`` reaches it (0: all of them). ``meta`` records
    how they were made; ``report`` holds the search's findings after a budget calibration.
    """

    def __init__(
        self, values, prompt_lengths: Sequence[int] = (), meta: dict | None = None, gate: Sequence | None = None
    ):
        rows = [list(values)] if values and not isinstance(values[0], (list, tuple)) else [list(r) for r in values]
        if not rows or not rows[0]:
            raise ValueError("thresholds: no values")
        width = len(rows[0])
        for r in rows:
            if len(r) != width:
                raise ValueError(f"thresholds: rows of different lengths ({len(r)} and {width})")
            _check_values(r, "")
        gate = [] if gate is None else list(gate.tolist() if hasattr(gate, "tolist") else gate)
        if gate and len(gate) != width:
            raise ValueError(f"thresholds: {len(gate)} gate thresholds for {width} layers (give one per layer)")
        self.gate: list[float] = _check_values(gate, "gate ")
        lengths = [int(x) for x in prompt_lengths]
        if lengths and len(lengths) != len(rows):
            raise ValueError(f"thresholds: {len(lengths)} prompt lengths but {len(rows)} rows of values")
        self.values: list[list[float]] = [[float(v) for v in r] for r in rows]
        self.prompt_lengths: list[int] = lengths
        self.meta: dict = dict(meta or {})
        self.report: dict | None = None

    @property
    def num_layers(self) -> int:
        return len(self.values[0])

    def at(self, prompt_len: int) -> list[float]:
        """The per-layer thresholds used for a prompt of ``prompt_len`` tokens."""
        lens = self.prompt_lengths
        if len(lens) <= 1:
            return list(self.values[0])
        if prompt_len <= lens[0]:
            return list(self.values[0])
        if prompt_len >= lens[-1]:
            return list(self.values[-1])
        i = next(k for k, n in enumerate(lens) if n > prompt_len)
        t = (math.log(prompt_len) - math.log(lens[i - 1])) / (math.log(lens[i]) - math.log(lens[i - 1]))
        return [a + t * (b - a) for a, b in zip(self.values[i - 1], self.values[i], strict=False)]

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": 1,
            "num_layers": self.num_layers,
            "prompt_lengths": self.prompt_lengths,
            "thresholds": self.values,
            "meta": self.meta,
        } | ({"gate": self.gate} if self.gate else {})

    @classmethod
    def from_dict(cls, d: dict, what: str = "thresholds") -> Thresholds:
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f'{what}: not a tda-engine thresholds file (expected "format": "{_FORMAT}")')
        try:
            return cls(d["thresholds"], d.get("prompt_lengths", []), d.get("meta"), d.get("gate"))
        except KeyError as e:
            raise ValueError(f"{what}: missing key {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Thresholds:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"thresholds file not found: {path}")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, path)

    def __repr__(self) -> str:
        kind = f"{len(self.prompt_lengths)} prompt lengths" if self.prompt_lengths else "fixed"
        gate = ", gated" if any(self.gate) else ""
        return f"Thresholds({self.num_layers} layers, {kind}{gate}, meta={self.meta})"


class Sparsity:
    """Which FFN neurons decoding computes. Build one with :meth:`dense`, :meth:`griffin`,
    :meth:`tda`, :meth:`cats`, :meth:`hybrid` or :meth:`parse` (``"dense"``, ``"tda:0.5"``,
    ``"griffin:0.5"``, ``"cats:0.7"``, ``"hybrid:0.9,0.5"``, ``"tda:th.json"``)."""

    __slots__ = ("method", "density", "thresholds", "keep")

    def __init__(
        self,
        method: str,
        density: float | None = None,
        thresholds: Thresholds | None = None,
        keep: float | None = None,
    ):
        self.method = method
        self.density = density
        self.thresholds = thresholds
        self.keep = keep

    @staticmethod
    def dense() -> Sparsity:
        return Sparsity("dense")

    @staticmethod
    def griffin(density: float) -> Sparsity:
        """GRIFFIN: per layer, the top ``floor(density * n)`` neurons by prompt score."""
        return Sparsity("griffin", _check_density(density))

    @staticmethod
    def cats(keep: float = 0.7) -> Sparsity:
        """CATS: each decoded token computes every neuron's gate, then up and down only where
        ``|act(gate)|`` reaches the layer's threshold, calibrated (on the built-in corpus, once per
        engine) so that a fraction ``keep`` of gate values passes."""
        return Sparsity("cats", keep=_check_keep(keep))

    @staticmethod
    def hybrid(density: float = 0.9, keep: float = 0.5) -> Sparsity:
        """The prompt chooses a superset of each layer's neurons as TDA at ``density``; each decoded
        token computes the gate over the superset only, then up and down for the fraction ``keep``
        of it whose gate passes the layer's threshold."""
        return Sparsity("hybrid", _check_density(density), keep=_check_keep(keep))

    @staticmethod
    def tda(thresholds=None, density: float | None = None) -> Sparsity:
        """TDA with explicit ``thresholds`` (a float for every layer, a list with one per layer, a
        :class:`Thresholds`, or the path of a saved one), or with ``density``: thresholds from the
        engine's own calibration of this model (made once, on the default corpus)."""
        if (thresholds is None) == (density is None):
            raise ValueError("Sparsity.tda() takes exactly one of thresholds= and density=")
        if density is not None:
            return Sparsity("tda", _check_density(density))
        if isinstance(thresholds, Thresholds):
            th = thresholds
        elif isinstance(thresholds, (str, os.PathLike)):
            th = Thresholds.load(thresholds)
        elif isinstance(thresholds, bool):
            raise TypeError("thresholds must be a number, a list of numbers, a Thresholds or a path; got bool")
        elif isinstance(thresholds, (int, float)):
            th = Thresholds([float(thresholds)], meta={"broadcast": True})
        elif isinstance(thresholds, Sequence) or hasattr(thresholds, "tolist"):
            values = thresholds.tolist() if hasattr(thresholds, "tolist") else list(thresholds)
            if not values:
                raise ValueError("thresholds: the list is empty")
            th = Thresholds(values)
        else:
            kind = type(thresholds).__name__
            raise TypeError(f"thresholds must be a number, a list of numbers, a Thresholds or a path; got {kind}")
        return Sparsity("tda", thresholds=th)

    @staticmethod
    def parse(spec: str) -> Sparsity:
        """``"dense"``, ``"tda:DENSITY"``, ``"griffin:DENSITY"``, ``"cats:KEEP"``,
        ``"hybrid:DENSITY,KEEP"`` or ``"tda:PATH"`` (a thresholds file, gated or not)."""
        if not isinstance(spec, str):
            raise TypeError(f"sparsity must be a str or a Sparsity, got {type(spec).__name__}")
        method, _, arg = spec.partition(":")
        method = method.strip().lower()
        if method == "dense" and not arg:
            return Sparsity.dense()
        if method in ("cats", "hybrid") and arg:
            parts = [p.strip() for p in arg.split(",")]
            want = 1 if method == "cats" else 2
            if len(parts) != want:
                example = "'cats:0.7'" if method == "cats" else "'hybrid:0.9,0.5'"
                raise ValueError(f"sparsity {spec!r}: expected {want} number(s), e.g. {example}")
            try:
                nums = [float(p) for p in parts]
            except ValueError:
                raise ValueError(f"sparsity {spec!r}: {arg!r} is not a list of numbers") from None
            return Sparsity.cats(nums[0]) if method == "cats" else Sparsity.hybrid(nums[0], nums[1])
        if method in ("tda", "griffin") and arg:
            try:
                value = float(arg)
            except ValueError:
                if method == "tda":
                    return Sparsity.tda(thresholds=arg)
                raise ValueError(f"sparsity {spec!r}: {arg!r} is not a number") from None
            return Sparsity.griffin(value) if method == "griffin" else Sparsity.tda(density=value)
        raise ValueError(
            f"unknown sparsity {spec!r}; expected 'dense', 'tda:DENSITY', 'tda:PATH', 'griffin:DENSITY', "
            "'cats:KEEP' or 'hybrid:DENSITY,KEEP'"
        )

    @staticmethod
    def of(value) -> Sparsity:
        """Accepts a Sparsity, a spec string, or None (dense)."""
        if value is None:
            return Sparsity.dense()
        if isinstance(value, Sparsity):
            return value
        if isinstance(value, str):
            return Sparsity.parse(value)
        raise TypeError(f"sparsity must be a Sparsity, a str such as 'tda:0.5', or None; got {type(value).__name__}")

    def _native(self, num_layers: int | None = None) -> tuple:
        if self.method in ("dense", "griffin", "cats", "hybrid"):
            return (self.method, self.density, self.keep, None)
        if self.thresholds is None:
            return ("tda_density", self.density, None, None)
        th = self.thresholds
        if th.meta.get("broadcast") and num_layers is not None and th.num_layers == 1:
            th = Thresholds([th.values[0][0]] * num_layers, meta=th.meta)
        return ("tda", None, None, json.dumps(th.to_dict()))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sparsity) and (self.method, self.density, self.keep, self.thresholds) == (
            other.method,
            other.density,
            other.keep,
            other.thresholds,
        )

    def __hash__(self) -> int:
        return hash((self.method, self.density, self.keep, id(self.thresholds)))

    def __repr__(self) -> str:
        if self.method == "dense":
            return "Sparsity.dense()"
        if self.method == "griffin":
            return f"Sparsity.griffin(density={self.density})"
        if self.method == "cats":
            return f"Sparsity.cats(keep={self.keep})"
        if self.method == "hybrid":
            return f"Sparsity.hybrid(density={self.density}, keep={self.keep})"
        if self.thresholds is None:
            return f"Sparsity.tda(density={self.density})"
        return f"Sparsity.tda(thresholds={self.thresholds!r})"

    def __str__(self) -> str:
        if self.method == "dense":
            return "dense"
        if self.method == "cats":
            return f"cats:{self.keep:g}"
        if self.method == "hybrid":
            return f"hybrid:{self.density:g},{self.keep:g}"
        if self.thresholds is not None:
            name = self.thresholds.meta.get("name")
            return f"tda[{name}]" if name else "tda[thresholds]"
        return f"{self.method}:{self.density:g}"
