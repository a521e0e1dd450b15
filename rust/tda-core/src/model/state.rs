//! Preallocated run state: activation buffers for up to `rows` tokens, the KV cache, and the rope
//! tables for `capacity` positions, all in the backend's memory. Decoding reuses it token after
//! token without allocating. A [`Batch`] holds the activations of one batched decode step over
//! several sequences (each of which keeps its own `State`).

use super::ffn::FfnBuffers;
use super::kv_cache::KvCache;
use super::rope::RopeTable;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::{Backend, Buf, FfnScratch, Graphs, Step};
use crate::sparsity::gate::GateHistogram;
use crate::sparsity::{NeuronMask, NeuronStats};

pub struct State {
    rows: usize,
    /// Residual stream, `rows x hidden`.
    pub x: Buf,
    /// Normalised input of a sub-block, `rows x hidden`.
    pub xb: Buf,
    /// Output of a sub-block, `rows x hidden`.
    pub out: Buf,
    pub q: Buf,
    pub k: Buf,
    pub v: Buf,
    /// Attention context before the output projection, `rows x q_dim`.
    pub ctx: Buf,
    /// FFN intermediate activation and scratch, `rows x intermediate`.
    pub ffn_a: Buf,
    pub ffn_u: Buf,
    /// The token ids and first position of the forward under way.
    pub step: Step,
    /// Per layer, the kept neurons where the backend's sparse kernels read them.
    pub ffn: Vec<FfnScratch>,
    /// Statistics of one observing forward, `layers x 2 x intermediate`, before they are added to `stats`.
    pub stats_acc: Buf,
    pub(crate) stats_host: Vec<f32>,
    /// Statistics of the prompt's FFN activations (filled by an observing prefill).
    pub stats: NeuronStats,
    /// The neurons sparse decoding keeps.
    pub mask: NeuronMask,
    /// Gate calibration's histogram while [`FfnMode::Histogram`] forwards run.
    ///
    /// [`FfnMode::Histogram`]: super::FfnMode::Histogram
    pub gate_hist: Option<Box<GateHistogram>>,
    /// Logits of the last token, `vocab`.
    pub logits: Buf,
    pub(crate) logits_host: Vec<f32>,
    pub cache: KvCache,
    pub ropes: Vec<RopeTable>,
    /// The backend's recordings of this state's decode steps.
    pub graphs: Graphs,
}

impl State {
    pub fn new(cfg: &ModelConfig, be: &dyn Backend, rows: usize, capacity: usize) -> Result<Self> {
        let rows = rows.max(1);
        let (d, n, l) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers);
        Ok(Self {
            rows,
            x: be.zeros(rows * d)?,
            xb: be.zeros(rows * d)?,
            out: be.zeros(rows * d)?,
            q: be.zeros(rows * cfg.q_dim())?,
            k: be.zeros(rows * cfg.kv_dim())?,
            v: be.zeros(rows * cfg.kv_dim())?,
            ctx: be.zeros(rows * cfg.q_dim())?,
            ffn_a: be.zeros(rows * n)?,
            ffn_u: be.zeros(rows * n)?,
            step: be.new_step(rows)?,
            ffn: (0..l).map(|_| be.new_ffn_scratch()).collect(),
            stats_acc: be.zeros(2 * l * n)?,
            stats_host: vec![0.0; 2 * l * n],
            stats: NeuronStats::new(l, n),
            mask: NeuronMask::new(l, n),
            gate_hist: None,
            logits: be.zeros(cfg.vocab_size)?,
            logits_host: vec![0.0; cfg.vocab_size],
            cache: KvCache::new(be, l, cfg.kv_dim(), capacity)?,
            ropes: cfg.ropes.iter().map(|r| RopeTable::new(be, r, cfg.head_dim, capacity)).collect::<Result<_>>()?,
            graphs: None,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Whether this state can run `rows` tokens at once and hold `capacity` positions.
    pub fn fits(&self, rows: usize, capacity: usize) -> bool {
        self.rows >= rows && self.capacity() >= capacity
    }

    /// Layer `layer`'s FFN input (`xb`), output (`out`) and buffers (`n` neurons a layer).
    pub(crate) fn ffn_io(&mut self, layer: usize, n: usize) -> (&Buf, &mut Buf, FfnBuffers<'_>) {
        let bufs = FfnBuffers {
            a: &mut self.ffn_a,
            u: &mut self.ffn_u,
            scratch: &mut self.ffn[layer],
            stats: &mut self.stats_acc,
            stats_offset: 2 * layer * n,
            hist: self.gate_hist.as_deref_mut(),
            layer,
        };
        (&self.xb, &mut self.out, bufs)
    }
}

/// The activations of a batched decode step ([`Model::decode_batch`]): one row per sequence, for
/// up to `rows` sequences, and their logits. The sequences' caches, masks and positions stay in
/// their own [`State`]s.
///
/// [`Model::decode_batch`]: super::Model::decode_batch
pub struct Batch {
    /// The model sizes the buffers were made for ([`Batch::sizes`]).
    sizes: [usize; 5],
    /// The step's activations, one row per sequence: a state of `rows` rows whose own cache (one
    /// position) and mask go unused.
    pub rows: State,
    /// The rows' tokens, gathered for the embedding lookup.
    pub(crate) tokens: Vec<u32>,
    /// Every row's logits, `rows x vocab`.
    pub logits: Buf,
}

impl Batch {
    pub fn new(cfg: &ModelConfig, be: &dyn Backend, rows: usize) -> Result<Self> {
        let rows = rows.max(1);
        Ok(Self {
            sizes: Self::sizes(cfg),
            rows: State::new(cfg, be, rows, 1)?,
            tokens: Vec::with_capacity(rows),
            logits: be.zeros(rows * cfg.vocab_size)?,
        })
    }

    /// How many sequences one step can take.
    pub fn rows(&self) -> usize {
        self.rows.rows()
    }

    /// Whether the buffers were made for a model of these sizes.
    pub(crate) fn matches(&self, cfg: &ModelConfig) -> bool {
        self.sizes == Self::sizes(cfg)
    }

    fn sizes(cfg: &ModelConfig) -> [usize; 5] {
        [cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size, cfg.vocab_size]
    }
}
