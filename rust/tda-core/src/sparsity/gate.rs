//! Per-token gate calibration: how often, and with how much weight, each layer's gate values
//! `a_j = act(g_j)` of decoded tokens fall at each size, by how highly the prompt ranks the neuron.
//!
//! A [`GateHistogram`] counts, per layer, the (token, neuron) pairs of dense continuations in a
//! 2-D grid: the neuron's rank bucket by its TDA score over the window's dense prefix (bucket `b`
//! holds ranks `[b, b + 1) * n / RANK_BUCKETS`, the highest scores first) and `|a_j|` on a log
//! scale. Each cell also sums the pairs' output energy `A[t, j]^2 * ||Wd[:, j]||^2`, the error a
//! pair adds when it is skipped. From the grid:
//!
//! - the gate threshold that lets a fraction `keep` of the gate values inside the prompt's top
//!   `m` buckets pass ([`GateHistogram::threshold`]): CATS is `m = RANK_BUCKETS`, the hybrid uses the
//!   buckets of its superset density;
//! - for every (superset, keep) setting of a layer, the FFN bytes it reads and the share of the
//!   layer's output energy it drops ([`GateHistogram::settings`]), which the quality-budget search
//!   trades against each other.

use super::stats::NeuronStats;
use crate::config::Activation;
use crate::kernels::cpu::activate;

/// Rank buckets of the prompt's TDA order (superset densities in steps of 1/40).
pub const RANK_BUCKETS: usize = 40;
const BINS_PER_OCTAVE: usize = 16;
/// `|a|` from `2^MIN_LOG2` to `2^MAX_LOG2` on a log scale; bin 0 holds everything smaller.
const MIN_LOG2: i32 = -24;
const MAX_LOG2: i32 = 10;
const BINS: usize = (MAX_LOG2 - MIN_LOG2) as usize * BINS_PER_OCTAVE + 1;

/// Per-token keep fractions the search considers (1: no gate).
pub const KEEPS: [f64; 15] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3];

/// One layer's candidate: the prompt keeps its top `buckets` rank buckets, each token the fraction
/// `keep` of those by gate value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting {
    pub buckets: usize,
    pub keep: f64,
    /// FFN bytes read, as a fraction of the layer's dense bytes.
    pub bytes: f64,
    /// Share of the layer's output energy dropped.
    pub error: f64,
}

impl Setting {
    pub fn density(&self) -> f64 {
        self.buckets as f64 / RANK_BUCKETS as f64
    }
}

/// Which settings a search may give a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Methods {
    /// The prompt's superset only (TDA).
    Tda,
    /// The per-token gate over every neuron only (CATS).
    Cats,
    /// Either, or both together (the hybrid).
    All,
}

impl Methods {
    pub fn parse(s: &str) -> crate::error::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tda" => Ok(Methods::Tda),
            "cats" => Ok(Methods::Cats),
            "auto" | "all" | "hybrid" => Ok(Methods::All),
            _ => Err(crate::error::Error::arg(format!("unknown method '{s}'; expected 'auto', 'tda' or 'cats'"))),
        }
    }
}

pub struct GateHistogram {
    layers: usize,
    n: usize,
    act: Activation,
    /// `layers x RANK_BUCKETS x BINS` pair counts and energies.
    count: Vec<f64>,
    energy: Vec<f64>,
    /// The current window's rank bucket of every neuron, per layer.
    bucket: Vec<Vec<u8>>,
    /// `||Wd[:, j]||^2` per layer.
    down_norms: Vec<Vec<f64>>,
    /// Host copies of one layer's gate and up outputs.
    pub(crate) g: Vec<f32>,
    pub(crate) u: Vec<f32>,
    order: Vec<u32>,
    scores: Vec<f32>,
    /// Pairs added.
    pub pairs: u64,
}

fn bin_of(a: f32) -> usize {
    let a = a.abs();
    if !(a >= (MIN_LOG2 as f32).exp2()) {
        return 0;
    }
    let k = ((a.log2() - MIN_LOG2 as f32) * BINS_PER_OCTAVE as f32).floor() as usize + 1;
    k.min(BINS - 1)
}

/// The lower edge of bin `k >= 1`.
fn lower_edge(k: usize) -> f32 {
    (MIN_LOG2 as f32 + (k - 1) as f32 / BINS_PER_OCTAVE as f32).exp2()
}

