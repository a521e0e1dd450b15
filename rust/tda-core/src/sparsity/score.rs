//! Teacher-forced scoring of a continuation under sparsity masks: the prefix runs densely once
//! (observing the FFN activations, which choose the masks), then the continuation runs as many
//! rows under each mask, as decoding would compute it.

use super::gate::GateHistogram;
use super::spec::Sparsity;
use super::stats::NeuronStats;
use crate::error::{Error, Result};
use crate::model::{log_prob, FfnMode, Logits, Model, State};
use std::sync::Arc;

/// Rows per forward pass when scoring a continuation (bounds the logits buffer).
const SCORE_CHUNK: usize = 64;

/// What [`Prefixed::score`] measured.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Log-probabilities of `ids[prefix_len..]`.
    pub logprobs: Vec<f32>,
    /// Neurons each layer kept (the superset of a gated layer).
    pub kept: Vec<usize>,
    /// The mean fraction of FFN weight bytes a decoded token would read ([`Model::ffn_bytes`]).
    pub ffn_bytes: f64,
}

/// A scored sequence whose dense prefix has run: its run state holds the prefix's keys and values
/// and FFN statistics, so that the continuation can be scored under several sparsity specs.
pub struct Prefixed {
    model: Arc<Model>,
    st: Option<State>,
    ids: Vec<u32>,
    prefix_len: usize,
    first_lp: f32,
}

impl Prefixed {
    /// Runs `ids[..prefix_len]` densely, observing the FFN activations. The ids must be valid for
    /// the model (the engine checks them) and `1 <= prefix_len < ids.len()`.
    pub fn new(model: &Arc<Model>, ids: &[u32], prefix_len: usize) -> Result<Self> {
        if prefix_len == 0 || prefix_len >= ids.len() {
            return Err(Error::arg(format!(
                "prefix_len must be in [1, len(ids) - 1] = [1, {}], got {prefix_len}",
                ids.len().saturating_sub(1)
            )));
        }
        let rows = prefix_len.max(SCORE_CHUNK.min(ids.len() - prefix_len));
        let mut st = model.take_state(rows, ids.len())?;
        st.stats.reset();
        // From here on, dropping `p` gives the state back, also on error.
        let mut p = Self { model: model.clone(), st: Some(st), ids: ids.to_vec(), prefix_len, first_lp: 0.0 };
        let st = p.state();
        model.forward(&ids[..prefix_len], 0, st, FfnMode::Observe, Logits::Last)?;
        p.first_lp = log_prob(model.host_logits(st)?, ids[prefix_len]);
        Ok(p)
    }

    fn state(&mut self) -> &mut State {
        self.st.as_mut().expect("held until drop")
    }

    pub fn stats(&self) -> &NeuronStats {
        &self.st.as_ref().expect("held until drop").stats
    }

    /// Scores `ids[prefix_len..]` with the continuation run under `spec`'s mask (a resolved spec;
    /// the first log-prob comes from the dense prefix), each row gated as decoding gates it.
    pub fn score(&mut self, spec: &Sparsity) -> Result<Scored> {
        let st = self.state();
        st.mask.select(&spec.selector()?, &st.stats)?;
        let kept = st.mask.counts();
        let mode = if spec.is_dense() || st.mask.is_dense() { FfnMode::Dense } else { FfnMode::Sparse };
        let logprobs = self.continuation(mode)?;
        let ffn_bytes = match mode {
            FfnMode::Sparse => self.model.ffn_bytes(self.st.as_ref().expect("held until drop")),
            _ => 1.0,
        };
        Ok(Scored { logprobs, kept, ffn_bytes })
    }

    /// Dense scoring of the continuation that also returns its FFN activation statistics.
    pub fn dense_energy(&mut self) -> Result<(Vec<f32>, NeuronStats)> {
        let st = self.state();
        let prefix_stats = st.stats.clone();
        st.stats.reset();
        let lp = self.continuation(FfnMode::Observe);
        let st = self.state();
        let energy = st.stats.clone();
        st.stats.copy_from(&prefix_stats);
        Ok((lp?, energy))
    }

    /// Dense scoring of the continuation that adds its gate values to `hist`, ranked by this
    /// prefix's TDA scores; gives `hist` back with the log-probs.
    pub fn dense_histogram(&mut self, mut hist: Box<GateHistogram>) -> (Box<GateHistogram>, Result<Vec<f32>>) {
        hist.set_ranks(self.stats());
        self.state().gate_hist = Some(hist);
        let lp = self.continuation(FfnMode::Histogram);
        (self.state().gate_hist.take().expect("put there above"), lp)
    }

    fn continuation(&mut self, mode: FfnMode) -> Result<Vec<f32>> {
        let model = self.model.clone();
        let v = model.cfg.vocab_size;
        let (start, first_lp) = (self.prefix_len, self.first_lp);
        let ids = std::mem::take(&mut self.ids);
        let st = self.state();
        let mut lp = Vec::with_capacity(ids.len() - start);
        lp.push(first_lp);
        let inputs = &ids[start..ids.len() - 1];
        let mut logits = Vec::new();
        let mut run = || -> Result<()> {
            for (c, chunk) in inputs.chunks(SCORE_CHUNK).enumerate() {
                let pos = start + c * SCORE_CHUNK;
                model.forward(chunk, pos, st, mode, Logits::All(&mut logits))?;
                for (i, row) in logits.chunks_exact(v).enumerate() {
                    lp.push(log_prob(row, ids[pos + i + 1]));
                }
            }
            Ok(())
        };
        let r = run();
        self.ids = ids;
        r.map(|_| lp)
    }
}

impl Drop for Prefixed {
    fn drop(&mut self) {
        if let Some(st) = self.st.take() {
            self.model.return_state(st);
        }
    }
}
