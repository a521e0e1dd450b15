//! Python bindings: type conversion, errors mapped to Python exceptions in one place, the GIL
//! released around all compute, and no Rust panic crossing into Python.

use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyMemoryError, PyRuntimeError, PyStopIteration, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tda_core::engine::{CalibrationOptions, CalibrationTarget};
use tda_core::sparsity::calibrate::{Budget, ProgressFn};
use tda_core::sparsity::gate::Methods;
use tda_core::{Error, GenerateOptions, Generation, GenerationOutput, Sparsity, Thresholds};

/// The one place core errors become Python exceptions.
fn to_py(e: Error) -> PyErr {
    match e {
        Error::NotFound(m) => PyFileNotFoundError::new_err(m),
        Error::InvalidModel(m) | Error::InvalidArgument(m) => PyValueError::new_err(m),
        Error::OutOfMemory(m) => PyMemoryError::new_err(m),
        Error::Cancelled(m) => PyKeyboardInterrupt::new_err(m),
        Error::Internal(m) => PyRuntimeError::new_err(format!("internal error: {m}")),
    }
}

/// Runs `f` without the GIL; a panic inside becomes a `RuntimeError` instead of crossing into Python.
fn compute<T: Send>(py: Python<'_>, f: impl FnOnce() -> tda_core::Result<T> + Send) -> PyResult<T> {
    py.detach(|| match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(to_py),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!("internal error (a bug in tda-engine, please report it): {msg}")))
        }
    })
}

fn to_ids(ids: Vec<i64>, what: &str) -> PyResult<Vec<u32>> {
    ids.iter()
        .enumerate()
        .map(|(i, &t)| {
            u32::try_from(t)
                .map_err(|_| PyValueError::new_err(format!("{what}: token id {t} at index {i} is out of range")))
        })
        .collect()
}

#[pyclass(module = "tda_engine._native", frozen)]
struct Engine {
    inner: tda_core::Engine,
}

/// Generation options, read from the dict that `tda_engine.Engine` builds with every key present.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct PyOptions {
    max_new_tokens: Option<i64>,
    temperature: Option<f64>,
    top_k: Option<i64>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    seed: Option<i64>,
    stop: Option<Vec<String>>,
    stop_token_ids: Option<Vec<i64>>,
    ignore_eos: bool,
    logprobs: bool,
    sparsity: PySparsity,
}

/// A sparsity spec as `tda_engine.Sparsity._native()` builds it: `(method, density, keep,
/// thresholds_json)` with method "dense", "griffin", "tda_density", "cats", "hybrid" or "tda".
type PySparsity = (String, Option<f64>, Option<f64>, Option<String>);

fn sparsity_from(s: PySparsity) -> PyResult<Sparsity> {
    let (method, density, keep, json) = s;
    let need = |d: Option<f64>, what: &str| {
        d.ok_or_else(|| PyValueError::new_err(format!("sparsity '{method}' needs a {what}")))
    };
    Ok(match method.as_str() {
        "dense" => Sparsity::Dense,
        "griffin" => Sparsity::Griffin { density: need(density, "density")? },
        "tda_density" => Sparsity::TdaDensity(need(density, "density")?),
        "cats" => Sparsity::Cats(need(keep, "keep fraction")?),
        "hybrid" => Sparsity::Hybrid { density: need(density, "density")?, keep: need(keep, "keep fraction")? },
        "tda" => {
            let text = json.ok_or_else(|| PyValueError::new_err("sparsity 'tda' needs thresholds"))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| PyValueError::new_err(format!("thresholds: {e}")))?;
            Sparsity::Tda(std::sync::Arc::new(Thresholds::from_json(&v, "thresholds").map_err(to_py)?))
        }
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown sparsity method '{other}'; expected 'dense', 'tda', 'griffin', 'cats' or 'hybrid'"
            )))
        }
    })
}

fn calibration_options(
    lengths: Option<Vec<usize>>,
    max_windows: Option<usize>,
    methods: Option<&str>,
) -> PyResult<CalibrationOptions> {
    let d = CalibrationOptions::default();
    Ok(CalibrationOptions {
        lengths: lengths.unwrap_or(d.lengths),
        max_windows: max_windows.unwrap_or(d.max_windows),
        progress: None,
        methods: methods.map(Methods::parse).transpose().map_err(to_py)?.unwrap_or(d.methods),
    })
}

