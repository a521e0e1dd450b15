//! The decoder stack. One `forward` serves prefill (many rows, GEMMs) and decode (one row, GEMVs),
//! on whichever backend holds the weights:
//!
//! ```text
//! x = embed(tokens) [* sqrt(hidden)]
//! for each layer:
//!     h = attn(norm(x));  [h = post_attn_norm(h)];  x = x + h
//!     h = ffn(norm(x));   [h = post_ffn_norm(h)];   x = x + h
//! logits = cap(norm(x) W_lm^T)
//! ```
//!
//! [`Model::decode_batch`] runs one decode step of several sequences at once, one row each, so
//! that every weight is read once per step: the projections and the dense FFN take all the rows,
//! and each sequence attends over its own cache at its own position (and runs its sparse FFN, if
//! it decodes sparsely, under its own mask).

use super::attention::{Attention, AttnBuffers};
use super::ffn::{Ffn, FfnMode};
use super::linear::{load_matrix, Linear};
use super::norm::RmsNorm;
use super::state::{Batch, State};
use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::kernels::{Backend, Buf, Draw, Matrix};
use crate::load::{Precision, WeightSource};
use candle_core::DType;
use std::sync::{Arc, Mutex};

/// How many idle run states a model keeps for reuse.
const POOL_SIZE: usize = 4;

pub struct Layer {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub post_attn_norm: Option<RmsNorm>,
    pub ffn_norm: RmsNorm,
    pub ffn: Ffn,
    pub post_ffn_norm: Option<RmsNorm>,
}

pub struct Model {
    pub cfg: ModelConfig,
    /// The float dtype: of the float weight matrices, and f32 for quantized models.
    pub dtype: DType,
    /// How the weights were asked for at load (a float dtype, a block type, or as stored).
    pub precision: Precision,
    /// Where the weights live and the kernels run.
    pub be: Arc<dyn Backend>,
    /// `(vocab, hidden)`.
    pub embed: Matrix,
    pub layers: Vec<Layer>,
    pub final_norm: RmsNorm,
    /// `(vocab, hidden)`; shares storage with `embed` when the embeddings are tied.
    pub lm_head: Linear,
    /// The LM head is the embedding matrix.
    tied: bool,
    /// Idle run states, reused by later calls (so that several threads can run at once).
    pool: Mutex<Vec<State>>,
    /// The logits live on a device (not the CPU), where sampling reads them.
    on_device: bool,
}

/// One sequence of a batched decode step ([`Model::decode_batch`]).
pub struct BatchRow<'a> {
    /// The sequence's run state: its cache, rope tables, mask and FFN scratch; its `logits` receive
    /// the step's logits.
    pub state: &'a mut State,
    /// The token to decode, at position `position` (the number of positions already cached).
    pub token: u32,
    pub position: usize,
    /// [`FfnMode::Dense`], or [`FfnMode::Sparse`] under the state's mask.
    pub mode: FfnMode,
}

/// Which logits a forward pass produces.
pub enum Logits<'a> {
    /// None (the hidden states are all that is wanted, e.g. collecting statistics).
    None,
    /// Only the last token's, into `State::logits`.
    Last,
    /// Every token's, `rows x vocab`, into this vector (resized to fit).
    All(&'a mut Vec<f32>),
}

