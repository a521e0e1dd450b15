//! Calibration: from text to TDA thresholds, gate thresholds, and per-layer settings under a budget.
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
//! **Budgets.** Find per-layer settings that read as few FFN bytes as possible while the
//! perplexity of held-out windows stays within `(1 + budget)` times dense (`MaxPplIncrease`), or
//! the lowest perplexity within a byte budget (`FfnBytes`). A layer's setting is a superset
//! density `d_l` (TDA, from the length-aware profile) and a per-token keep fraction `k_l` (a gate
//! threshold; 1 = no gate), so TDA, CATS and the hybrid are all points of one search. Each
//! setting's bytes and error are estimated from one dense pass per validation window
//! ([`GateHistogram`]): the error is the share of the layer's output energy that the skipped
//! (token, neuron) pairs carry, `sum A[t, j]^2 * ||Wd[:, j]||^2`. For a multiplier `mu`, each layer
//! takes the setting minimising `bytes + mu * error` (the Lagrangian of "fewest bytes for a total
//! error"); `mu` is then bisected against the real held-out perplexity or the measured bytes, so
//! the budget is checked by measurement, not by the estimate.

use super::gate::{GateHistogram, Methods, Setting, RANK_BUCKETS};
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
        Thresholds { prompt_lengths, values, gate: vec![], meta: json!({}) }
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

/// What a budget search aims for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// The fewest FFN bytes with held-out perplexity at most `(1 + b)` times dense.
    MaxPplIncrease(f64),
    /// The lowest held-out perplexity reading at most this fraction of the FFN bytes per token.
    FfnBytes(f64),
}

impl Budget {
    pub fn check(&self) -> Result<()> {
        match *self {
            Budget::MaxPplIncrease(b) if !(b > 0.0 && b.is_finite()) => {
                Err(Error::arg(format!("max_ppl_increase must be > 0, got {b}")))
            }
            Budget::FfnBytes(b) if !(b > 0.0 && b <= 1.0) => {
                Err(Error::arg(format!("ffn_bytes must be in (0, 1], got {b}")))
            }
            _ => Ok(()),
        }
    }
}

/// What a budget search found.
#[derive(Debug, Clone)]
pub struct BudgetReport {
    pub budget: Budget,
    pub methods: Methods,
    /// Per layer: the prompt's superset density and the per-token keep fraction (1: no gate).
    pub layer_densities: Vec<f64>,
    pub layer_keeps: Vec<f64>,
    pub ppl_dense: f64,
    pub ppl: f64,
    /// Fraction of FFN neurons in the prompt's supersets on the validation windows.
    pub kept_fraction: f64,
    /// The mean fraction of FFN bytes a decoded token reads on the validation windows, measured.
    pub ffn_bytes: f64,
    pub evaluations: usize,
    pub validation_tokens: usize,
    /// The per-layer search's own best `(ppl, ffn_bytes)` within the budget, if it found one.
    pub per_layer: Option<(f64, f64)>,
    /// The best plan with one setting for every layer that the search measured within the budget.
    pub uniform: Option<UniformPlan>,
    /// Whether that uniform plan beat the per-layer one and is what was returned.
    pub uniform_chosen: bool,
}

/// A plan giving every layer the same setting, as measured on the validation windows.
#[derive(Debug, Clone)]
pub struct UniformPlan {
    /// The setting as a sparsity spec: `tda:D`, `cats:K` or `hybrid:D,K`.
    pub setting: String,
    pub ppl: f64,
    pub ffn_bytes: f64,
}

