//! Preallocated run state: activation buffers for up to `rows` tokens, the KV cache, and the rope
//! tables for `capacity` positions. Decoding reuses it token after token without allocating.

use super::ffn::KeptRows;
use super::kv_cache::KvCache;
use super::rope::RopeTable;
use crate::config::ModelConfig;
use crate::kernels::cpu::MAX_FFN_CHUNKS;
use crate::sparsity::{NeuronMask, NeuronStats};

pub struct State {
    rows: usize,
    /// Residual stream, `rows x hidden`.
    pub x: Vec<f32>,
    /// Normalised input of a sub-block, `rows x hidden`.
    pub xb: Vec<f32>,
    /// Output of a sub-block, `rows x hidden`.
    pub out: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Attention context before the output projection, `rows x q_dim`.
    pub ctx: Vec<f32>,
    /// FFN intermediate activation and scratch, `rows x intermediate`.
    pub ffn_a: Vec<f32>,
    pub ffn_u: Vec<f32>,
    /// Partial sums of the decode FFN kernel, `MAX_FFN_CHUNKS x hidden`.
    pub ffn_partials: Vec<f32>,
    /// Per layer, the compact copy of the kept neurons' rows (filled only for short rows).
    pub ffn_kept_rows: Vec<KeptRows>,
    /// Statistics of the prompt's FFN activations (filled by an observing prefill).
    pub stats: NeuronStats,
    /// The neurons sparse decoding keeps.
    pub mask: NeuronMask,
    /// Logits of the last token, `vocab`.
    pub logits: Vec<f32>,
    pub cache: KvCache,
    pub ropes: Vec<RopeTable>,
}

impl State {
    pub fn new(cfg: &ModelConfig, rows: usize, capacity: usize) -> Self {
        let rows = rows.max(1);
        let (d, n) = (cfg.hidden_size, cfg.intermediate_size);
        Self {
            rows,
            x: vec![0.0; rows * d],
            xb: vec![0.0; rows * d],
            out: vec![0.0; rows * d],
            q: vec![0.0; rows * cfg.q_dim()],
            k: vec![0.0; rows * cfg.kv_dim()],
            v: vec![0.0; rows * cfg.kv_dim()],
            ctx: vec![0.0; rows * cfg.q_dim()],
            ffn_a: vec![0.0; rows * n],
            ffn_u: vec![0.0; rows * n],
            ffn_partials: vec![0.0; MAX_FFN_CHUNKS * d],
            ffn_kept_rows: (0..cfg.num_layers).map(|_| KeptRows::default()).collect(),
            stats: NeuronStats::new(cfg.num_layers, n),
            mask: NeuronMask::new(cfg.num_layers, n),
            logits: vec![0.0; cfg.vocab_size],
            cache: KvCache::new(cfg.num_layers, cfg.kv_dim(), capacity),
            ropes: cfg.ropes.iter().map(|r| RopeTable::new(r, cfg.head_dim, capacity)).collect(),
        }
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
}