impl Model {
    /// Builds the model from HF-named tensors, converting them to `dtype`, in `be`'s memory.
    pub fn load(
        cfg: ModelConfig,
        src: &dyn WeightSource,
        precision: impl Into<Precision>,
        be: Arc<dyn Backend>,
    ) -> Result<Self> {
        let precision = precision.into();
        let dtype = precision;
        let prefix = ["model.", "model.language_model.", "language_model.model."]
            .into_iter()
            .find(|p| src.contains(&format!("{p}embed_tokens.weight")))
            .ok_or_else(|| Error::model("missing tensor 'model.embed_tokens.weight' in the checkpoint"))?;
        // The config's layer count is checked against the checkpoint before any weight is read: a
        // config claiming more layers than the file holds fails at once, not after loading them all.
        // (Every other count is checked by the shape of the first tensor it sizes, which the sources
        // compare before reading.)
        let last = format!("{prefix}layers.{}.input_layernorm.weight", cfg.num_layers - 1);
        if !src.contains(&last) {
            return Err(Error::model(format!(
                "num_hidden_layers is {}, but the checkpoint has no tensor '{last}': its layers end before that",
                cfg.num_layers
            )));
        }
        let b = &*be;
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let sizes = |e: Error| match e {
            Error::InvalidModel(m) if m.contains("expected") => Error::model(format!(
                "{m}: the config's sizes do not match the checkpoint (vocab_size {v}, hidden_size {d}, \
                 intermediate_size {}, num_attention_heads {}, num_key_value_heads {}, head_dim {})",
                cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            )),
            e => e,
        };
        let embed = load_matrix(b, src, &format!("{prefix}embed_tokens.weight"), v, d, dtype).map_err(sizes)?;
        let norm = |name: &str| RmsNorm::load(b, src, name, d, cfg.norm, cfg.rms_norm_eps);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("{prefix}layers.{i}");
            let sandwich = cfg.sandwich_norm;
            layers.push(Layer {
                attn_norm: norm(&format!("{p}.input_layernorm"))?,
                attn: Attention::load(b, src, &format!("{p}.self_attn"), &cfg, i, dtype).map_err(sizes)?,
                post_attn_norm: sandwich.then(|| norm(&format!("{p}.post_attention_layernorm"))).transpose()?,
                ffn_norm: norm(&format!(
                    "{p}.{}",
                    if sandwich { "pre_feedforward_layernorm" } else { "post_attention_layernorm" }
                ))?,
                ffn: Ffn::load(b, src, &format!("{p}.mlp"), &cfg, dtype).map_err(sizes)?,
                post_ffn_norm: sandwich.then(|| norm(&format!("{p}.post_feedforward_layernorm"))).transpose()?,
            });
        }
        let final_norm = norm(&format!("{prefix}norm"))?;
        // Gemma always ties its embeddings, whatever the config says, when there is no lm_head.
        let gemma_tied =
            matches!(cfg.arch, Arch::Gemma | Arch::Gemma2 | Arch::Gemma3) && !src.contains("lm_head.weight");
        let tied = cfg.tie_word_embeddings || gemma_tied;
        let lm_weight = if tied { embed.clone() } else { load_matrix(b, src, "lm_head.weight", v, d, dtype)? };
        let lm_head = Linear { weight: lm_weight, bias: None, in_dim: d, out_dim: v };
        let on_device = be.device() != "cpu";
        let dtype = precision.float_dtype();
        Ok(Self {
            cfg,
            dtype,
            precision,
            be,
            embed,
            layers,
            final_norm,
            lm_head,
            tied,
            pool: Mutex::new(vec![]),
            on_device,
        })
    }

    /// `cpu` or `cuda:N`.
    pub fn device(&self) -> String {
        self.be.device()
    }

    /// Bytes of weights one decode step reads: every projection, the LM head and the norms
    /// (the embedding lookup reads one row and is not counted).
    pub fn decode_weight_bytes(&self) -> usize {
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.attn;
                let projections = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj];
                projections.iter().map(|p| p.weight.bytes()).sum::<usize>() + l.ffn.dense_bytes()
            })
            .sum();
        let norms = (self.layers.len() * 4 + 1) * self.cfg.hidden_size * 4;
        per_layer + self.lm_head.weight.bytes() + norms
    }

    /// The mean fraction of the FFN weight bytes of a dense decode step that one sparse token row
    /// read under `st`'s mask, as delivered: the kept rows of every layer, and for gated layers the
    /// gate rows of the kept neurons plus the up and down rows of those that passed, counted by
    /// the kernels since the selection. A gated layer that has run no sparse row yet counts all of
    /// its kept neurons.
    pub fn ffn_bytes(&self, st: &State) -> f64 {
        let m = &st.mask;
        let counts = m.counts();
        let (mut read, mut dense) = (0f64, 0f64);
        for (l, layer) in self.layers.iter().enumerate() {
            let f = &layer.ffn;
            dense += f.dense_bytes() as f64;
            read += if m.layer_dense(l) {
                f.dense_bytes() as f64
            } else if m.gate(l) == 0.0 {
                (counts[l] * f.bytes_per_neuron()) as f64
            } else {
                let passed = match self.be.ffn_counts(&st.ffn[l], m.version()) {
                    Some((rows, passed)) if rows > 0 => passed as f64 / rows as f64,
                    _ => counts[l] as f64,
                };
                let (g, ud) = (f.gate.weight.row_bytes(), f.up.weight.row_bytes() + f.down_t.row_bytes());
                counts[l] as f64 * g as f64 + passed * ud as f64
            };
        }
        read / dense.max(1.0)
    }

    /// Bytes of FFN weights a dense decode step reads.
    pub fn ffn_dense_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.ffn.dense_bytes()).sum()
    }

    /// Bytes of all of layer `l`'s gate rows, and of all its up and down rows, as sparse decoding
    /// reads them, each as a fraction of the bytes dense decoding reads.
    pub fn ffn_costs(&self, l: usize) -> (f64, f64) {
        let f = &self.layers[l].ffn;
        let (n, dense) = (f.neurons() as f64, f.dense_bytes().max(1) as f64);
        let gate = f.gate.weight.row_bytes() as f64;
        let rest = (f.up.weight.row_bytes() + f.down_t.row_bytes()) as f64;
        (n * gate / dense, n * rest / dense)
    }

    /// Bytes of the weight matrices the model holds, per storage type (`q4_1`, `float32`, ...;
    /// a tied LM head counted once, a quantized FFN's requantized `Wd^T` included).
    pub fn weight_types(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut m = std::collections::BTreeMap::new();
        let mut add = |w: &Matrix| *m.entry(w.type_name()).or_insert(0) += w.bytes();
        add(&self.embed);
        if !self.tied {
            add(&self.lm_head.weight);
        }
        for l in &self.layers {
            let a = &l.attn;
            for p in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &l.ffn.gate, &l.ffn.up] {
                add(&p.weight);
            }
            add(&l.ffn.down_t);
            if let Some(d) = &l.ffn.down {
                add(d);
            }
        }
        m
    }

    /// Bytes of all FFN weights.
    pub fn ffn_weight_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.ffn.neurons() * l.ffn.bytes_per_neuron()).sum()
    }

    /// `||Wd[:, j]||^2` for every neuron `j` of every layer (one pass over the down projections).
    pub fn down_row_norms(&self) -> Result<Vec<Vec<f64>>> {
        self.layers.iter().map(|l| self.be.row_sq_norms(&l.ffn.down_t)).collect()
    }

    /// A new run state for `rows` tokens at once and `capacity` positions.
    pub fn new_state(&self, rows: usize, capacity: usize) -> Result<State> {
        State::new(&self.cfg, &*self.be, rows, capacity)
    }

    /// A run state for `rows` tokens at once and `capacity` positions: a pooled one if it fits.
    /// When a new one does not fit the device's memory, the idle states are freed and it is tried
    /// once more; the error stands if it still does not fit.
    pub fn take_state(&self, rows: usize, capacity: usize) -> Result<State> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pool.iter().position(|s| s.fits(rows, capacity)) {
            return Ok(pool.swap_remove(i));
        }
        drop(pool);
        match self.new_state(rows, capacity) {
            Err(Error::OutOfMemory(_)) if !self.pool.lock().unwrap_or_else(|p| p.into_inner()).is_empty() => {
                self.clear_pool();
                self.new_state(rows, capacity)
            }
            r => r,
        }
    }

    /// Gives a state back for reuse (the smallest is dropped when the pool is full).
    pub fn return_state(&self, st: State) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.push(st);
        if pool.len() > POOL_SIZE {
            let i = (0..pool.len()).min_by_key(|&i| pool[i].capacity() * pool[i].rows()).unwrap_or(0);
            pool.swap_remove(i);
        }
    }

    /// Drops every idle run state (e.g. to free device memory after an out-of-memory error).
    pub fn clear_pool(&self) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Runs `tokens` at positions `start..start + tokens.len()` through the model, appending their
    /// keys and values to the state's cache. `mode` says what the FFNs do besides their output:
    /// observe the prompt's activations (added to `st.stats`), or compute only the neurons of the
    /// state's mask. Token ids must be `< vocab_size` and the positions must fit the state (checked
    /// by the caller; violations return an error, never panic).
    pub fn forward(
        &self,
        tokens: &[u32],
        start: usize,
        st: &mut State,
        mode: FfnMode,
        logits: Logits<'_>,
    ) -> Result<()> {
        let mut logits = Some(logits);
        self.be.in_pool(&mut || match logits.take() {
            Some(l) => self.forward_here(tokens, start, st, mode, l),
            None => Err(Error::Internal("a forward pass ran twice".into())),
        })
    }

    /// [`Model::forward`] on the calling thread.
    fn forward_here(
        &self,
        tokens: &[u32],
        start: usize,
        st: &mut State,
        mode: FfnMode,
        logits: Logits<'_>,
    ) -> Result<()> {
        let n = tokens.len();
        if n == 0 || n > st.rows() || start + n > st.capacity() {
            return Err(Error::Internal(format!(
                "forward of {n} tokens at {start} does not fit a state of {} rows x {} positions",
                st.rows(),
                st.capacity()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::arg(format!("token id {bad} is out of range for vocab_size {}", self.cfg.vocab_size)));
        }
        let be = &*self.be;
        let _device = be.exclusive();

        // What the kernels read besides the weights: the step, the kept neurons, a zeroed accumulator.
        be.set_step(&mut st.step, tokens, start)?;
        if mode == FfnMode::Sparse {
            self.prepare_sparse(st)?;
        }
        if mode == FfnMode::Observe {
            be.fill_zero(&mut st.stats_acc, st.stats_host.len())?;
        }

        match logits {
            // A decode step: the same kernels every token, so a device backend may replay a recording.
            Logits::Last if n == 1 && mode != FfnMode::Histogram => {
                let mut graphs = st.graphs.take();
                let r = be.run_graph(&mut graphs, mode as u64, &mut || self.run(st, n, mode, Read::Last));
                st.graphs = graphs;
                r?;
            }
            Logits::Last => self.run(st, n, mode, Read::Last)?,
            Logits::None => self.run(st, n, mode, Read::Nothing)?,
            Logits::All(out) => {
                self.run(st, n, mode, Read::All)?;
                let v = self.cfg.vocab_size;
                self.final_norm.forward(be, &st.x, n, &mut st.xb)?;
                out.resize(n * v, 0.0);
                let mut b = be.output_buf(std::mem::take(out))?;
                let r = self.lm_head.forward(be, &st.xb, n, &mut b).and_then(|_| self.soft_cap(&mut b, n * v));
                be.read_output(b, out)?;
                r?;
            }
        }

        if mode == FfnMode::Observe {
            be.download(&st.stats_acc, &mut st.stats_host)?;
            st.stats.add(n, &st.stats_host);
        }
        Ok(())
    }

    /// The layers over the step's `n` rows; with [`Read::Last`], the last row's logits into
    /// `st.logits`; with [`Read::All`], every row's final hidden state stays in `st.x`.
    ///
    /// The cache needs every row's keys and values from every layer, but of the last layer's
    /// output only the rows that are read. Unless the FFN statistics are being collected, its FFN
    /// runs on none of the rows, or on the last ones alone (moved to the top; llama.cpp prunes the
    /// same way) where the backend's products are [`Backend::row_exact`], so that the logits are
    /// bitwise those of the whole product.
    fn run(&self, st: &mut State, n: usize, mode: FfnMode, read: Read) -> Result<()> {
        let be = &*self.be;
        let d = self.cfg.hidden_size;
        be.embed(&self.embed, &st.step, n, self.cfg.embed_scale, &mut st.x)?;
        let n_ffn = self.cfg.intermediate_size;
        let last_layer = self.layers.len() - 1;
        let mut rows = n;
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention sub-block.
            layer.attn_norm.forward(be, &st.x, n, &mut st.xb)?;
            let (k_cache, v_cache) = st.cache.layer_mut(li);
            let bufs = AttnBuffers { q: &mut st.q, k: &mut st.k, v: &mut st.v, ctx: &mut st.ctx, k_cache, v_cache };
            layer.attn.forward(be, &st.xb, n, &st.step, &st.ropes, bufs, &mut st.out)?;
            self.residual(layer.post_attn_norm.as_ref(), &mut st.x, &mut st.out, n)?;
            if li == last_layer && !mode.observes() && n > 1 {
                match read {
                    Read::All => {}
                    Read::Nothing => break,
                    // The last two rows, not one: a single row would take decode's matrix-vector
                    // products, whose sums are ordered differently.
                    Read::Last if be.row_exact() && n > 2 => {
                        be.copy(&st.x, (n - 2) * d, &mut st.out, 0, 2 * d)?;
                        be.copy(&st.out, 0, &mut st.x, 0, 2 * d)?;
                        rows = 2;
                    }
                    Read::Last => {}
                }
            }

            // FFN sub-block.
            layer.ffn_norm.forward(be, &st.x, rows, &mut st.xb)?;
            let (xb, out, bufs) = st.ffn_io(li, n_ffn);
            layer.ffn.forward(be, xb, rows, mode, bufs, out)?;
            self.residual(layer.post_ffn_norm.as_ref(), &mut st.x, &mut st.out, rows)?;
        }
        if read == Read::Last {
            let v = self.cfg.vocab_size;
            be.copy(&st.x, (rows - 1) * d, &mut st.out, 0, d)?;
            self.final_norm.forward(be, &st.out, 1, &mut st.xb)?;
            if rows > 1 {
                // A prefill's logits keep their activations in f32, as every other product of the
                // prefill does: decode's matrix-vector product on quantized weights would round
                // them to 8 bits. The first token is then the float model's.
                be.linear_exact(&self.lm_head.weight, self.lm_head.bias.as_ref(), &st.xb, &mut st.logits)?;
            } else {
                self.lm_head.forward(be, &st.xb, 1, &mut st.logits)?;
            }
            self.soft_cap(&mut st.logits, v)?;
        }
        Ok(())
    }

    /// One decode step of several sequences at once: sequence `i` decodes `seqs[i].token` at
    /// `seqs[i].position`, appending its keys and values to its own cache, and receives its logits
    /// in its state's `logits` (where [`Model::host_logits`] and [`Model::sample_on_device`] read
    /// them). `batch` holds the step's rows (at least `seqs.len()`; [`Model::new_batch`]).
    ///
    /// Every weight is read once for all the rows: the norms, the q/k/v and output projections, the
    /// dense FFN and the LM head run over `seqs.len()` rows; rope, the cache write and attention run
    /// per sequence, over its cache at its position. A sequence decoding sparsely runs its row
    /// through its own mask's FFN; when any sequence decodes dense, the dense FFN product takes
    /// every row (one read of the weights) and the sparse rows' outputs are then replaced by theirs.
    ///
    /// The inputs are checked before anything runs: at least one sequence and no more than the
    /// batch's rows, token ids below `vocab_size`, every position within its state's capacity, and
    /// modes `Dense` or `Sparse`; an error otherwise, with every state as it was.
    pub fn decode_batch(&self, seqs: &mut [BatchRow<'_>], batch: &mut Batch) -> Result<()> {
        let b = seqs.len();
        if b == 0 || b > batch.rows() {
            return Err(Error::arg(format!(
                "a batched step of {b} sequences does not fit a batch of {} rows",
                batch.rows()
            )));
        }
        if !batch.matches(&self.cfg) {
            return Err(Error::arg("the batch was made for a model of other sizes"));
        }
        for (i, s) in seqs.iter().enumerate() {
            if s.token as usize >= self.cfg.vocab_size {
                return Err(Error::arg(format!(
                    "sequence {i}: token id {} is out of range for vocab_size {}",
                    s.token, self.cfg.vocab_size
                )));
            }
            if s.position >= s.state.capacity() {
                return Err(Error::arg(format!(
                    "sequence {i}: position {} does not fit its state of {} positions",
                    s.position,
                    s.state.capacity()
                )));
            }
            if !matches!(s.mode, FfnMode::Dense | FfnMode::Sparse) {
                return Err(Error::arg(format!(
                    "sequence {i}: a batched step decodes Dense or Sparse, not {:?}",
                    s.mode
                )));
            }
        }
        self.be.in_pool(&mut || self.decode_batch_here(seqs, batch))
    }

    /// [`Model::decode_batch`] on the calling thread, its inputs checked.
    fn decode_batch_here(&self, seqs: &mut [BatchRow<'_>], batch: &mut Batch) -> Result<()> {
        let be = &*self.be;
        let _device = be.exclusive();
        let (b, d, v) = (seqs.len(), self.cfg.hidden_size, self.cfg.vocab_size);
        let (qd, kvd, n_ffn) = (self.cfg.q_dim(), self.cfg.kv_dim(), self.cfg.intermediate_size);

        batch.tokens.clear();
        batch.tokens.extend(seqs.iter().map(|s| s.token));
        be.set_step(&mut batch.rows.step, &batch.tokens, 0)?;
        for s in seqs.iter_mut() {
            be.set_step(&mut s.state.step, &[s.token], s.position)?;
            if s.mode == FfnMode::Sparse {
                self.prepare_sparse(s.state)?;
            }
        }
        let any_dense = seqs.iter().any(|s| s.mode == FfnMode::Dense);
        let rows = &mut batch.rows;

        be.embed(&self.embed, &rows.step, b, self.cfg.embed_scale, &mut rows.x)?;
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention: the projections over every row, each sequence's row attending over its cache.
            layer.attn_norm.forward(be, &rows.x, b, &mut rows.xb)?;
            layer.attn.project(be, &rows.xb, b, [&mut rows.q, &mut rows.k, &mut rows.v])?;
            for (i, s) in seqs.iter_mut().enumerate() {
                let st = &mut *s.state;
                be.copy(&rows.q, i * qd, &mut st.q, 0, qd)?;
                be.copy(&rows.k, i * kvd, &mut st.k, 0, kvd)?;
                be.copy(&rows.v, i * kvd, &mut st.v, 0, kvd)?;
                let (k_cache, v_cache) = st.cache.layer_mut(li);
                let bufs = AttnBuffers { q: &mut st.q, k: &mut st.k, v: &mut st.v, ctx: &mut st.ctx, k_cache, v_cache };
                let ctx = layer.attn.attend(be, 1, &st.step, &st.ropes, bufs)?;
                be.copy(ctx, 0, &mut rows.ctx, i * qd, qd)?;
            }
            layer.attn.output(be, &rows.ctx, b, &mut rows.out)?;
            self.residual(layer.post_attn_norm.as_ref(), &mut rows.x, &mut rows.out, b)?;

            // FFN: the dense product over every row, then each sparse row under its own mask.
            layer.ffn_norm.forward(be, &rows.x, b, &mut rows.xb)?;
            if any_dense {
                let (xb, out, bufs) = rows.ffn_io(li, n_ffn);
                layer.ffn.forward(be, xb, b, FfnMode::Dense, bufs, out)?;
            }
            for (i, s) in seqs.iter_mut().enumerate().filter(|(_, s)| s.mode == FfnMode::Sparse) {
                let st = &mut *s.state;
                be.copy(&rows.xb, i * d, &mut st.xb, 0, d)?;
                let (xb, out, bufs) = st.ffn_io(li, n_ffn);
                layer.ffn.forward(be, xb, 1, FfnMode::Sparse, bufs, out)?;
                be.copy(&st.out, 0, &mut rows.out, i * d, d)?;
            }
            self.residual(layer.post_ffn_norm.as_ref(), &mut rows.x, &mut rows.out, b)?;
        }

        self.final_norm.forward(be, &rows.x, b, &mut rows.xb)?;
        self.lm_head.forward(be, &rows.xb, b, &mut batch.logits)?;
        self.soft_cap(&mut batch.logits, b * v)?;
        for (i, s) in seqs.iter_mut().enumerate() {
            be.copy(&batch.logits, i * v, &mut s.state.logits, 0, v)?;
        }
        Ok(())
    }

    /// The activations of a batched decode step of up to `rows` sequences.
    pub fn new_batch(&self, rows: usize) -> Result<Batch> {
        Batch::new(&self.cfg, &*self.be, rows)
    }

    /// Makes every layer's FFN scratch in `st` hold the state's mask, where sparse decoding reads it.
    fn prepare_sparse(&self, st: &mut State) -> Result<()> {
        for (l, layer) in self.layers.iter().enumerate() {
            let m = &st.mask;
            self.be.prepare_ffn(
                &layer.ffn.weights(),
                m.kept(l),
                m.keep_row(l),
                m.gate(l),
                m.version(),
                &mut st.ffn[l],
            )?;
        }
        Ok(())
    }

    /// `x += post_norm(out)` over `rows` rows (the sub-block's output normalised in place first).
    fn residual(&self, post_norm: Option<&RmsNorm>, x: &mut Buf, out: &mut Buf, rows: usize) -> Result<()> {
        if let Some(pn) = post_norm {
            pn.forward_inplace(&*self.be, out, rows)?;
        }
        self.be.add(x, out, rows * self.cfg.hidden_size)
    }

    fn soft_cap(&self, logits: &mut Buf, len: usize) -> Result<()> {
        match self.cfg.final_softcap {
            Some(cap) => self.be.soft_cap(logits, cap, len),
            None => Ok(()),
        }
    }

    /// The last forward's logits (`vocab`) in host memory: read from the device if they live there.
    pub fn host_logits<'s>(&self, st: &'s mut State) -> Result<&'s [f32]> {
        if matches!(st.logits, Buf::Host(_)) {
            return st.logits.host();
        }
        self.be.download(&st.logits, &mut st.logits_host)?;
        Ok(&st.logits_host)
    }

    /// Whether the logits stay on a device, where [`Model::sample_on_device`] can draw from them.
    pub fn samples_on_device(&self) -> bool {
        self.on_device
    }

    /// Draws the next token from the last forward's logits on the device (the argmax when the
    /// temperature is 0): only the id is read back. `None` when the backend cannot.
    pub fn sample_on_device(&self, st: &State, draw: &Draw) -> Result<Option<u32>> {
        let v = self.cfg.vocab_size;
        if draw.temperature == 0.0 {
            return self.be.argmax(&st.logits, v).map(Some);
        }
        self.be.sample(&st.logits, v, draw).transpose()
    }
}

/// Which rows of the last layer's output a forward reads ([`Model::run`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    All,
    Last,
    Nothing,
}