impl GateHistogram {
    pub fn new(layers: usize, n: usize, act: Activation, down_norms: Vec<Vec<f64>>) -> Self {
        Self {
            layers,
            n,
            act,
            count: vec![0.0; layers * RANK_BUCKETS * BINS],
            energy: vec![0.0; layers * RANK_BUCKETS * BINS],
            bucket: vec![vec![0; n]; layers],
            down_norms,
            g: vec![],
            u: vec![],
            order: Vec::with_capacity(n),
            scores: Vec::with_capacity(n),
            pairs: 0,
        }
    }

    /// Ranks every layer's neurons by their TDA score over a window's dense prefix.
    pub fn set_ranks(&mut self, stats: &NeuronStats) {
        let n = self.n;
        for l in 0..self.layers {
            stats.tda_scores(l, &mut self.scores);
            let s = &self.scores;
            self.order.clear();
            self.order.extend(0..n as u32);
            self.order.sort_by(|&a, &b| s[b as usize].total_cmp(&s[a as usize]).then(a.cmp(&b)));
            for (rank, &j) in self.order.iter().enumerate() {
                self.bucket[l][j as usize] = (rank * RANK_BUCKETS / n) as u8;
            }
        }
    }

    /// Adds `rows` rows of layer `layer`'s gate outputs (bias included, before the activation) and
    /// up outputs, held in `self.g` and `self.u`.
    pub fn add(&mut self, layer: usize, rows: usize) {
        let n = self.n;
        let base = layer * RANK_BUCKETS * BINS;
        let (bucket, norms) = (&self.bucket[layer], &self.down_norms[layer]);
        for (g, u) in self.g[..rows * n].chunks_exact(n).zip(self.u[..rows * n].chunks_exact(n)) {
            for j in 0..n {
                let a = activate(self.act, g[j]);
                let cell = base + bucket[j] as usize * BINS + bin_of(a);
                let e = (a * u[j]) as f64;
                self.count[cell] += 1.0;
                self.energy[cell] += e * e * norms[j];
            }
        }
        if layer == 0 {
            self.pairs += (rows * n) as u64;
        }
    }

