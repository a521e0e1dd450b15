//! Python bindings: type conversion, errors mapped to Python exceptions in one place, the GIL
//! released around all compute, and no Rust panic crossing into Python.

use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyStopIteration, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;
use tda_core::engine::dtype_name;
use tda_core::{Error, GenerateOptions, Generation, GenerationOutput};

/// The one place core errors become Python exceptions.
fn to_py(e: Error) -> PyErr {
    match e {
        Error::NotFound(m) => PyFileNotFoundError::new_err(m),
        Error::InvalidModel(m) | Error::InvalidArgument(m) => PyValueError::new_err(m),
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
    Ok(d)
}

#[pymethods]
impl Engine {
    #[staticmethod]
    #[pyo3(signature = (path, device = "cpu", dtype = "float32"))]
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
        d.set_item("dtype", dtype_name(self.inner.dtype()))?;
        d.set_item("device", self.inner.device())?;
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

    /// Generates from token ids with an options dict; returns a result dict.
    fn generate<'py>(&self, py: Python<'py>, ids: Vec<i64>, options: PyOptions) -> PyResult<Bound<'py, PyDict>> {
        let ids = to_ids(ids, "prompt")?;
        let opts = options.into_core()?;
        let out = compute(py, || self.inner.generate(ids, &opts))?;
        output_dict(py, out)
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
