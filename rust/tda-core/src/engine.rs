//! The engine: a loaded model, its tokenizer and generation defaults, and a pool of run states so
//! that several threads can generate at once.

use crate::config::{Arch, ModelConfig};
use crate::error::{read_text, Error, Result};
use crate::generate::session::Resolved;
use crate::generate::{GenerateOptions, Generation, GenerationDefaults, GenerationOutput};
use crate::load::safetensors::SafetensorsWeights;
use crate::load::tokenizer::{builtin_chat_template, TextTokenizer};
use crate::load::{gguf, gguf_tokenizer};
use crate::model::{Logits, Model, State};
use candle_core::DType;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// How many idle run states the engine keeps for reuse.
const POOL_SIZE: usize = 4;

pub struct Shared {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub defaults: GenerationDefaults,
    pub eos_token_ids: Vec<u32>,
    pub device: String,
    pool: Mutex<Vec<State>>,
}

impl Shared {
    /// A run state for `rows` tokens at once and `capacity` positions: a pooled one if it fits.
    pub(crate) fn take_state(&self, rows: usize, capacity: usize) -> State {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        match pool.iter().position(|s| s.fits(rows, capacity)) {
            Some(i) => pool.swap_remove(i),
            None => {
                drop(pool);
                self.model.new_state(rows, capacity)
            }
        }
    }

    pub(crate) fn return_state(&self, st: State) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.push(st);
        if pool.len() > POOL_SIZE {
            // Drop the smallest.
            let i = (0..pool.len()).min_by_key(|&i| pool[i].capacity() * pool[i].rows()).unwrap_or(0);
            pool.swap_remove(i);
        }
    }
}

#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

/// Parses a dtype name: float32/f32/fp32, bfloat16/bf16, float16/f16/fp16/half, or "auto"
/// (`None`: the dtype the checkpoint declares).
pub fn parse_dtype(s: &str) -> Result<Option<DType>> {
    Ok(Some(match s.to_ascii_lowercase().as_str() {
        "float32" | "f32" | "fp32" => DType::F32,
        "bfloat16" | "bf16" => DType::BF16,
        "float16" | "f16" | "fp16" | "half" => DType::F16,
        "auto" => return Ok(None),
        _ => {
            return Err(Error::arg(format!("unknown dtype '{s}'; expected 'float32', 'bfloat16', 'float16' or 'auto'")))
        }
    }))
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "other",
    }
}

/// Checks a device name. Only the CPU is built in so far.
pub fn parse_device(s: &str) -> Result<String> {
    let lower = s.to_ascii_lowercase();
    if lower == "cpu" {
        return Ok(lower);
    }
    if lower == "cuda" || lower.starts_with("cuda:") {
        return Err(Error::arg(format!(
            "device '{s}' is not available: this build of tda-engine has no CUDA support; use 'cpu'"
        )));
    }
    Err(Error::arg(format!("unknown device '{s}'; expected 'cpu' or 'cuda[:N]'")))
}

impl Engine {
    /// Loads a model: an HF directory (config.json, safetensors, tokenizer.json, ...), a `.gguf`
    /// file, or a directory holding exactly one `.gguf` file and no config.json.
    pub fn from_pretrained(path: &Path, device: &str, dtype: &str) -> Result<Self> {
        let device = parse_device(device)?;
        let dtype = parse_dtype(dtype)?;
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
            cfg.declared_dtype.as_deref().and_then(|d| parse_dtype(d).ok().flatten()).unwrap_or(DType::F32)
        });
        let model = Model::load(cfg, &weights, dtype)?;
        Ok(Self::assemble(model, tokenizer, defaults, vec![], device))
    }

    /// A GGUF file: weights dequantized to `dtype` ("auto" = float32), tokenizer from the metadata.
    fn from_gguf(path: &Path, device: String, dtype: Option<DType>) -> Result<Self> {
        let file = gguf::GgufFile::open(path)?;
        let cfg = file.config()?;
        let mut tokenizer = gguf_tokenizer::from_gguf(file.metadata())?;
        if tokenizer.chat_template.is_none() {
            tokenizer.chat_template = builtin_chat_template(cfg.arch).map(str::to_string);
        }
        let model = Model::load(cfg, &file, dtype.unwrap_or(DType::F32))?;
        // Generation also ends at the end-of-turn tokens llama.cpp stops at, and at Gemma's
        // <end_of_turn> (HF's generation_config for Gemma lists it as an EOS).
        let mut end_of_turn: Vec<u32> = ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
            .iter()
            .filter_map(|k| file.metadata().get(*k).and_then(|v| v.to_u32().ok()))
            .collect();
        if matches!(model.cfg.arch, Arch::Gemma | Arch::Gemma2 | Arch::Gemma3) {
            end_of_turn.extend(tokenizer.token_to_id("<end_of_turn>"));
        }
        Ok(Self::assemble(model, tokenizer, GenerationDefaults::default(), end_of_turn, device))
    }

    /// Generation ends at the EOS ids of generation_config.json, else config.json, else the
    /// tokenizer's EOS token, plus any `end_of_turn` ids.
    fn assemble(
        model: Model,
        tokenizer: TextTokenizer,
        defaults: GenerationDefaults,
        end_of_turn: Vec<u32>,
        device: String,
    ) -> Self {
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
                model,
                tokenizer,
                defaults,
                eos_token_ids: eos,
                device,
                pool: Mutex::new(vec![]),
            }),
        }
    }

    pub fn model(&self) -> &Model {
        &self.shared.model
    }
    pub fn config(&self) -> &ModelConfig {
        &self.shared.model.cfg
    }
    pub fn dtype(&self) -> DType {
        self.shared.model.dtype
    }
    pub fn device(&self) -> &str {
        &self.shared.device
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
        let mut st = self.shared.take_state(ids.len(), ids.len());
        let mut out = vec![0f32; ids.len() * v];
        let r = self.shared.model.forward(ids, 0, &mut st, Logits::All(&mut out));
        self.shared.return_state(st);
        r.map(|_| out)
    }

    /// Starts a generation; drive it with [`Generation::step`] or [`Generation::run`].
    pub fn start(&self, prompt: Vec<u32>, opts: &GenerateOptions) -> Result<Generation> {
        self.check_ids(&prompt, true)?;
        let cfg = &self.shared.model.cfg;
        let resolved = Resolved::new(opts, &self.shared.defaults, &self.shared.eos_token_ids, cfg.vocab_size)?;
        Generation::new(self.shared.clone(), prompt, resolved)
    }

    pub fn generate(&self, prompt: Vec<u32>, opts: &GenerateOptions) -> Result<GenerationOutput> {
        self.start(prompt, opts)?.run()
    }

    /// Renders messages with the chat template and tokenizes the result (the template adds BOS).
    pub fn chat_prompt(&self, messages: &serde_json::Value, add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.shared.tokenizer.apply_chat_template(messages, add_generation_prompt)?;
        self.tokenize(&text, false)
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
