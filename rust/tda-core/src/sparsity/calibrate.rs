//! Calibration: from text to TDA thresholds.
//!
//! **Density.** Run calibration windows densely and pool each layer's TDA scores; the threshold
//! for density `d` is the pooled `(1 - d)` quantile. Scores depend on the prompt length: a score
//! is a root mean square over the prompt, and for short prompts that mean is taken over few,
//! heavy-tailed values, so it is usually smaller. A threshold calibrated on long windows
//! therefore keeps too few neurons of a short prompt. So each window's scores are pooled at
//! every length of a grid (its first 16, 32, ... tokens; the model is causal, so these are
//! exactly the scores of a prompt of that length), and a prompt of `S` tokens uses thresholds
//! interpolated in `log S` ([`Thresholds::at`]). Short prompts' scores vary most between
//! prompts, so the engine adds extra short windows from positions spread over the text.
//!
//! **Quality budget.** Find per-layer densities `d_l` that keep as few FFN weights as possible
//! while the perplexity of held-out windows stays within `(1 + budget)` times dense. The
//! sensitivity of layer `l` at density `d` is estimated from one dense pass per validation window
//! as the share of the layer's output energy that the skipped neurons carry,
//! `E_l(d) = sum_{j skipped} e_j / sum_j e_j` with `e_j = sum_t A[t, j]^2 * ||Wd[:, j]||^2` over
//! the scored tokens. For a multiplier `mu`, each layer takes `d_l = argmin_d d + mu E_l(d)`
//! (the Lagrangian of "fewest weights for a total error"); `mu` is then bisected against the
//! real held-out perplexity, so the budget is checked by measurement, not by the estimate.

use super::score::Prefixed;
use super::spec::{Sparsity, Thresholds};
use crate::error::{Error, Result};
use crate::model::{FfnMode, Logits, Model, State};
use serde_json::json;
use std::sync::Arc;

/// A caller's function told how far long work has got, as `(done, total)` steps. An error from it
/// stops the work and is returned as is: how a caller cancels (Ctrl-C in Python).
pub type ProgressFn = Arc<dyn Fn(usize, usize) -> Result<()> + Send + Sync>;

/// Counts the steps of long work and reports each one to the caller's [`ProgressFn`], if any.
pub struct Progress {
    report: Option<ProgressFn>,
    done: usize,
    total: usize,
}

impl Progress {
    pub fn new(report: Option<ProgressFn>) -> Self {
        Self { report, done: 0, total: 0 }
    }

    /// `n` more steps to come.
    pub fn add_total(&mut self, n: usize) {
        self.total += n;
    }

    /// One step begins: reports the steps done before it.
    pub fn step(&mut self) -> Result<()> {
        let r = self.report.as_ref().map_or(Ok(()), |f| f(self.done, self.total));
        self.done += 1;
        r
    }

    /// The work is over: reports every step done.
    pub fn finish(&mut self) -> Result<()> {
        self.report.as_ref().map_or(Ok(()), |f| f(self.done, self.total))
    }
}

/// Prompt lengths at which scores are pooled by default.
pub const DEFAULT_LENGTHS: [usize; 6] = [16, 32, 64, 128, 256, 512];

/// Pooled TDA scores per prompt length and layer, sorted ascending.
pub struct LengthProfile {
    pub lengths: Vec<usize>,
    pooled: Vec<Vec<Vec<f32>>>,
    pub windows: usize,
}

impl LengthProfile {
    /// Runs every window densely, prefix by prefix, and pools each layer's TDA scores at each
    /// length of `lengths` that the window reaches. Windows must start like a prompt (with BOS).
    pub fn collect(
        model: &Model,
        st: &mut State,
        windows: &[Vec<u32>],
        lengths: &[usize],
        progress: &mut Progress,
    ) -> Result<Self> {
        let layers = model.cfg.num_layers;
        let longest = windows.iter().map(Vec::len).max().unwrap_or(0);
        let lengths: Vec<usize> = lengths.iter().copied().filter(|&l| l <= longest).collect();
        if lengths.is_empty() || windows.is_empty() {
            return Err(Error::arg(format!(
                "calibration text is too short: it gives {} window(s) of at most {longest} tokens, need at least {}",
                windows.len(),
                DEFAULT_LENGTHS[0]
            )));
        }
        let mut pooled = vec![vec![Vec::new(); layers]; lengths.len()];
        let mut scores = Vec::new();
        progress.add_total(windows.len());
        for w in windows {
            progress.step()?;
            st.stats.reset();
            let mut done = 0;
            for (li, &len) in lengths.iter().enumerate() {
                if len > w.len() {
                    break;
                }
                model.forward(&w[done..len], done, st, FfnMode::Observe, Logits::None)?;
                done = len;
                for (l, pool) in pooled[li].iter_mut().enumerate() {
                    st.stats.tda_scores(l, &mut scores);
                    pool.extend_from_slice(&scores);
                }
            }
        }
        for per_len in &mut pooled {
            for pool in per_len.iter_mut() {
                pool.sort_unstable_by(f32::total_cmp);
            }
        }
        Ok(Self { lengths, pooled, windows: windows.len() })
    }

