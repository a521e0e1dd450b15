//! The generation loop as a resumable state machine: dense prefill of the prompt, then one decode
//! step per token against the preallocated state, with sampling, stop conditions and streaming.

use super::detok::Detokenizer;
use super::sampler::{log_prob, Sampler, SamplingParams};
use super::stop::StopStrings;
use crate::error::{parse_json, read_text, Error, Result};
use crate::load::tokenizer::TextTokenizer;
use crate::model::{Batch, BatchRow, FfnMode, Logits, Model, State};
use crate::sparsity::Sparsity;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// What a caller asks for; `None` means "the model's default" (generation_config.json, else greedy).
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    pub max_new_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub logprobs: bool,
    /// Which FFN neurons decoding computes, chosen from the prompt (dense by default).
    pub sparsity: Sparsity,
}

/// Defaults from `generation_config.json`, as HF's `generate()` would apply them.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// EOS ids from generation_config.json, if it lists any.
    pub eos_token_ids: Vec<u32>,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self { max_new_tokens: 256, sampling: SamplingParams::greedy(), eos_token_ids: vec![] }
    }
}

impl GenerationDefaults {
    /// Reads `generation_config.json` from `dir` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let v: Value = parse_json(&read_text(&path, "generation config")?, &path)?;
        let num = |k: &str| v.get(k).and_then(Value::as_f64);
        let do_sample = v.get("do_sample").and_then(Value::as_bool).unwrap_or(false);
        let sampling = if do_sample {
            SamplingParams {
                temperature: num("temperature").unwrap_or(1.0) as f32,
                top_k: num("top_k").unwrap_or(50.0) as usize,
                top_p: num("top_p").unwrap_or(1.0) as f32,
                min_p: num("min_p").unwrap_or(0.0) as f32,
                repetition_penalty: num("repetition_penalty").unwrap_or(1.0) as f32,
            }
        } else {
            SamplingParams {
                repetition_penalty: num("repetition_penalty").unwrap_or(1.0) as f32,
                ..SamplingParams::greedy()
            }
        };
        let d = Self {
            max_new_tokens: num("max_new_tokens").map_or(256, |x| x as usize),
            sampling,
            eos_token_ids: crate::config::token_ids(v.get("eos_token_id")),
        };
        Resolved::check(&d.sampling).map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
        Ok(d)
    }
}

/// Options after defaults and validation.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub logprobs: bool,
    /// Resolved by the engine (`TdaDensity` replaced by thresholds).
    pub sparsity: Sparsity,
}

impl Resolved {
    pub fn new(o: &GenerateOptions, d: &GenerationDefaults, eos: &[u32], vocab: usize) -> Result<Self> {
        let max_new_tokens = match o.max_new_tokens {
            Some(n) if n < 0 => return Err(Error::arg(format!("max_new_tokens must be >= 0, got {n}"))),
            Some(n) => n as usize,
            None => d.max_new_tokens,
        };
        let dflt = &d.sampling;
        let top_k = match o.top_k {
            Some(k) if k < 0 => return Err(Error::arg(format!("top_k must be >= 0 (0 disables it), got {k}"))),
            Some(k) => k as usize,
            None => dflt.top_k,
        };
        let sampling = SamplingParams {
            temperature: o.temperature.map_or(dflt.temperature, |t| t as f32),
            top_k,
            top_p: o.top_p.map_or(dflt.top_p, |t| t as f32),
            min_p: o.min_p.map_or(dflt.min_p, |t| t as f32),
            repetition_penalty: o.repetition_penalty.map_or(dflt.repetition_penalty, |t| t as f32),
        };
        Self::check(&sampling)?;
        if let Some(s) = o.stop.iter().find(|s| s.is_empty()) {
            return Err(Error::arg(format!("stop strings must not be empty, got {s:?}")));
        }
        if let Some(&t) = o.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::arg(format!("stop_token_ids: id {t} is out of range for vocab_size {vocab}")));
        }
        let mut stop_token_ids = o.stop_token_ids.clone();
        if !o.ignore_eos {
            stop_token_ids.extend_from_slice(eos);
        }
        Ok(Self {
            max_new_tokens,
            sampling,
            seed: o.seed,
            stop: o.stop.clone(),
            stop_token_ids,
            logprobs: o.logprobs,
            sparsity: Sparsity::Dense,
        })
    }

    fn check(s: &SamplingParams) -> Result<()> {
        // Written so that NaN fails every check.
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return Err(Error::arg(format!("temperature must be >= 0 (0 = greedy), got {}", s.temperature)));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(Error::arg(format!("top_p must be in (0, 1], got {}", s.top_p)));
        }
        if !(0.0..=1.0).contains(&s.min_p) {
            return Err(Error::arg(format!("min_p must be in [0, 1], got {}", s.min_p)));
        }
        if !(s.repetition_penalty > 0.0 && s.repetition_penalty.is_finite()) {
            return Err(Error::arg(format!("repetition_penalty must be > 0, got {}", s.repetition_penalty)));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Tokens produced by decode steps (the first token comes from the prefill).
    pub decode_tokens: usize,
}

