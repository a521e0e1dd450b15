//! The engine: a loaded model on its device, its tokenizer and generation defaults, calibration
//! and scoring. The model keeps a pool of run states, so that several threads can generate at once.

use crate::config::{Arch, ModelConfig};
use crate::error::{read_text, Error, Result};
use crate::generate::session::step_many;
use crate::generate::session::Resolved;
use crate::generate::{GenerateOptions, Generation, GenerationDefaults, GenerationOutput};
use crate::kernels::{cpu::CpuBackend, Backend};
use crate::load::safetensors::SafetensorsWeights;
use crate::load::tokenizer::{builtin_chat_template, TextTokenizer};
use crate::load::{gguf, gguf_tokenizer, Precision};
use crate::model::{FfnMode, Logits, Model, State};
use crate::quant::QType;
use crate::sparsity::calibrate::{
    budget_search, budget_steps, gate_histogram, windows, Budget, BudgetReport, LengthProfile, Progress, ProgressFn,
    DEFAULT_LENGTHS,
};
use crate::sparsity::corpus::DEFAULT_CORPUS;
use crate::sparsity::gate::{GateHistogram, Methods};
use crate::sparsity::spec::{check_density, check_keep};
use crate::sparsity::{NeuronStats, Prefixed, Scored, Sparsity, Thresholds};
use candle_core::DType;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct Shared {
    pub model: Arc<Model>,
    pub tokenizer: Arc<TextTokenizer>,
    pub defaults: GenerationDefaults,
    pub eos_token_ids: Vec<u32>,
    /// The calibration of `Sparsity::TdaDensity`, made from the default corpus on first use.
    default_profile: Mutex<Option<Arc<LengthProfile>>>,
    /// The gate histogram of `Sparsity::Cats` and `Sparsity::Hybrid`, likewise.
    default_gates: Mutex<Option<Arc<GateHistogram>>>,
    /// Specs resolved from the default calibration, by label.
    resolved: Mutex<HashMap<String, Arc<Thresholds>>>,
}

#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

/// Parses a dtype name: float32/f32/fp32, bfloat16/bf16, float16/f16/fp16/half, a block type to
/// quantize to at load (`q8_0`, `q4_0`, ... any of [`QType`]'s names), or "auto" (`None`: what the
/// checkpoint declares; a GGUF file's quantized blocks as stored).
pub fn parse_dtype(s: &str) -> Result<Option<Precision>> {
    Ok(Some(match s.to_ascii_lowercase().as_str() {
        "float32" | "f32" | "fp32" => Precision::Float(DType::F32),
        "bfloat16" | "bf16" => Precision::Float(DType::BF16),
        "float16" | "f16" | "fp16" | "half" => Precision::Float(DType::F16),
        "auto" => return Ok(None),
        other => match QType::parse(other) {
            Some(q) => Precision::Quant(q),
            None => {
                let blocks: Vec<&str> = QType::ALL.iter().map(|q| q.name()).collect();
                return Err(Error::arg(format!(
                    "unknown dtype '{s}'; expected 'auto', 'float32', 'bfloat16', 'float16' or a block type ({})",
                    blocks.join(", ")
                )));
            }
        },
    }))
}