/// Runs long work `f` without the GIL, handing it a progress function that takes the GIL at each
/// step to check for Ctrl-C and to call `callback(done, total)` (if given). What either raises
/// stops the work, and is raised here once it has returned (the engine keeps no half-made state:
/// calibration only returns thresholds).
fn compute_with_progress<T: Send>(
    py: Python<'_>,
    callback: Option<Py<PyAny>>,
    f: impl FnOnce(ProgressFn) -> tda_core::Result<T> + Send,
) -> PyResult<T> {
    let raised: Arc<Mutex<Option<PyErr>>> = Arc::default();
    let keep = raised.clone();
    let progress: ProgressFn = Arc::new(move |done, total| {
        Python::attach(|py| -> PyResult<()> {
            py.check_signals()?;
            if let Some(cb) = &callback {
                cb.call1(py, (done, total))?;
            }
            Ok(())
        })
        .map_err(|e| {
            *keep.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            Error::Cancelled("calibration stopped".into())
        })
    });
    let r = compute(py, || f(progress));
    let pending = raised.lock().unwrap_or_else(|p| p.into_inner()).take();
    match pending {
        Some(e) if r.is_err() => Err(e),
        _ => r,
    }
}

impl PyOptions {
    fn into_core(self) -> PyResult<GenerateOptions> {
        let seed = match self.seed {
            Some(s) if s < 0 => return Err(PyValueError::new_err(format!("seed must be >= 0, got {s}"))),
            s => s.map(|s| s as u64),
        };
        Ok(GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed,
            stop: self.stop.unwrap_or_default(),
            stop_token_ids: to_ids(self.stop_token_ids.unwrap_or_default(), "stop_token_ids")?,
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            sparsity: sparsity_from(self.sparsity)?,
        })
    }
}

fn output_dict<'py>(py: Python<'py>, o: GenerationOutput) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("text", o.text)?;
    d.set_item("completion_tokens", o.token_ids.len())?;
    d.set_item("token_ids", o.token_ids)?;
    d.set_item("finish_reason", o.finish_reason.as_str())?;
    d.set_item("prompt_tokens", o.prompt_tokens)?;
    d.set_item("prefill_s", o.timings.prefill_s)?;
    d.set_item("decode_s", o.timings.decode_s)?;
    d.set_item("decode_tokens_per_s", o.timings.decode_tokens_per_s())?;
    d.set_item("logprobs", o.logprobs)?;
    d.set_item("ffn_active", o.ffn_active)?;
    d.set_item("ffn_bytes", o.ffn_bytes)?;
    Ok(d)
}

#[pymethods]
impl Engine {
    #[staticmethod]
    #[pyo3(signature = (path, device = "cpu", dtype = "auto"))]
    fn from_pretrained(py: Python<'_>, path: PathBuf, device: &str, dtype: &str) -> PyResult<Self> {
        let (device, dtype) = (device.to_string(), dtype.to_string());
        let inner = compute(py, move || tda_core::Engine::from_pretrained(&path, &device, &dtype))?;
        Ok(Self { inner })
    }