impl Timings {
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_s > 0.0 {
            self.decode_tokens as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub logprobs: Option<Vec<f32>>,
    pub timings: Timings,
    /// Neurons each FFN layer computed while decoding (`intermediate_size` when dense): with a
    /// per-token gate, the superset the gate ran over.
    pub ffn_active: Vec<usize>,
    /// The mean fraction of FFN weight bytes read per decoded token (1 when dense), as the
    /// kernels counted them ([`Model::ffn_bytes`]).
    pub ffn_bytes: f64,
}

/// One generation in progress. Holds a run state from the model's pool and gives it back on drop.
pub struct Generation {
    model: Arc<Model>,
    tokenizer: Arc<TextTokenizer>,
    state: Option<State>,
    prompt: Vec<u32>,
    opts: Resolved,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopStrings,
    /// Most tokens this generation may produce (max_new_tokens, cut to the context).
    limit: usize,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    text: String,
    emitted: usize,
    finish: Option<FinishReason>,
    flushed: bool,
    timings: Timings,
    ffn_active: Vec<usize>,
}

impl Generation {
    pub(crate) fn new(
        model: Arc<Model>,
        tokenizer: Arc<TextTokenizer>,
        prompt: Vec<u32>,
        opts: Resolved,
    ) -> Result<Self> {
        let cfg = &model.cfg;
        let limit = opts.max_new_tokens.min(cfg.max_position_embeddings - prompt.len());
        let state = model.take_state(prompt.len(), prompt.len() + limit)?;
        let mut sampler = Sampler::new(opts.sampling.clone(), opts.seed, cfg.vocab_size);
        prompt.iter().for_each(|&t| sampler.observe(t));
        let stops = StopStrings::new(opts.stop.clone());
        let finish = (limit == 0).then_some(FinishReason::Length);
        Ok(Self {
            state: Some(state),
            prompt,
            sampler,
            detok: Detokenizer::default(),
            stops,
            limit,
            tokens: Vec::with_capacity(limit),
            logprobs: Vec::with_capacity(if opts.logprobs { limit } else { 0 }),
            text: String::new(),
            emitted: 0,
            finish,
            flushed: false,
            timings: Timings::default(),
            ffn_active: vec![cfg.intermediate_size; cfg.num_layers],
            opts,
            tokenizer,
            model,
        })
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Advances by one token and returns the text that may now be shown (possibly empty: held back
    /// for a possible stop string or an incomplete character); `None` once everything was returned.
    pub fn step(&mut self) -> Result<Option<String>> {
        if self.finish.is_none() {
            let t0 = Instant::now();
            self.forward()?;
            let t = self.sample()?;
            self.record(t0.elapsed().as_secs_f64());
            self.accept(t)?;
        } else if self.flushed {
            return Ok(None);
        }
        Ok(Some(self.delta()))
    }

    /// The text that may now be shown, since the last call.
    fn delta(&mut self) -> String {
        let end = match self.finish {
            Some(_) => {
                self.flushed = true;
                self.text.len()
            }
            None => self.text.len() - self.stops.holdback(&self.text),
        };
        let delta = self.text[self.emitted..end.max(self.emitted)].to_string();
        self.emitted = end.max(self.emitted);
        delta
    }

    /// Runs to the end.
    pub fn run(mut self) -> Result<GenerationOutput> {
        while self.step()?.is_some() {}
        Ok(self.into_output())
    }

    pub fn into_output(mut self) -> GenerationOutput {
        GenerationOutput {
            text: std::mem::take(&mut self.text),
            token_ids: std::mem::take(&mut self.tokens),
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            prompt_tokens: self.prompt.len(),
            logprobs: self.opts.logprobs.then(|| std::mem::take(&mut self.logprobs)),
            timings: self.timings.clone(),
            ffn_active: std::mem::take(&mut self.ffn_active),
            ffn_bytes: match (&self.state, self.opts.sparsity.is_dense()) {
                (Some(st), false) => self.model.ffn_bytes(st),
                _ => 1.0,
            },
        }
    }

    /// Whether the next token comes from a decode step: the prompt has run, and it goes on.
    fn decoding(&self) -> bool {
        self.finish.is_none() && !self.tokens.is_empty()
    }

    /// The decode step's FFN mode.
    fn decode_mode(&self) -> FfnMode {
        if self.opts.sparsity.is_dense() {
            FfnMode::Dense
        } else {
            FfnMode::Sparse
        }
    }

    /// The prefill for the first token, a decode step for every later one; the logits stay in the
    /// state for [`Generation::sample`].
    fn forward(&mut self) -> Result<()> {
        let decode_mode = self.decode_mode();
        let st = self.state.as_mut().expect("state is held until drop");
        let model = &*self.model;
        match self.tokens.last() {
            None => {
                // Dense prefill; the FFNs observe the prompt and the mask is chosen from it.
                st.stats.reset();
                let mode = if self.opts.sparsity.is_dense() { FfnMode::Dense } else { FfnMode::Observe };
                model.forward(&self.prompt, 0, st, mode, Logits::Last)?;
                st.mask.select(&self.opts.sparsity.selector()?, &st.stats)?;
                self.ffn_active = st.mask.counts();
            }
            Some(&last) => {
                let pos = self.prompt.len() + self.tokens.len() - 1;
                model.forward(&[last], pos, st, decode_mode, Logits::Last)?;
            }
        }
        Ok(())
    }

    /// The next token from the logits of the last forward.
    fn sample(&mut self) -> Result<u32> {
        let st = self.state.as_mut().expect("state is held until drop");
        let model = &*self.model;
        // On a device, only the sampled id travels back, unless the host must see the logits.
        let on_device = match model.samples_on_device() && !self.opts.logprobs {
            true => self.sampler.device_draw().map(|d| model.sample_on_device(st, &d)).transpose()?.flatten(),
            false => None,
        };
        Ok(match on_device {
            Some(t) => t,
            None => {
                let logits = model.host_logits(st)?;
                let t = self.sampler.sample(logits);
                if self.opts.logprobs {
                    self.logprobs.push(log_prob(logits, t));
                }
                t
            }
        })
    }

    /// Counts `dt` seconds for the token about to be accepted: the prefill's or a decode step's.
    fn record(&mut self, dt: f64) {
        if self.tokens.is_empty() {
            self.timings.prefill_s = dt;
        } else {
            self.timings.decode_s += dt;
            self.timings.decode_tokens += 1;
        }
    }

    fn accept(&mut self, t: u32) -> Result<()> {
        self.tokens.push(t);
        self.sampler.observe(t);
        if self.opts.stop_token_ids.contains(&t) {
            self.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        let old = self.text.len();
        let delta = self.detok.push(&self.tokenizer, t)?;
        self.text.push_str(&delta);
        if let Some(i) = self.stops.find(&self.text, old) {
            self.text.truncate(i);
            self.finish = Some(FinishReason::Stop);
        } else if self.tokens.len() >= self.limit {
            self.finish = Some(FinishReason::Length);
        }
        Ok(())
    }
}

/// One step of several generations of one model at once; returns each one's text delta, as
/// [`Generation::step`] would. Those still to run their prompt prefill alone; those decoding take
/// one batched decode step together ([`Model::decode_batch`]: each weight is read once for all of
/// them), each under its own sparsity, then sample with their own samplers. `batch` needs a row per
/// decoding generation. Each decoding generation counts the whole batched step as its decode time.
pub fn step_many(gens: &mut [&mut Generation], batch: &mut Batch) -> Result<Vec<Option<String>>> {
    let Some(model) = gens.first().map(|g| g.model.clone()) else { return Ok(vec![]) };
    if gens.iter().any(|g| !Arc::ptr_eq(&g.model, &model)) {
        return Err(Error::arg("step_many: the generations belong to different engines"));
    }
    let decoding: Vec<usize> = (0..gens.len()).filter(|&i| gens[i].decoding()).collect();
    if decoding.len() > 1 {
        let t0 = Instant::now();
        let mut rows: Vec<BatchRow> = gens
            .iter_mut()
            .filter(|g| g.decoding())
            .map(|g| BatchRow {
                token: *g.tokens.last().expect("decoding"),
                position: g.prompt.len() + g.tokens.len() - 1,
                mode: g.decode_mode(),
                state: g.state.as_mut().expect("state is held until drop"),
            })
            .collect();
        model.decode_batch(&mut rows, batch)?;
        drop(rows);
        let dt = t0.elapsed().as_secs_f64();
        for &i in &decoding {
            let g = &mut *gens[i];
            let t = g.sample()?;
            g.record(dt);
            g.accept(t)?;
        }
    }
    gens.iter_mut()
        .enumerate()
        .map(|(i, g)| match decoding.len() > 1 && decoding.contains(&i) {
            true => Ok(Some(g.delta())),
            false => g.step(),
        })
        .collect()
}

impl Drop for Generation {
    fn drop(&mut self) {
        if let Some(st) = self.state.take() {
            self.model.return_state(st);
        }
    }
}