/// The backend of a device name: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
pub fn backend(device: &str) -> Result<Arc<dyn Backend>> {
    let lower = device.to_ascii_lowercase();
    if lower == "cpu" {
        return Ok(Arc::new(CpuBackend));
    }
    let ordinal = match lower.strip_prefix("cuda") {
        Some("") => Some(0),
        Some(rest) => rest.strip_prefix(':').and_then(|i| i.parse::<usize>().ok()),
        None => None,
    };
    let Some(ordinal) = ordinal else {
        return Err(Error::arg(format!("unknown device '{device}'; expected 'cpu', 'cuda' or 'cuda:N'")));
    };
    cuda_backend(device, ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_backend(_device: &str, ordinal: usize) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(crate::kernels::cuda::CudaBackend::new(ordinal)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(device: &str, _ordinal: usize) -> Result<Arc<dyn Backend>> {
    Err(Error::arg(format!(
        "device '{device}' is not available: this build of tda-engine has no CUDA support (build with the \
         'cuda' feature: scripts/build_cuda.sh); use 'cpu'"
    )))
}

impl Engine {
    /// Loads a model: an HF directory (config.json, safetensors, tokenizer.json, ...), a `.gguf`
    /// file, or a directory holding exactly one `.gguf` file and no config.json.
    pub fn from_pretrained(path: &Path, device: &str, dtype: &str) -> Result<Self> {
        let dtype = parse_dtype(dtype)?;
        let device = backend(device)?;
        if !path.exists() {
            return Err(Error::not_found(path, "model path"));
        }
        if path.is_file() {
            if gguf::is_gguf(path) || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                return Self::from_gguf(path, device, dtype);
            }
            return Err(Error::model(format!(
                "{} is neither a GGUF file nor a model directory (config.json, *.safetensors, tokenizer.json)",
                path.display()
            )));
        }
        let cfg_path = path.join("config.json");
        if !cfg_path.exists() {
            if let Some(g) = single_gguf_in(path) {
                return Self::from_gguf(&g, device, dtype);
            }
        }
        let cfg = ModelConfig::from_hf_json(&read_text(&cfg_path, "config file")?, &cfg_path.display().to_string())?;
        let tokenizer = TextTokenizer::from_dir(path)?;
        let defaults = GenerationDefaults::from_dir(path)?;
        let weights = SafetensorsWeights::open(path)?;
        // "auto": what the checkpoint declares, when it is one of ours; else float32.
        let dtype = dtype.unwrap_or_else(|| {
            let declared = cfg.declared_dtype.as_deref().and_then(|d| parse_dtype(d).ok().flatten());
            declared.filter(|p| matches!(p, Precision::Float(_))).unwrap_or(Precision::Float(DType::F32))
        });
        let model = Model::load(cfg, &weights, dtype, device)?;
        Ok(Self::assemble(model, tokenizer, defaults, vec![]))
    }

    /// A GGUF file: tokenizer from the metadata; weights as `dtype` says, "auto" keeping quantized
    /// blocks as stored where the backend has kernels for them (the CPU), else float32.
    fn from_gguf(path: &Path, device: Arc<dyn Backend>, dtype: Option<Precision>) -> Result<Self> {
        let file = gguf::GgufFile::open(path)?;
        let cfg = file.config()?;
        let mut tokenizer = gguf_tokenizer::from_gguf(file.metadata())?;
        if tokenizer.chat_template.is_none() {
            tokenizer.chat_template = builtin_chat_template(cfg.arch).map(str::to_string);
        }
        let auto = if device.device() == "cpu" { Precision::Stored } else { Precision::Float(DType::F32) };
        let model = Model::load(cfg, &file, dtype.unwrap_or(auto), device)?;
        // Generation also ends at the end-of-turn tokens llama.cpp stops at, and at Gemma's
        // <end_of_turn> (HF's generation_config for Gemma lists it as an EOS).
        let mut end_of_turn: Vec<u32> = ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
            .iter()
            .filter_map(|k| file.metadata().get(*k).and_then(|v| v.to_u32().ok()))
            .collect();
        if matches!(model.cfg.arch, Arch::Gemma | Arch::Gemma2 | Arch::Gemma3) {
            end_of_turn.extend(tokenizer.token_to_id("<end_of_turn>"));
        }
        Ok(Self::assemble(model, tokenizer, GenerationDefaults::default(), end_of_turn))
    }

    /// Generation ends at the EOS ids of generation_config.json, else config.json, else the
    /// tokenizer's EOS token, plus any `end_of_turn` ids.
    fn assemble(model: Model, tokenizer: TextTokenizer, defaults: GenerationDefaults, end_of_turn: Vec<u32>) -> Self {
        let mut eos = if defaults.eos_token_ids.is_empty() {
            model.cfg.eos_token_ids.clone()
        } else {
            defaults.eos_token_ids.clone()
        };
        if eos.is_empty() {
            eos.extend(tokenizer.eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)));
        }
        for id in end_of_turn {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        Self {
            shared: Arc::new(Shared {
                model: Arc::new(model),
                tokenizer: Arc::new(tokenizer),
                defaults,
                eos_token_ids: eos,
                default_profile: Mutex::new(None),
                default_gates: Mutex::new(None),
                resolved: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn model(&self) -> &Model {
        &self.shared.model
    }
    pub fn config(&self) -> &ModelConfig {
        &self.shared.model.cfg
    }
    /// The float dtype of activations and float weights.
    pub fn dtype(&self) -> DType {
        self.shared.model.dtype
    }
    /// How the weights were loaded (a float dtype, a block type, or as the GGUF file stores them).
    pub fn precision(&self) -> Precision {
        self.shared.model.precision
    }
    /// `cpu` or `cuda:N`.
    pub fn device(&self) -> String {
        self.shared.model.device()
    }
    pub fn defaults(&self) -> &GenerationDefaults {
        &self.shared.defaults
    }
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.shared.eos_token_ids
    }
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.shared.tokenizer
    }

    pub fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.shared.tokenizer.encode(text, add_special_tokens)
    }

    pub fn detokenize(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids, false)?;
        self.shared.tokenizer.decode(ids, skip_special_tokens)
    }

    /// Rejects an empty prompt, ids outside the vocabulary, and prompts that fill the context.
    fn check_ids(&self, ids: &[u32], as_prompt: bool) -> Result<()> {
        let cfg = &self.shared.model.cfg;
        if as_prompt && ids.is_empty() {
            return Err(Error::arg("the prompt is empty"));
        }
        if let Some((i, &t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= cfg.vocab_size) {
            return Err(Error::arg(format!(
                "token id {t} at index {i} is out of range for vocab_size {}",
                cfg.vocab_size
            )));
        }
        if as_prompt && ids.len() >= cfg.max_position_embeddings {
            return Err(Error::arg(format!(
                "the prompt has {} tokens, but the model's context (max_position_embeddings) is {}",
                ids.len(),
                cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Logits at every position of a dense forward pass, `ids.len() x vocab_size`, row-major.
    pub fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids, true)?;
        let v = self.shared.model.cfg.vocab_size;
        let model = &self.shared.model;
        let mut st = model.take_state(ids.len(), ids.len())?;
        let mut out = Vec::with_capacity(ids.len() * v);
        let r = model.forward(ids, 0, &mut st, FfnMode::Dense, Logits::All(&mut out));
        model.return_state(st);
        r.map(|_| out)
    }

    /// Starts a generation; drive it with [`Generation::step`] or [`Generation::run`].
    pub fn start(&self, prompt: Vec<u32>, opts: &GenerateOptions) -> Result<Generation> {
        self.check_ids(&prompt, true)?;
        let cfg = &self.shared.model.cfg;
        let mut resolved = Resolved::new(opts, &self.shared.defaults, &self.shared.eos_token_ids, cfg.vocab_size)?;
        resolved.sparsity = self.resolve(&opts.sparsity)?;
        Generation::new(self.shared.model.clone(), self.shared.tokenizer.clone(), prompt, resolved)
    }

    pub fn generate(&self, prompt: Vec<u32>, opts: &GenerateOptions) -> Result<GenerationOutput> {
        self.start(prompt, opts)?.run()
    }

    /// Generates from several prompts, each as if alone (the same options), with up to `max_batch`
    /// of them running together: their decode steps are batched ([`step_many`]: each weight is
    /// read once per step for all of them); when one finishes, the next prompt joins at the next
    /// step, after its own prefill. The results come back in the prompts' order. Every prompt is
    /// checked before anything runs.
    pub fn generate_many(
        &self,
        prompts: Vec<Vec<u32>>,
        opts: &GenerateOptions,
        max_batch: usize,
    ) -> Result<Vec<GenerationOutput>> {
        if max_batch == 0 {
            return Err(Error::arg("max_batch must be >= 1"));
        }
        for p in &prompts {
            self.check_ids(p, true)?;
        }
        let n = prompts.len();
        let mut batch = self.shared.model.new_batch(max_batch.min(n).max(1))?;
        let mut queue = prompts.into_iter().enumerate();
        let mut active: Vec<(usize, Generation)> = Vec::with_capacity(max_batch);
        let mut out: Vec<Option<GenerationOutput>> = (0..n).map(|_| None).collect();
        loop {
            while active.len() < max_batch {
                let Some((i, p)) = queue.next() else { break };
                active.push((i, self.start(p, opts)?));
            }
            if active.is_empty() {
                break;
            }
            let mut gens: Vec<&mut Generation> = active.iter_mut().map(|(_, g)| g).collect();
            let deltas = step_many(&mut gens, &mut batch)?;
            // Those that returned everything leave.
            for j in (0..active.len()).rev().filter(|&j| deltas[j].is_none()) {
                let (i, g) = active.swap_remove(j);
                out[i] = Some(g.into_output());
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every prompt ran")).collect())
    }

    /// Renders messages with the chat template and tokenizes the result (the template adds BOS).
    pub fn chat_prompt(&self, messages: &serde_json::Value, add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.shared.tokenizer.apply_chat_template(messages, add_generation_prompt)?;
        self.tokenize(&text, false)
    }
}

/// Per layer, every neuron's score over a prompt.
pub struct NeuronScores {
    pub tda: Vec<Vec<f32>>,
    pub griffin: Vec<Vec<f32>>,
}

/// Calibration windows: of the default corpus for `tda:DENSITY`, and at most this many.
const CALIBRATION_WINDOWS: usize = 8;
/// Prompt lengths up to this get `SHORT_SAMPLES` extra calibration windows each.
const SHORT_PROMPT: usize = 64;
const SHORT_SAMPLES: usize = 24;
/// Validation windows of quality-budget calibration: `VALIDATION_LEN` tokens, half of them dense.
const VALIDATION_WINDOWS: usize = 4;
const VALIDATION_LEN: usize = 512;

/// What calibration aims for.
#[derive(Debug, Clone, Copy)]
pub enum CalibrationTarget {
    /// The same fraction of neurons in every layer.
    Density(f64),
    /// Per-layer settings reading the fewest FFN bytes with held-out perplexity at most
    /// `(1 + x)` times dense.
    MaxPplIncrease(f64),
    /// Per-layer settings with the lowest held-out perplexity reading at most this fraction of the
    /// FFN bytes per decoded token.
    FfnBytes(f64),
    /// A per-token gate passing the fraction `keep` of the gate values inside the prompt's TDA
    /// superset at `density` (1: every neuron, CATS), the same in every layer.
    Gate { density: f64, keep: f64 },
}

#[derive(Clone)]
pub struct CalibrationOptions {
    /// Prompt lengths at which thresholds are calibrated; one length gives length-independent
    /// thresholds (plain quantile calibration).
    pub lengths: Vec<usize>,
    pub max_windows: usize,
    /// Told `(done, total)` windows and search steps as calibration goes; its error stops it.
    pub progress: Option<ProgressFn>,
    /// The settings a budget search may give a layer: TDA's superset, CATS's gate, or both.
    pub methods: Methods,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        Self {
            lengths: DEFAULT_LENGTHS.to_vec(),
            max_windows: CALIBRATION_WINDOWS,
            progress: None,
            methods: Methods::All,
        }
    }
}

impl Engine {
    /// Turns `TdaDensity`, `Cats` and `Hybrid` into thresholds and checks every spec against the
    /// model.
    pub fn resolve(&self, s: &Sparsity) -> Result<Sparsity> {
        let layers = self.config().num_layers;
        let t = match s {
            Sparsity::Dense => return Ok(Sparsity::Dense),
            Sparsity::Griffin { density } => {
                check_density(*density)?;
                return Ok(s.clone());
            }
            Sparsity::Tda(t) => {
                t.validate(layers)?;
                t.clone()
            }
            Sparsity::TdaDensity(d) => self.density_thresholds(*d)?,
            Sparsity::Cats(_) | Sparsity::Hybrid { .. } => self.gate_thresholds(s)?,
        };
        Ok(Sparsity::Tda(t))
    }

    fn cached(&self, key: &str, make: impl FnOnce() -> Result<Thresholds>) -> Result<Arc<Thresholds>> {
        if let Some(t) = self.shared.resolved.lock().unwrap_or_else(|p| p.into_inner()).get(key) {
            return Ok(t.clone());
        }
        let t = Arc::new(make()?);
        self.shared.resolved.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_string(), t.clone());
        Ok(t)
    }

    /// Thresholds for `density` from the engine's calibration on the default corpus (made once).
    pub fn density_thresholds(&self, density: f64) -> Result<Arc<Thresholds>> {
        check_density(density)?;
        self.cached(&format!("tda:{density}"), || {
            let profile = self.default_profile()?;
            let mut t = profile.thresholds(&vec![density; self.config().num_layers]);
            t.meta = json!({"method": "tda", "calibration": "density", "density": density, "text": "default corpus",
                            "windows": profile.windows});
            Ok(t)
        })
    }

    /// The thresholds of a `Cats` or `Hybrid` spec from the engine's calibration on the default
    /// corpus (made once): the hybrid's superset as TDA at its density, and per layer the gate
    /// threshold that a fraction `keep` of the superset's gate values passes.
    pub fn gate_thresholds(&self, spec: &Sparsity) -> Result<Arc<Thresholds>> {
        let (density, keep) = match *spec {
            Sparsity::Cats(k) => (1.0, k),
            Sparsity::Hybrid { density, keep } => (density, keep),
            _ => return Err(Error::Internal(format!("'{}' has no gate", spec.label()))),
        };
        check_density(density)?;
        check_keep(keep)?;
        self.cached(&spec.label(), || {
            let layers = self.config().num_layers;
            let mut t = match density < 1.0 {
                true => (*self.density_thresholds(density)?).clone(),
                false => Thresholds::fixed(vec![0.0; layers]),
            };
            let hist = self.default_gates()?;
            t.gate = (0..layers).map(|l| hist.threshold(l, density, keep)).collect();
            let method = if density < 1.0 { "hybrid" } else { "cats" };
            t.meta = json!({"method": method, "calibration": "keep", "density": density, "keep": keep,
                            "text": "default corpus", "gate_pairs": hist.pairs});
            Ok(t)
        })
    }

    /// [`gate_histogram`] of windows of `len` tokens, half of each dense.
    fn gate_histogram(&self, wins: &[Vec<u32>], len: usize, progress: &mut Progress) -> Result<GateHistogram> {
        let model = &self.shared.model;
        let mut st = model.take_state(len, len)?;
        let r = gate_histogram(model, &mut st, wins, len / 2, progress);
        model.return_state(st);
        r
    }

    fn default_gates(&self) -> Result<Arc<GateHistogram>> {
        let mut guard = self.shared.default_gates.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = guard.as_ref() {
            return Ok(h.clone());
        }
        let tokens = self.tokenize(DEFAULT_CORPUS, false)?;
        let len = self.window_len(VALIDATION_LEN);
        let wins = windows(&tokens, &self.bos_prefix()?, len, CALIBRATION_WINDOWS);
        let h = Arc::new(self.gate_histogram(&wins, len, &mut Progress::new(None))?);
        *guard = Some(h.clone());
        Ok(h)
    }

    fn default_profile(&self) -> Result<Arc<LengthProfile>> {
        let mut guard = self.shared.default_profile.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = guard.as_ref() {
            return Ok(p.clone());
        }
        let tokens = self.tokenize(DEFAULT_CORPUS, false)?;
        let p = Arc::new(self.profile(&tokens, &CalibrationOptions::default(), &mut Progress::new(None))?);
        *guard = Some(p.clone());
        Ok(p)
    }

    /// The ids a tokenizer puts in front of a text (BOS), which calibration windows start with.
    pub fn bos_prefix(&self) -> Result<Vec<u32>> {
        let with = self.tokenize("Hello", true)?;
        let without = self.tokenize("Hello", false)?;
        let pos = (0..=with.len().saturating_sub(without.len())).find(|&i| with[i..].starts_with(&without));
        Ok(with[..pos.unwrap_or(0)].to_vec())
    }

    /// Longest calibration window the model's context allows.
    fn window_len(&self, want: usize) -> usize {
        want.min(self.config().max_position_embeddings.saturating_sub(1)).max(1)
    }

    fn profile(&self, tokens: &[u32], opts: &CalibrationOptions, progress: &mut Progress) -> Result<LengthProfile> {
        let mut lengths = opts.lengths.clone();
        lengths.sort_unstable();
        lengths.dedup();
        if lengths.is_empty() || lengths[0] == 0 {
            return Err(Error::arg(format!("calibration lengths must be >= 1, got {:?}", opts.lengths)));
        }
        let len = self.window_len(*lengths.last().expect("checked non-empty"));
        let bos = self.bos_prefix()?;
        let mut wins = windows(tokens, &bos, len, opts.max_windows.max(1));
        // Short prompts' scores vary most from prompt to prompt, and short windows are cheap:
        // sample more of them, from positions spread over the text.
        for &l in lengths.iter().filter(|&&l| l <= SHORT_PROMPT && l < len) {
            let body = l.saturating_sub(bos.len()).max(1);
            let stride = (tokens.len().saturating_sub(body) / SHORT_SAMPLES).max(1);
            wins.extend(
                (0..SHORT_SAMPLES)
                    .map(|k| k * stride)
                    .filter(|&s| s + body <= tokens.len())
                    .map(|s| bos.iter().chain(&tokens[s..s + body]).copied().collect::<Vec<u32>>()),
            );
        }
        let model = &self.shared.model;
        let mut st = model.take_state(len, len)?;
        let r = LengthProfile::collect(model, &mut st, &wins, &lengths, progress);
        model.return_state(st);
        r
    }

    /// Calibrates TDA thresholds on `texts` (the default corpus when empty).
    pub fn calibrate(
        &self,
        texts: &[String],
        target: CalibrationTarget,
        opts: &CalibrationOptions,
    ) -> Result<(Thresholds, Option<BudgetReport>)> {
        match target {
            CalibrationTarget::Density(d) => {
                let t = self.calibrate_densities(texts, &[d], opts)?.pop();
                Ok((t.ok_or_else(|| Error::Internal("no thresholds".into()))?, None))
            }
            CalibrationTarget::Gate { density, keep } => {
                let t = self.calibrate_gates(texts, &[(density, keep)], opts)?.pop();
                Ok((t.ok_or_else(|| Error::Internal("no thresholds".into()))?, None))
            }
            CalibrationTarget::MaxPplIncrease(_) | CalibrationTarget::FfnBytes(_) => {
                let budget = match target {
                    CalibrationTarget::FfnBytes(b) => Budget::FfnBytes(b),
                    _ => Budget::MaxPplIncrease(match target {
                        CalibrationTarget::MaxPplIncrease(b) => b,
                        _ => unreachable!("matched above"),
                    }),
                };
                budget.check()?;
                let (tokens, source) = self.calibration_tokens(texts)?;
                // Held-out validation windows from the end of the text, the profile from the rest.
                let vlen = self.window_len(VALIDATION_LEN);
                let bos = self.bos_prefix()?;
                let body = vlen - bos.len().min(vlen - 1);
                let longest = *opts.lengths.iter().max().unwrap_or(&DEFAULT_LENGTHS[5]);
                let nval = (tokens.len().saturating_sub(longest) / body).clamp(1, VALIDATION_WINDOWS);
                let split = tokens.len().saturating_sub(nval * body);
                let val = windows(&tokens[split..], &bos, vlen, nval);
                if val.is_empty() || split < DEFAULT_LENGTHS[0] {
                    return Err(Error::arg(format!(
                        "calibration text is too short for a budget search: {} tokens, need at least {}",
                        tokens.len(),
                        vlen + longest
                    )));
                }
                let mut progress = Progress::new(opts.progress.clone());
                progress.add_total(val.len() + budget_steps(self.config().num_layers));
                let profile = self.profile(&tokens[..split], opts, &mut progress)?;
                let (mut t, report) =
                    budget_search(&self.shared.model, &profile, &val, vlen / 2, budget, opts.methods, &mut progress)?;
                progress.finish()?;
                if let Some(m) = t.meta.as_object_mut() {
                    m.insert("text".into(), json!(source));
                    m.insert("text_tokens".into(), json!(tokens.len()));
                    m.insert("windows".into(), json!(profile.windows));
                }
                Ok((t, Some(report)))
            }
        }
    }

    /// CATS (`density` 1) or hybrid thresholds from `texts`, for several `(density, keep)` pairs
    /// from one pass over the text: the superset as TDA at `density` (the length-aware profile of
    /// the text), and per layer the gate threshold that the fraction `keep` of the superset's gate
    /// values passes in dense continuations of the text's windows (half of each window runs
    /// densely and ranks the neurons).
    pub fn calibrate_gates(
        &self,
        texts: &[String],
        pairs: &[(f64, f64)],
        opts: &CalibrationOptions,
    ) -> Result<Vec<Thresholds>> {
        pairs.iter().try_for_each(|&(d, k)| check_density(d).and_then(|_| check_keep(k)))?;
        let layers = self.config().num_layers;
        let (tokens, source) = self.calibration_tokens(texts)?;
        let len = self.window_len(VALIDATION_LEN);
        let wins = windows(&tokens, &self.bos_prefix()?, len, opts.max_windows.max(1));
        if wins.is_empty() {
            return Err(Error::arg(format!(
                "calibration text is too short for gate calibration: {} tokens, need at least {len}",
                tokens.len()
            )));
        }
        let mut progress = Progress::new(opts.progress.clone());
        let profile = match pairs.iter().any(|&(d, _)| d < 1.0) {
            true => Some(self.profile(&tokens, opts, &mut progress)?),
            false => None,
        };
        let hist = self.gate_histogram(&wins, len, &mut progress)?;
        progress.finish()?;
        Ok(pairs
            .iter()
            .map(|&(density, keep)| {
                let mut t = match &profile {
                    Some(p) if density < 1.0 => p.thresholds(&vec![density; layers]),
                    _ => Thresholds::fixed(vec![0.0; layers]),
                };
                t.gate = (0..layers).map(|l| hist.threshold(l, density, keep)).collect();
                let method = if density < 1.0 { "hybrid" } else { "cats" };
                t.meta = json!({"method": method, "calibration": "keep", "density": density, "keep": keep,
                                "text": source, "text_tokens": tokens.len(), "windows": wins.len(),
                                "gate_pairs": hist.pairs});
                t
            })
            .collect())
    }

    /// The calibration text's tokens (the default corpus when `texts` is empty) and its description.
    fn calibration_tokens(&self, texts: &[String]) -> Result<(Vec<u32>, String)> {
        if texts.is_empty() {
            return Ok((self.tokenize(DEFAULT_CORPUS, false)?, "default corpus".into()));
        }
        Ok((self.tokenize(&texts.join("\n\n"), false)?, format!("{} text(s)", texts.len())))
    }

    /// Density calibration for several densities from one pass over the text.
    pub fn calibrate_densities(
        &self,
        texts: &[String],
        densities: &[f64],
        opts: &CalibrationOptions,
    ) -> Result<Vec<Thresholds>> {
        densities.iter().try_for_each(|&d| check_density(d))?;
        let (tokens, source) = self.calibration_tokens(texts)?;
        let mut progress = Progress::new(opts.progress.clone());
        let profile = self.profile(&tokens, opts, &mut progress)?;
        progress.finish()?;
        Ok(densities
            .iter()
            .map(|&d| {
                let mut t = profile.thresholds(&vec![d; self.config().num_layers]);
                t.meta = json!({"method": "tda", "calibration": "density", "density": d, "text": source,
                                "text_tokens": tokens.len(), "windows": profile.windows});
                t
            })
            .collect())
    }

    /// Runs `ids[..prefix_len]` densely (observing the FFN activations) for scoring the rest.
    pub fn prefill_scored(&self, ids: &[u32], prefix_len: usize) -> Result<Prefixed> {
        self.check_ids(ids, true)?;
        Prefixed::new(&self.shared.model, ids, prefix_len)
    }

    /// Log-probabilities of `ids[prefix_len..]` with the continuation run under `spec`'s mask
    /// (the first comes from the dense prefix), and the kept neurons per layer.
    pub fn score_prefixed(&self, p: &mut Prefixed, spec: &Sparsity) -> Result<Scored> {
        p.score(&self.resolve(spec)?)
    }

    /// Dense scoring of the continuation that also returns its FFN activation statistics.
    pub fn score_dense_energy(&self, p: &mut Prefixed) -> Result<(Vec<f32>, NeuronStats)> {
        p.dense_energy()
    }

    /// Log-probabilities of `ids[prefix_len..]` under each spec; `ids[..prefix_len]` run densely
    /// once and choose the masks. Returns, per spec, the log-probs and the kept neurons per layer.
    pub fn score(&self, ids: &[u32], prefix_len: usize, specs: &[Sparsity]) -> Result<Vec<Scored>> {
        let specs = specs.iter().map(|s| self.resolve(s)).collect::<Result<Vec<_>>>()?;
        let mut p = self.prefill_scored(ids, prefix_len)?;
        specs.iter().map(|s| self.score_prefixed(&mut p, s)).collect()
    }

    /// The TDA and GRIFFIN scores of every layer's neurons over a prompt.
    pub fn neuron_scores(&self, ids: &[u32]) -> Result<NeuronScores> {
        let st = self.observe_prompt(ids)?;
        let layers = self.config().num_layers;
        let (mut tda, mut griffin) = (Vec::with_capacity(layers), Vec::with_capacity(layers));
        for l in 0..layers {
            let (mut a, mut b) = (vec![], vec![]);
            st.stats.tda_scores(l, &mut a);
            st.stats.griffin_scores(l, &mut b);
            tda.push(a);
            griffin.push(b);
        }
        self.shared.model.return_state(st);
        Ok(NeuronScores { tda, griffin })
    }

    /// The neurons each layer keeps for a prompt under `spec`, ascending.
    pub fn select_neurons(&self, ids: &[u32], spec: &Sparsity) -> Result<Vec<Vec<u32>>> {
        let spec = self.resolve(spec)?;
        let mut st = self.observe_prompt(ids)?;
        let r = st.mask.select(&spec.selector()?, &st.stats);
        let n = self.config().intermediate_size as u32;
        let kept = (0..self.config().num_layers)
            .map(|l| st.mask.kept(l).map_or_else(|| (0..n).collect(), <[u32]>::to_vec))
            .collect();
        self.shared.model.return_state(st);
        r.map(|_| kept)
    }

    fn observe_prompt(&self, ids: &[u32]) -> Result<State> {
        self.check_ids(ids, true)?;
        let model = &self.shared.model;
        let mut st = model.take_state(ids.len(), ids.len())?;
        st.stats.reset();
        match model.forward(ids, 0, &mut st, FfnMode::Observe, Logits::None) {
            Ok(()) => Ok(st),
            Err(e) => {
                model.return_state(st);
                Err(e)
            }
        }
    }
}

/// The one `.gguf` file in a directory, if there is exactly one.
fn single_gguf_in(dir: &Path) -> Option<std::path::PathBuf> {
    let mut found = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")));
    let first = found.next()?;
    found.next().is_none().then_some(first)
}
