//! The neurons each layer keeps for one generation, chosen from the prompt's statistics.

use super::spec::{check_density, Sparsity, Thresholds};
use super::stats::NeuronStats;
use crate::error::Error;
use crate::error::Result;

/// How to choose, with any engine calibration already resolved to thresholds.
pub enum Selector<'a> {
    Dense,
    Griffin(f64),
    Tda(&'a Thresholds),
}

impl Sparsity {
    /// The selector of a resolved spec (the engine turns `TdaDensity` into thresholds first).
    pub fn selector(&self) -> Result<Selector<'_>> {
        Ok(match self {
            Sparsity::Dense => Selector::Dense,
            Sparsity::Griffin { density } => Selector::Griffin(*density),
            Sparsity::Tda(t) => Selector::Tda(t),
            Sparsity::TdaDensity(_) | Sparsity::Cats(_) | Sparsity::Hybrid { .. } => {
                return Err(Error::Internal(format!("sparsity '{}' was not resolved", self.label())))
            }
        })
    }
}

/// Kept neurons per layer, as ascending indices, plus a 0/1 multiplier row for many-row passes,
/// and each layer's per-token gate threshold (0: none).
pub struct NeuronMask {
    n: usize,
    kept: Vec<Vec<u32>>,
    /// Every neuron of the layer is kept: decode takes the dense path unless the layer is gated.
    all: Vec<bool>,
    gate: Vec<f32>,
    keep_row: Vec<Vec<f32>>,
    scratch: Vec<f32>,
    order: Vec<u32>,
    taus: Vec<f32>,
    /// Bumped on every change of the kept sets, so that copies made from them know they are stale.
    version: u64,
}

impl NeuronMask {
    pub fn new(layers: usize, n: usize) -> Self {
        Self {
            n,
            kept: (0..layers).map(|_| Vec::with_capacity(n)).collect(),
            all: vec![true; layers],
            gate: vec![0.0; layers],
            keep_row: vec![vec![1.0; n]; layers],
            scratch: Vec::with_capacity(n),
            order: Vec::with_capacity(n),
            taus: Vec::with_capacity(layers),
            version: 0,
        }
    }

    /// Changes with every selection (see [`crate::model::ffn::KeptRows`]).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Keep everything.
    pub fn set_dense(&mut self) {
        self.version += 1;
        self.all.fill(true);
        self.gate.fill(0.0);
        self.keep_row.iter_mut().for_each(|r| r.fill(1.0));
    }

    /// Chooses the kept neurons of every layer from the prompt statistics.
    pub fn select(&mut self, sel: &Selector<'_>, stats: &NeuronStats) -> Result<()> {
        self.version += 1;
        let layers = self.kept.len();
        match sel {
            Selector::Dense => {
                self.set_dense();
                return Ok(());
            }
            Selector::Griffin(d) => {
                check_density(*d)?;
                self.gate.fill(0.0);
            }
            Selector::Tda(t) => {
                t.validate(layers)?;
                t.at(stats.tokens, &mut self.taus);
                (0..layers).for_each(|l| self.gate[l] = t.gate_at(l));
            }
        }
        let n = self.n;
        for l in 0..layers {
            let kept = &mut self.kept[l];
            kept.clear();
            match sel {
                Selector::Tda(_) => {
                    stats.tda_scores(l, &mut self.scratch);
                    let tau = self.taus[l];
                    kept.extend((0..n as u32).filter(|&j| self.scratch[j as usize] >= tau));
                }
                Selector::Griffin(d) => {
                    stats.griffin_scores(l, &mut self.scratch);
                    let k = ((d * n as f64).floor() as usize).clamp(1, n);
                    let s = &self.scratch;
                    self.order.clear();
                    self.order.extend(0..n as u32);
                    // Highest score first; NaN last; ties by index.
                    self.order.sort_by(|&a, &b| {
                        let (x, y) = (s[a as usize], s[b as usize]);
                        y.partial_cmp(&x).unwrap_or_else(|| x.is_nan().cmp(&y.is_nan())).then(a.cmp(&b))
                    });
                    kept.extend_from_slice(&self.order[..k]);
                    kept.sort_unstable();
                }
                Selector::Dense => unreachable!(),
            }
            let row = &mut self.keep_row[l];
            row.fill(0.0);
            kept.iter().for_each(|&j| row[j as usize] = 1.0);
            self.all[l] = kept.len() == n;
        }
        Ok(())
    }

    /// The kept neurons of `layer`, `None` when all are kept.
    pub fn kept(&self, layer: usize) -> Option<&[u32]> {
        (!self.all[layer]).then(|| &self.kept[layer][..])
    }

    /// The per-token gate threshold of `layer` (0: every kept neuron is computed).
    pub fn gate(&self, layer: usize) -> f32 {
        self.gate[layer]
    }

    /// 1.0 for kept neurons of `layer`, 0.0 for skipped ones.
    pub fn keep_row(&self, layer: usize) -> &[f32] {
        &self.keep_row[layer]
    }

    pub fn counts(&self) -> Vec<usize> {
        (0..self.kept.len()).map(|l| if self.all[l] { self.n } else { self.kept[l].len() }).collect()
    }

    pub fn is_dense(&self) -> bool {
        self.all.iter().all(|&a| a) && self.gate.iter().all(|&g| g == 0.0)
    }

    /// Layer `layer` computes every neuron of every token.
    pub fn layer_dense(&self, layer: usize) -> bool {
        self.all[layer] && self.gate[layer] == 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_selection_follow_the_definitions() {
        // Two prompt rows, four neurons.
        let a = [3.0f32, 0.0, 4.0, 1.0, 0.0, 2.0, 0.0, 1.0];
        let mut st = NeuronStats::new(1, 4);
        st.observe(0, &a, 2);
        let mut s = vec![];
        st.tda_scores(0, &mut s);
        let want: Vec<f32> = [9.0f32 / 2.0, 4.0 / 2.0, 16.0 / 2.0, 2.0 / 2.0].iter().map(|v| v.sqrt()).collect();
        assert_eq!(s, want);
        st.griffin_scores(0, &mut s);
        let want: Vec<f32> =
            [9.0f32 / 26.0, 4.0 / 5.0, 16.0 / 26.0, 1.0 / 26.0 + 1.0 / 5.0].iter().map(|v| v.sqrt()).collect();
        for (x, y) in s.iter().zip(&want) {
            assert!((x - y).abs() < 1e-6);
        }
        let mut m = NeuronMask::new(1, 4);
        let th = Thresholds::fixed(vec![1.5]);
        m.select(&Selector::Tda(&th), &st).unwrap();
        assert_eq!(m.kept(0), Some(&[0u32, 2][..]));
        assert_eq!(m.keep_row(0), &[1.0, 0.0, 1.0, 0.0]);
        m.select(&Selector::Griffin(0.5), &st).unwrap();
        assert_eq!(m.kept(0), Some(&[1u32, 2][..]));
        m.select(&Selector::Griffin(1.0), &st).unwrap();
        assert_eq!(m.kept(0), None);
        assert_eq!(m.counts(), vec![4]);
        assert!(m.select(&Selector::Griffin(0.0), &st).is_err());
        assert!(m.select(&Selector::Tda(&Thresholds::fixed(vec![1.0, 2.0])), &st).is_err());
    }
}