    /// Thresholds that keep the fraction `densities[l]` of layer `l`'s neurons, at every length.
    pub fn thresholds(&self, densities: &[f64]) -> Thresholds {
        let values = self
            .pooled
            .iter()
            .map(|per_len| per_len.iter().zip(densities).map(|(pool, &d)| quantile_threshold(pool, d)).collect())
            .collect();
        let prompt_lengths = if self.lengths.len() > 1 { self.lengths.clone() } else { vec![] };
        Thresholds { prompt_lengths, values, meta: json!({}) }
    }
}

/// The smallest pooled score among the top `density` fraction; 0 (keep all) for density 1.
fn quantile_threshold(sorted: &[f32], density: f64) -> f32 {
    if density >= 1.0 || sorted.is_empty() {
        return 0.0;
    }
    let keep = ((density * sorted.len() as f64).round() as usize).max(1);
    sorted[sorted.len().saturating_sub(keep)]
}

/// Splits a token stream into windows of `len` tokens, each starting with `bos` (as prompts do).
pub fn windows(tokens: &[u32], bos: &[u32], len: usize, max: usize) -> Vec<Vec<u32>> {
    let body = len.saturating_sub(bos.len()).max(1);
    tokens.chunks(body).filter(|c| c.len() == body).take(max).map(|c| bos.iter().chain(c).copied().collect()).collect()
}

/// What quality-budget calibration found.
#[derive(Debug, Clone)]
pub struct BudgetReport {
    pub max_ppl_increase: f64,
    pub layer_densities: Vec<f64>,
    pub ppl_dense: f64,
    pub ppl: f64,
    /// Fraction of FFN neurons kept on the validation windows.
    pub kept_fraction: f64,
    pub evaluations: usize,
    pub validation_tokens: usize,
}

/// Density grid of the budget search.
const GRID: [f64; 20] =
    [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0];

/// Steps of [`budget_search`] after its validation windows: the bisection's evaluations.
pub const BUDGET_STEPS: usize = 14;