    #[getter]
    fn model_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner.config();
        let d = PyDict::new(py);
        d.set_item("architecture", &c.architecture)?;
        d.set_item("num_layers", c.num_layers)?;
        d.set_item("hidden_size", c.hidden_size)?;
        d.set_item("intermediate_size", c.intermediate_size)?;
        d.set_item("vocab_size", c.vocab_size)?;
        d.set_item("num_attention_heads", c.num_heads)?;
        d.set_item("num_key_value_heads", c.num_kv_heads)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("max_position_embeddings", c.max_position_embeddings)?;
        d.set_item("dtype", self.inner.precision().name())?;
        let types = self.inner.model().weight_types();
        d.set_item("weight_types", types.clone().into_iter().collect::<std::collections::HashMap<_, _>>())?;
        d.set_item("weight_bytes", types.values().sum::<usize>())?;
        d.set_item("device", self.inner.device())?;
        d.set_item("decode_weight_bytes", self.inner.model().decode_weight_bytes())?;
        d.set_item("ffn_weight_bytes", self.inner.model().ffn_weight_bytes())?;
        Ok(d)
    }

    #[getter]
    fn generation_defaults<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let g = self.inner.defaults();
        let d = PyDict::new(py);
        d.set_item("max_new_tokens", g.max_new_tokens)?;
        d.set_item("temperature", g.sampling.temperature)?;
        d.set_item("top_k", g.sampling.top_k)?;
        d.set_item("top_p", g.sampling.top_p)?;
        d.set_item("min_p", g.sampling.min_p)?;
        d.set_item("repetition_penalty", g.sampling.repetition_penalty)?;
        Ok(d)
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids().to_vec()
    }

    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        let t = self.inner.tokenizer();
        t.bos_token.as_deref().and_then(|b| t.token_to_id(b)).or(self.inner.config().bos_token_id)
    }

    /// The ids the tokenizer puts before a text (BOS), as calibration windows start.
    fn bos_prefix(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        compute(py, || self.inner.bos_prefix())
    }

    #[getter]
    fn has_chat_template(&self) -> bool {
        self.inner.tokenizer().chat_template.is_some()
    }

    #[pyo3(signature = (text, add_special_tokens = true))]
    fn tokenize(&self, py: Python<'_>, text: String, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        compute(py, || self.inner.tokenize(&text, add_special_tokens))
    }

    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn detokenize(&self, py: Python<'_>, ids: Vec<i64>, skip_special_tokens: bool) -> PyResult<String> {
        let ids = to_ids(ids, "ids")?;
        compute(py, || self.inner.detokenize(&ids, skip_special_tokens))
    }

    /// `messages_json`: a JSON list of {"role", "content"} objects.
    #[pyo3(signature = (messages_json, add_generation_prompt = true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages_json: &str,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let messages: serde_json::Value =
            serde_json::from_str(messages_json).map_err(|e| PyValueError::new_err(format!("messages: {e}")))?;
        compute(py, || self.inner.tokenizer().apply_chat_template(&messages, add_generation_prompt))
    }

    /// Logits at every position, float32 `(len(ids), vocab_size)`.
    fn forward<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyAny>> {
        let ids = to_ids(ids, "ids")?;
        let n = ids.len();
        let v = self.inner.config().vocab_size;
        let logits = compute(py, || self.inner.forward(&ids))?;
        Ok(PyArray1::from_vec(py, logits).reshape([n, v])?.into_any())
    }

    /// Log-probs of `ids[prefix_len:]` under each spec: a list of (float32 array, kept counts,
    /// FFN bytes fraction).
    fn score<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<i64>,
        prefix_len: usize,
        specs: Vec<PySparsity>,
    ) -> PyResult<Vec<(Bound<'py, PyAny>, Vec<usize>, f64)>> {
        let ids = to_ids(ids, "ids")?;
        let specs = specs.into_iter().map(sparsity_from).collect::<PyResult<Vec<_>>>()?;
        let out = compute(py, || self.inner.score(&ids, prefix_len, &specs))?;
        Ok(out.into_iter().map(|r| (PyArray1::from_vec(py, r.logprobs).into_any(), r.kept, r.ffn_bytes)).collect())
    }

    /// `{"tda": [...], "griffin": [...]}`: per layer, every neuron's scores over the prompt.
    fn neuron_scores<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyDict>> {
        let ids = to_ids(ids, "ids")?;
        let s = compute(py, || self.inner.neuron_scores(&ids))?;
        let arr = |v: Vec<Vec<f32>>| -> Vec<Bound<'py, PyAny>> {
            v.into_iter().map(|x| PyArray1::from_vec(py, x).into_any()).collect()
        };
        let d = PyDict::new(py);
        d.set_item("tda", arr(s.tda))?;
        d.set_item("griffin", arr(s.griffin))?;
        Ok(d)
    }

    /// Per layer, the ascending indices of the neurons kept for this prompt.
    fn select_neurons<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<i64>,
        spec: PySparsity,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let ids = to_ids(ids, "ids")?;
        let spec = sparsity_from(spec)?;
        let kept = compute(py, || self.inner.select_neurons(&ids, &spec))?;
        Ok(kept.into_iter().map(|k| PyArray1::from_vec(py, k).into_any()).collect())
    }

    /// Calibrates thresholds; returns (thresholds JSON, report dict or None).
    #[pyo3(signature = (texts, density = None, max_ppl_increase = None, ffn_bytes = None, keep = None, method = None,
                        lengths = None, max_windows = None, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn calibrate<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        density: Option<f64>,
        max_ppl_increase: Option<f64>,
        ffn_bytes: Option<f64>,
        keep: Option<f64>,
        method: Option<&str>,
        lengths: Option<Vec<usize>>,
        max_windows: Option<usize>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<(String, Option<Bound<'py, PyDict>>)> {
        let target = match (density, max_ppl_increase, ffn_bytes, keep) {
            (Some(d), None, None, None) => CalibrationTarget::Density(d),
            (d, None, None, Some(k)) => CalibrationTarget::Gate { density: d.unwrap_or(1.0), keep: k },
            (None, Some(b), None, None) => CalibrationTarget::MaxPplIncrease(b),
            (None, None, Some(b), None) => CalibrationTarget::FfnBytes(b),
            _ => {
                return Err(PyValueError::new_err(
                    "give one of density= (TDA), keep= (CATS), density= and keep= (hybrid), max_ppl_increase= or \
                     ffn_bytes=",
                ))
            }
        };
        let opts = calibration_options(lengths, max_windows, method)?;
        let (th, report) = compute_with_progress(py, progress, |p| {
            self.inner.calibrate(&texts, target, &CalibrationOptions { progress: Some(p), ..opts })
        })?;
        let report = report
            .map(|r| -> PyResult<Bound<'py, PyDict>> {
                let d = PyDict::new(py);
                match r.budget {
                    Budget::MaxPplIncrease(b) => d.set_item("max_ppl_increase", b)?,
                    Budget::FfnBytes(b) => d.set_item("ffn_bytes_budget", b)?,
                }
                d.set_item("methods", format!("{:?}", r.methods).to_lowercase())?;
                d.set_item("layer_densities", r.layer_densities)?;
                d.set_item("layer_keeps", r.layer_keeps)?;
                d.set_item("ffn_bytes", r.ffn_bytes)?;
                d.set_item("ppl_dense", r.ppl_dense)?;
                d.set_item("ppl", r.ppl)?;
                d.set_item("kept_fraction", r.kept_fraction)?;
                d.set_item("evaluations", r.evaluations)?;
                d.set_item("validation_tokens", r.validation_tokens)?;
                d.set_item("chosen", if r.uniform_chosen { "uniform" } else { "per-layer" })?;
                if let Some((ppl, bytes)) = r.per_layer {
                    let p = PyDict::new(py);
                    p.set_item("ppl", ppl)?;
                    p.set_item("ffn_bytes", bytes)?;
                    d.set_item("per_layer", p)?;
                }
                if let Some(u) = r.uniform {
                    let p = PyDict::new(py);
                    p.set_item("setting", u.setting)?;
                    p.set_item("ppl", u.ppl)?;
                    p.set_item("ffn_bytes", u.ffn_bytes)?;
                    d.set_item("uniform", p)?;
                }
                Ok(d)
            })
            .transpose()?;
        Ok((th.to_json().to_string(), report))
    }

    /// Density calibration for several densities in one pass; a list of thresholds JSON.
    #[pyo3(signature = (texts, densities, lengths = None, max_windows = None, progress = None))]
    fn calibrate_densities(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        densities: Vec<f64>,
        lengths: Option<Vec<usize>>,
        max_windows: Option<usize>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<String>> {
        let opts = calibration_options(lengths, max_windows, None)?;
        let th = compute_with_progress(py, progress, |p| {
            self.inner.calibrate_densities(&texts, &densities, &CalibrationOptions { progress: Some(p), ..opts })
        })?;
        Ok(th.into_iter().map(|t| t.to_json().to_string()).collect())
    }

    /// CATS / hybrid calibration for several (density, keep) pairs in one pass; a list of
    /// thresholds JSON.
    #[pyo3(signature = (texts, pairs, lengths = None, max_windows = None, progress = None))]
    fn calibrate_gates(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        pairs: Vec<(f64, f64)>,
        lengths: Option<Vec<usize>>,
        max_windows: Option<usize>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<String>> {
        let opts = calibration_options(lengths, max_windows, None)?;
        let th = compute_with_progress(py, progress, |p| {
            self.inner.calibrate_gates(&texts, &pairs, &CalibrationOptions { progress: Some(p), ..opts })
        })?;
        Ok(th.into_iter().map(|t| t.to_json().to_string()).collect())
    }

    /// The thresholds a spec resolves to (the engine's own calibration, made once, for `tda`
    /// densities, `cats` and `hybrid`), as JSON; None for dense and GRIFFIN.
    fn resolved_thresholds(&self, py: Python<'_>, spec: PySparsity) -> PyResult<Option<String>> {
        let spec = sparsity_from(spec)?;
        Ok(match compute(py, || self.inner.resolve(&spec))? {
            Sparsity::Tda(t) => Some(t.to_json().to_string()),
            _ => None,
        })
    }

    /// The engine's own thresholds for a density (calibrated once on the default corpus), as JSON.
    fn density_thresholds(&self, py: Python<'_>, density: f64) -> PyResult<String> {
        let th = compute(py, || self.inner.density_thresholds(density))?;
        Ok(th.to_json().to_string())
    }

    /// Generates from token ids with an options dict; returns a result dict.
    fn generate<'py>(&self, py: Python<'py>, ids: Vec<i64>, options: PyOptions) -> PyResult<Bound<'py, PyDict>> {
        let ids = to_ids(ids, "prompt")?;
        let opts = options.into_core()?;
        let out = compute(py, || self.inner.generate(ids, &opts))?;
        output_dict(py, out)
    }

    /// Generates from several prompts with the same options, up to `max_batch` at a time with their
    /// decode steps batched; a list of result dicts in the prompts' order.
    fn generate_many<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<Vec<i64>>,
        options: PyOptions,
        max_batch: usize,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let prompts = prompts.into_iter().map(|p| to_ids(p, "prompt")).collect::<PyResult<Vec<_>>>()?;
        let opts = options.into_core()?;
        let outs = compute(py, || self.inner.generate_many(prompts, &opts, max_batch))?;
        outs.into_iter().map(|o| output_dict(py, o)).collect()
    }

    /// Starts a generation and returns an iterator of text deltas (validation errors raise here).
    fn stream(&self, py: Python<'_>, ids: Vec<i64>, options: PyOptions) -> PyResult<Stream> {
        let ids = to_ids(ids, "prompt")?;
        let opts = options.into_core()?;
        let generation = compute(py, || self.inner.start(ids, &opts))?;
        Ok(Stream { state: Mutex::new(StreamState { generation: Some(generation), output: None }) })
    }
}