    fn cells(&self, layer: usize, buckets: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut c, mut e) = (vec![0.0; BINS], vec![0.0; BINS]);
        let base = layer * RANK_BUCKETS * BINS;
        for b in 0..buckets {
            let row = base + b * BINS;
            c.iter_mut().zip(&self.count[row..row + BINS]).for_each(|(x, y)| *x += y);
            e.iter_mut().zip(&self.energy[row..row + BINS]).for_each(|(x, y)| *x += y);
        }
        (c, e)
    }

    /// The gate threshold at which a fraction `keep` of the gate values of the top `buckets` rank
    /// buckets of `layer` pass (0 for `keep >= 1`: no gate), and the share of those buckets'
    /// energy that passes.
    fn cut(c: &[f64], e: &[f64], keep: f64) -> (f32, f64) {
        let total: f64 = c.iter().sum();
        let energy: f64 = e.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        if keep >= 1.0 || total == 0.0 {
            return (0.0, 1.0);
        }
        let want = keep * total;
        let (mut have, mut kept_e) = (0.0, 0.0);
        for k in (1..BINS).rev() {
            if have + c[k] >= want && c[k] > 0.0 {
                // Part of this bin passes: its values taken as spread evenly in log |a|.
                let f = (want - have) / c[k];
                let (lo, hi) = (lower_edge(k), lower_edge(k + 1));
                let t = hi * (lo / hi).powf(f as f32);
                return (t, (kept_e + f * e[k]) / energy);
            }
            have += c[k];
            kept_e += e[k];
        }
        (0.0, 1.0)
    }

    /// The gate threshold of `layer` that lets a fraction `keep` of the gate values of the
    /// neurons in the prompt's top `density` pass (0 for `keep = 1`).
    pub fn threshold(&self, layer: usize, density: f64, keep: f64) -> f32 {
        let (c, e) = self.cells(layer, Self::buckets_of(density));
        Self::cut(&c, &e, keep).0
    }

    /// The rank buckets of a superset density (at least one).
    pub fn buckets_of(density: f64) -> usize {
        ((density * RANK_BUCKETS as f64).round() as usize).clamp(1, RANK_BUCKETS)
    }

    /// Every setting of `layer` that `methods` allows, with its bytes and error. `costs` are the
    /// bytes of all the layer's gate rows and of all its up and down rows read sparse, as fractions
    /// of the bytes dense decoding reads (for quantized weights the sparse down rows are a
    /// requantized copy, so the two need not add up to 1). A whole superset with no gate is dense
    /// decoding, at 1.
    pub fn settings(&self, layer: usize, methods: Methods, (gate, rest): (f64, f64)) -> Vec<Setting> {
        let all = self.cells(layer, RANK_BUCKETS);
        let total_e: f64 = all.1.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let mut out = vec![];
        let superset: Vec<usize> = match methods {
            Methods::Cats => vec![RANK_BUCKETS],
            _ => (1..=RANK_BUCKETS).collect(),
        };
        for m in superset {
            let (c, e) = self.cells(layer, m);
            let cand = m as f64 / RANK_BUCKETS as f64;
            let inside: f64 = e.iter().sum();
            for &keep in KEEPS.iter().filter(|&&k| methods != Methods::Tda || k == 1.0) {
                let (_, passed) = Self::cut(&c, &e, keep);
                let bytes = match (m == RANK_BUCKETS, keep >= 1.0) {
                    (true, true) => 1.0,
                    (false, true) => cand * (gate + rest),
                    (_, false) => cand * gate + cand * keep * rest,
                };
                let error = ((total_e - inside * passed) / total_e).max(0.0);
                out.push(Setting { buckets: m, keep, bytes, error });
            }
        }
        out
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn neurons(&self) -> usize {
        self.n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_pass_the_asked_fraction_and_settings_price_bytes_and_error() {
        // One layer, 40 neurons (one per rank bucket), 400 tokens of gate values spread over
        // several octaves; silu of large positive values is about the value itself.
        let (n, rows) = (40, 400);
        let mut h = GateHistogram::new(1, n, Activation::Silu, vec![vec![1.0; n]]);
        let mut st = NeuronStats::new(1, n);
        // Neuron j's prompt score rises with j: rank 0 is neuron 39.
        let prompt: Vec<f32> = (0..n).map(|j| j as f32 + 1.0).collect();
        st.observe(0, &prompt, 1);
        h.set_ranks(&st);
        assert_eq!(h.bucket[0][39], 0);
        assert_eq!(h.bucket[0][0], 39);
        h.g = (0..rows * n).map(|i| 2.0 + ((i * 7919) % 1000) as f32 / 10.0).collect();
        h.u = vec![1.0; rows * n];
        h.add(0, rows);
        let acts: Vec<f32> = h.g.iter().map(|&g| activate(Activation::Silu, g).abs()).collect();
        for keep in [0.9, 0.7, 0.5, 0.3] {
            let t = h.threshold(0, 1.0, keep);
            let passed = acts.iter().filter(|&&a| a >= t).count() as f64 / acts.len() as f64;
            assert!((passed - keep).abs() < 0.01, "keep {keep}: passed {passed}");
        }
        assert_eq!(h.threshold(0, 1.0, 1.0), 0.0);
        let s = h.settings(0, Methods::All, (1.0 / 3.0, 2.0 / 3.0));
        let dense = s.iter().find(|s| s.buckets == RANK_BUCKETS && s.keep == 1.0).unwrap();
        assert_eq!((dense.bytes, dense.error), (1.0, 0.0));
        let half = s.iter().find(|s| s.buckets == 20 && s.keep == 1.0).unwrap();
        assert!((half.bytes - 0.5).abs() < 1e-12 && half.error > 0.3 && half.error < 0.7, "{half:?}");
        let cats = s.iter().find(|s| s.buckets == RANK_BUCKETS && s.keep == 0.5).unwrap();
        assert!((cats.bytes - (1.0 / 3.0 + 0.5 * 2.0 / 3.0)).abs() < 1e-12);
        // Skipping the smallest half of the gate values drops far less than half of the energy.
        assert!(cats.error > 0.0 && cats.error < 0.25, "{cats:?}");
        assert!(h.settings(0, Methods::Tda, (0.3, 0.7)).iter().all(|s| s.keep == 1.0));
        assert!(h.settings(0, Methods::Cats, (0.3, 0.7)).iter().all(|s| s.buckets == RANK_BUCKETS));
        // Sparse rows dearer than dense ones (a requantized down projection): a whole superset
        // without a gate is the dense path and costs 1, a nearly whole one more.
        let q = h.settings(0, Methods::All, (0.3, 0.9));
        let at = |m: usize, k: f64| q.iter().find(|s| s.buckets == m && s.keep == k).unwrap().bytes;
        assert_eq!(at(RANK_BUCKETS, 1.0), 1.0);
        assert!((at(RANK_BUCKETS - 1, 1.0) - 1.2 * 39.0 / 40.0).abs() < 1e-12);
    }
}