/// Uniform plans (the same setting index for every layer; layers list their settings in one
/// order) in families along which bytes fall: TDA (no gate, superset shrinking), CATS (every
/// neuron, keep falling) and the hybrid at supersets 0.9 and 0.8. Each family is sorted by mean
/// estimated bytes, richest first; families the search's methods exclude come out empty and are
/// dropped.
fn uniform_families(settings: &[Vec<Setting>]) -> Vec<(&'static str, Vec<usize>)> {
    type Member = fn(&Setting) -> bool;
    let families: [(&'static str, Member); 4] = [
        ("tda", |s| s.keep >= 1.0 && s.buckets < RANK_BUCKETS),
        ("cats", |s| s.buckets == RANK_BUCKETS && s.keep < 1.0),
        ("hybrid:0.9", |s| s.buckets == RANK_BUCKETS * 9 / 10 && s.keep < 1.0),
        ("hybrid:0.8", |s| s.buckets == RANK_BUCKETS * 8 / 10 && s.keep < 1.0),
    ];
    families
        .into_iter()
        .map(|(name, member)| {
            let mut f: Vec<usize> = (0..settings[0].len()).filter(|&i| member(&settings[0][i])).collect();
            f.sort_by(|&a, &b| mean_bytes(settings, b).total_cmp(&mean_bytes(settings, a)));
            (name, f)
        })
        .filter(|(_, f)| !f.is_empty())
        .collect()
}

/// Estimated FFN bytes of the uniform plan `i`, as a fraction of the dense FFN (layers are the same size).
fn mean_bytes(settings: &[Vec<Setting>], i: usize) -> f64 {
    settings.iter().map(|s| s[i].bytes).sum::<f64>() / settings.len() as f64
}

fn uniform_plan(settings: &[Vec<Setting>], i: usize) -> Vec<Setting> {
    settings.iter().map(|s| s[i]).collect()
}

/// A setting as the sparsity spec that applies it to every layer.
fn setting_label(s: &Setting) -> String {
    match (s.buckets == RANK_BUCKETS, s.keep >= 1.0) {
        (true, true) => "dense".into(),
        (false, true) => format!("tda:{}", s.density()),
        (true, false) => format!("cats:{}", s.keep),
        (false, false) => format!("hybrid:{},{}", s.density(), s.keep),
    }
}

/// Steps of [`budget_search`]'s bisection.
pub const BUDGET_STEPS: usize = 14;

/// Steps of [`budget_search`] after its validation windows, for a model of `layers` layers: one
/// sensitivity measurement per layer, then the bisection's evaluations.
pub fn budget_steps(layers: usize) -> usize {
    layers + BUDGET_STEPS
}

/// One evaluation of a plan on the validation windows.
#[derive(Debug, Clone, Copy)]
struct Measured {
    ppl: f64,
    kept: f64,
    bytes: f64,
}

/// Budget calibration over validation windows (`prefix` dense tokens, the rest scored), searching
/// per layer over the settings `methods` allows: the prompt's superset density (TDA thresholds
/// from `profile`) and the per-token gate's keep fraction (thresholds from the validation windows'
/// own gate histogram).
///
/// From one dense pass per window, every layer's settings are priced in bytes and in estimated
/// error (the share of the layer's output energy the skipped pairs carry, [`GateHistogram`]). For
/// a multiplier `mu`, each layer takes the setting minimising `bytes + mu * error` (the Lagrangian
/// of "fewest bytes for a total error"); `mu` is then bisected against the real held-out
/// perplexity (`MaxPplIncrease`) or the measured bytes (`FfnBytes`), so the budget is checked by
/// measurement, not by the estimate. `progress` counts a step per validation window and per
/// bisection step ([`BUDGET_STEPS`]).
#[allow(clippy::too_many_arguments)]
pub fn budget_search(
    model: &Arc<Model>,
    profile: &LengthProfile,
    validation: &[Vec<u32>],
    prefix: usize,
    budget: Budget,
    methods: Methods,
    progress: &mut Progress,
) -> Result<(Thresholds, BudgetReport)> {
    budget.check()?;
    let layers = model.cfg.num_layers;
    let mut hist =
        Box::new(GateHistogram::new(layers, model.cfg.intermediate_size, model.cfg.act, model.down_row_norms()?));
    let mut prefixed = Vec::with_capacity(validation.len());
    let (mut dense_lp, mut tokens) = (0f64, 0usize);
    for w in validation {
        progress.step()?;
        let mut p = Prefixed::new(model, w, prefix)?;
        let (h, lp) = p.dense_histogram(hist);
        hist = h;
        let lp = lp?;
        dense_lp += lp.iter().map(|&x| x as f64).sum::<f64>();
        tokens += lp.len();
        prefixed.push(p);
    }
    let ppl_dense = (-dense_lp / tokens as f64).exp();
    let mut settings: Vec<Vec<Setting>> = (0..layers).map(|l| hist.settings(l, methods, model.ffn_costs(l))).collect();
    let plan = |chosen: &[Setting]| -> Thresholds {
        let dens: Vec<f64> = chosen.iter().map(Setting::density).collect();
        let mut th = profile.thresholds(&dens);
        if chosen.iter().any(|s| s.keep < 1.0) {
            th.gate = chosen.iter().enumerate().map(|(l, s)| hist.threshold(l, s.density(), s.keep)).collect();
        }
        th
    };
    let mut evaluations = 0;
    let mut evaluate = |chosen: &[Setting]| -> Result<Measured> {
        evaluations += 1;
        let spec = Sparsity::Tda(Arc::new(plan(chosen)));
        let (mut lp, mut kept, mut bytes) = (0f64, 0usize, 0f64);
        for p in prefixed.iter_mut() {
            let r = p.score(&spec)?;
            lp += r.logprobs.iter().map(|&x| x as f64).sum::<f64>();
            kept += r.kept.iter().sum::<usize>();
            bytes += r.ffn_bytes;
        }
        let slots = (prefixed.len() * layers * model.cfg.intermediate_size) as f64;
        Ok(Measured {
            ppl: (-lp / tokens as f64).exp(),
            kept: kept as f64 / slots,
            bytes: bytes / prefixed.len() as f64,
        })
    };
    // The energy share is a poor guide across layers (the first layers hurt far more than their
    // share says): measure each layer alone at a reference setting and scale its estimates so that
    // they predict the increase in held-out log-perplexity, which adds up over layers.
    let dense_plan = vec![Setting { buckets: RANK_BUCKETS, keep: 1.0, bytes: 1.0, error: 0.0 }; layers];
    let reference = match methods {
        Methods::Tda => (RANK_BUCKETS / 2, 1.0),
        _ => (RANK_BUCKETS, 0.5),
    };
    let mut sensitivity = Vec::with_capacity(layers);
    for l in 0..layers {
        progress.step()?;
        let r = *settings[l].iter().find(|s| (s.buckets, s.keep) == reference).expect("the reference setting");
        let mut one = dense_plan.clone();
        one[l] = r;
        let m = evaluate(&one)?;
        let rise = (m.ppl / ppl_dense).ln().max(1e-6);
        sensitivity.push(rise);
        let scale = rise / r.error.max(1e-9);
        settings[l].iter_mut().for_each(|s| s.error *= scale);
    }
    let choose = |mu: f64| -> Vec<Setting> {
        settings
            .iter()
            .map(|s| {
                *s.iter()
                    .min_by(|a, b| (a.bytes + mu * a.error).total_cmp(&(b.bytes + mu * b.error)))
                    .expect("settings")
            })
            .collect()
    };
    // Bisect log10(mu): a larger mu weighs error more, so it reads more bytes at a lower perplexity.
    let (mut lo, mut hi) = (-4f64, 8f64);
    let dense = Measured { ppl: ppl_dense, kept: 1.0, bytes: 1.0 };
    let mut best: Option<(Vec<Setting>, Measured)> = None;
    let mut last: Option<(Vec<Setting>, bool)> = None;
    for _ in 0..BUDGET_STEPS {
        progress.step()?;
        let mid = 0.5 * (lo + hi);
        let chosen = choose(10f64.powf(mid));
        let ok = match &last {
            Some((c, ok)) if *c == chosen => *ok,
            _ => {
                let m = evaluate(&chosen)?;
                let (ok, better) = match budget {
                    Budget::MaxPplIncrease(b) => {
                        (m.ppl <= ppl_dense * (1.0 + b), best.as_ref().is_none_or(|(_, x)| m.bytes <= x.bytes))
                    }
                    Budget::FfnBytes(b) => (m.bytes <= b, best.as_ref().is_none_or(|(_, x)| m.ppl <= x.ppl)),
                };
                if ok && better {
                    best = Some((chosen.clone(), m));
                }
                ok
            }
        };
        last = Some((chosen, ok));
        // Within budget: for perplexity, try fewer bytes (smaller mu); for bytes, try more.
        match (budget, ok) {
            (Budget::MaxPplIncrease(_), true) | (Budget::FfnBytes(_), false) => hi = mid,
            _ => lo = mid,
        }
    }
    // The floor: one setting for every layer. The per-layer choice leans on estimates scaled from
    // one measured point per layer, and they can mislead far from that point (a layer sent to
    // keep 0.3 hurts more than keep 0.5 predicts); uniform plans are measured directly, so the
    // search never returns worse than the best of them it tried.
    let per_layer = best.as_ref().map(|(_, m)| *m);
    let mut uniform: Option<(usize, Measured)> = None;
    for (_, family) in uniform_families(&settings) {
        let better = |m: &Measured, than: Option<&Measured>| match budget {
            Budget::MaxPplIncrease(b) => m.ppl <= ppl_dense * (1.0 + b) && than.is_none_or(|x| m.bytes < x.bytes),
            Budget::FfnBytes(b) => m.bytes <= b && than.is_none_or(|x| m.ppl < x.ppl),
        };
        let found = match budget {
            // The family's richest plan estimated within the byte budget, or the next if measured over.
            Budget::FfnBytes(b) => {
                let fits: Vec<usize> = family.iter().copied().filter(|&i| mean_bytes(&settings, i) <= b).collect();
                let mut found = None;
                for &i in fits.iter().take(2) {
                    progress.add_total(1);
                    progress.step()?;
                    let m = evaluate(&uniform_plan(&settings, i))?;
                    if m.bytes <= b {
                        found = Some((i, m));
                        break;
                    }
                }
                found
            }
            // Bisect the family's plans that read fewer bytes than the best so far for the leanest
            // within the perplexity budget; when the richest of them fails, none can win.
            Budget::MaxPplIncrease(b) => {
                let cap = uniform.map(|(_, m)| m.bytes).or(per_layer.map(|m| m.bytes)).unwrap_or(1.0);
                let cands: Vec<usize> = family.iter().copied().filter(|&i| mean_bytes(&settings, i) < cap).collect();
                let ok = |m: &Measured| m.ppl <= ppl_dense * (1.0 + b);
                let (mut lo, mut hi, mut found) = (0usize, cands.len(), None);
                if let Some(&first) = cands.first() {
                    progress.add_total(1);
                    progress.step()?;
                    let m = evaluate(&uniform_plan(&settings, first))?;
                    if ok(&m) {
                        found = Some((first, m));
                        while hi - lo > 1 {
                            let mid = (lo + hi) / 2;
                            progress.add_total(1);
                            progress.step()?;
                            let m = evaluate(&uniform_plan(&settings, cands[mid]))?;
                            if ok(&m) {
                                (lo, found) = (mid, Some((cands[mid], m)));
                            } else {
                                hi = mid;
                            }
                        }
                    }
                }
                found
            }
        };
        if let Some((i, m)) = found {
            if better(&m, uniform.as_ref().map(|(_, x)| x)) {
                uniform = Some((i, m));
            }
        }
    }
    let uniform_wins = uniform.as_ref().is_some_and(|(_, m)| match budget {
        Budget::MaxPplIncrease(_) => per_layer.is_none_or(|p| m.bytes < p.bytes),
        Budget::FfnBytes(_) => per_layer.is_none_or(|p| m.ppl < p.ppl),
    });
    if let (true, Some((i, m))) = (uniform_wins, uniform) {
        best = Some((uniform_plan(&settings, i), m));
    }
    let uniform_report =
        uniform.map(|(i, m)| UniformPlan { setting: setting_label(&settings[0][i]), ppl: m.ppl, ffn_bytes: m.bytes });
    let (chosen, m) = match (best, budget) {
        (Some(b), _) => b,
        (None, Budget::MaxPplIncrease(_)) => (dense_plan, dense),
        (None, Budget::FfnBytes(b)) => {
            return Err(Error::arg(format!(
                "ffn_bytes={b}: no setting the search tried reads that few FFN bytes (methods: {methods:?});                  try a larger budget"
            )))
        }
    };
    let mut th = plan(&chosen);
    let layer_densities: Vec<f64> = chosen.iter().map(Setting::density).collect();
    let layer_keeps: Vec<f64> = chosen.iter().map(|s| s.keep).collect();
    let (name, value) = match budget {
        Budget::MaxPplIncrease(b) => ("max_ppl_increase", b),
        Budget::FfnBytes(b) => ("ffn_bytes", b),
    };
    th.meta = json!({
        "method": if th.gate.is_empty() { "tda" } else { "tda+gate" },
        "calibration": name,
        name: value,
        "methods": format!("{methods:?}").to_lowercase(),
        "layer_densities": layer_densities,
        "layer_keeps": layer_keeps,
        "layer_sensitivity": sensitivity,
        "validation_ppl_dense": ppl_dense,
        "validation_ppl": m.ppl,
        "validation_kept_fraction": m.kept,
        "validation_ffn_bytes": m.bytes,
        "validation_tokens": tokens,
        "chosen": if uniform_wins { "uniform" } else { "per-layer" },
        "per_layer": per_layer.map(|p| json!({"ppl": p.ppl, "ffn_bytes": p.bytes})),
        "uniform": uniform_report.as_ref().map(|u| json!({"setting": u.setting, "ppl": u.ppl, "ffn_bytes": u.ffn_bytes})),
    });
    let report = BudgetReport {
        budget,
        methods,
        layer_densities,
        layer_keeps,
        ppl_dense,
        ppl: m.ppl,
        kept_fraction: m.kept,
        ffn_bytes: m.bytes,
        evaluations,
        validation_tokens: tokens,
        per_layer: per_layer.map(|p| (p.ppl, p.bytes)),
        uniform: uniform_report,
        uniform_chosen: uniform_wins,
    };
    Ok((th, report))
}

/// The gate histogram of dense continuations of `windows` (`prefix` dense tokens each, which rank
/// the neurons), run in `st`: what CATS and hybrid specs take their gate thresholds from.
pub fn gate_histogram(
    model: &Model,
    st: &mut State,
    windows: &[Vec<u32>],
    prefix: usize,
    progress: &mut Progress,
) -> Result<GateHistogram> {
    let cfg = &model.cfg;
    let mut hist =
        Box::new(GateHistogram::new(cfg.num_layers, cfg.intermediate_size, cfg.act, model.down_row_norms()?));
    progress.add_total(windows.len());
    for w in windows.iter().filter(|w| w.len() > prefix) {
        progress.step()?;
        st.stats.reset();
        model.forward(&w[..prefix], 0, st, FfnMode::Observe, Logits::None)?;
        hist.set_ranks(&st.stats);
        st.gate_hist = Some(hist);
        let r = model.forward(&w[prefix..], prefix, st, FfnMode::Histogram, Logits::None);
        hist = st.gate_hist.take().expect("put there above");
        r?;
    }
    Ok(*hist)
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