/// Quality-budget calibration over validation windows (`prefix` dense tokens, the rest scored).
/// `progress` counts a step per validation window and per bisection step ([`BUDGET_STEPS`]).
pub fn budget_search(
    model: &Arc<Model>,
    profile: &LengthProfile,
    validation: &[Vec<u32>],
    prefix: usize,
    max_increase: f64,
    progress: &mut Progress,
) -> Result<(Thresholds, BudgetReport)> {
    if !(max_increase > 0.0 && max_increase.is_finite()) {
        return Err(Error::arg(format!("max_ppl_increase must be > 0, got {max_increase}")));
    }
    let layers = model.cfg.num_layers;
    let down_norms = model.down_row_norms()?;
    // Per window: dense prefix (kept for every evaluation), and the layers' sensitivity curves.
    let mut prefixed = Vec::with_capacity(validation.len());
    let mut sens = vec![vec![0f64; GRID.len()]; layers];
    let mut dense_lp = 0f64;
    let mut tokens = 0usize;
    let mut scores = Vec::new();
    let mut taus = Vec::new();
    let grid_thresholds: Vec<Thresholds> = GRID.iter().map(|&d| profile.thresholds(&vec![d; layers])).collect();
    for w in validation {
        progress.step()?;
        let mut p = Prefixed::new(model, w, prefix)?;
        let (lp, energy) = p.dense_energy()?;
        dense_lp += lp.iter().map(|&x| x as f64).sum::<f64>();
        tokens += lp.len();
        for (l, sl) in sens.iter_mut().enumerate() {
            p.stats().tda_scores(l, &mut scores);
            let e: Vec<f64> = energy.energy(l).iter().zip(&down_norms[l]).map(|(&a, &w)| a as f64 * w).collect();
            let total: f64 = e.iter().sum::<f64>().max(f64::MIN_POSITIVE);
            for (gi, th) in grid_thresholds.iter().enumerate() {
                th.at(prefix, &mut taus);
                let dropped: f64 = scores.iter().zip(&e).filter(|(s, _)| **s < taus[l]).map(|(_, e)| e).sum();
                sl[gi] += dropped / total / validation.len() as f64;
            }
        }
        prefixed.push(p);
    }
    let ppl_dense = (-dense_lp / tokens as f64).exp();
    let limit = ppl_dense * (1.0 + max_increase);
    let choose = |mu: f64| -> Vec<f64> {
        sens.iter()
            .map(|s| {
                let (mut best, mut best_v) = (GRID.len() - 1, f64::INFINITY);
                for (gi, &d) in GRID.iter().enumerate() {
                    let v = d + mu * s[gi];
                    if v < best_v {
                        (best, best_v) = (gi, v);
                    }
                }
                GRID[best]
            })
            .collect()
    };
    let mut evaluations = 0;
    let mut evaluate = |dens: &[f64]| -> Result<(f64, f64)> {
        evaluations += 1;
        let th = Arc::new(profile.thresholds(dens));
        let spec = Sparsity::Tda(th);
        let (mut lp, mut kept, mut slots) = (0f64, 0usize, 0usize);
        for p in prefixed.iter_mut() {
            let (l, k) = p.score(&spec)?;
            lp += l.iter().map(|&x| x as f64).sum::<f64>();
            kept += k.iter().sum::<usize>();
            slots += k.len() * model.cfg.intermediate_size;
        }
        Ok(((-lp / tokens as f64).exp(), kept as f64 / slots as f64))
    };
    // Bisect log(mu): the largest error weight that still breaks the budget, and the smallest that keeps it.
    let (mut lo, mut hi) = (-4f64, 8f64);
    let mut best = (vec![1.0; layers], ppl_dense, 1.0);
    let mut last: Option<(Vec<f64>, bool)> = None;
    for _ in 0..BUDGET_STEPS {
        progress.step()?;
        let mid = 0.5 * (lo + hi);
        let dens = choose(10f64.powf(mid));
        let ok = match &last {
            Some((d, ok)) if *d == dens => *ok,
            _ => {
                let (ppl, kept) = evaluate(&dens)?;
                let ok = ppl <= limit;
                if ok && kept <= best.2 {
                    best = (dens.clone(), ppl, kept);
                }
                ok
            }
        };
        last = Some((dens, ok));
        if ok {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let (layer_densities, ppl, kept_fraction) = best;
    let mut th = profile.thresholds(&layer_densities);
    th.meta = json!({
        "method": "tda",
        "calibration": "max_ppl_increase",
        "max_ppl_increase": max_increase,
        "layer_densities": layer_densities,
        "validation_ppl_dense": ppl_dense,
        "validation_ppl": ppl,
        "validation_kept_fraction": kept_fraction,
        "validation_tokens": tokens,
    });
    let report = BudgetReport {
        max_ppl_increase: max_increase,
        layer_densities,
        ppl_dense,
        ppl,
        kept_fraction,
        evaluations,
        validation_tokens: tokens,
    };
    Ok((th, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_keeps_the_asked_fraction() {
        let pool: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        for d in [0.1, 0.25, 0.5, 0.9] {
            let t = quantile_threshold(&pool, d);
            let kept = pool.iter().filter(|&&s| s >= t).count() as f64 / pool.len() as f64;
            assert!((kept - d).abs() <= 1e-3, "{d}: {kept}");
        }
        assert_eq!(quantile_threshold(&pool, 1.0), 0.0);
    }

    #[test]
    fn windows_start_with_bos_and_drop_the_ragged_end() {
        let toks: Vec<u32> = (10..30).collect();
        let w = windows(&toks, &[1], 6, 10);
        assert_eq!(w.len(), 4);
        assert!(w.iter().all(|x| x.len() == 6 && x[0] == 1));
        assert_eq!(w[1][1..], [15, 16, 17, 18, 19]);
        assert_eq!(windows(&toks, &[], 5, 2).len(), 2);
    }
}