struct StreamState {
    generation: Option<Generation>,
    output: Option<GenerationOutput>,
}

/// Iterator of text deltas; `result()` gives the full result once it is exhausted.
#[pyclass(module = "tda_engine._native", frozen)]
struct Stream {
    state: Mutex<StreamState>,
}

#[pymethods]
impl Stream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<String> {
        let delta = compute(py, || {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let Some(g) = st.generation.as_mut() else { return Ok(None) };
            loop {
                match g.step() {
                    Ok(Some(d)) if d.is_empty() => continue,
                    Ok(Some(d)) => return Ok(Some(d)),
                    Ok(None) => break,
                    Err(e) => {
                        st.generation = None; // the run state goes back to the pool
                        return Err(e);
                    }
                }
            }
            let g = st.generation.take().expect("checked above");
            st.output = Some(g.into_output());
            Ok(None)
        })?;
        delta.ok_or_else(|| PyStopIteration::new_err(()))
    }

    /// The result dict once the stream is exhausted, else None.
    fn result<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let out = self.state.lock().unwrap_or_else(|p| p.into_inner()).output.clone();
        out.map(|o| output_dict(py, o)).transpose()
    }

    /// Stops early; the run state goes back to the engine.
    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).generation = None;
    }
}

/// Writes a GGUF file as an HF model directory (float32 safetensors, config.json, tokenizer files).
#[pyfunction]
fn convert_gguf(py: Python<'_>, src: PathBuf, dst: PathBuf) -> PyResult<()> {
    compute(py, move || tda_core::load::gguf::GgufFile::open(&src)?.convert_to_hf(&dst))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(convert_gguf, m)?)?;
    m.add_class::<Engine>()?;
    m.add_class::<Stream>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
