//! Next-token choice: repetition penalty, then temperature, top-k, top-p and min-p (HF's order),
//! then a draw from a seeded generator. Temperature 0 is greedy.

use crate::kernels::Draw;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0 }
    }
}

/// Sampler with its scratch preallocated for the vocabulary, so a step does not allocate.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens seen so far (prompt and output), for the repetition penalty.
    seen: Vec<bool>,
    /// Penalised logits (only used with a repetition penalty).
    work: Vec<f32>,
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: Option<u64>, vocab: usize) -> Self {
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        let penalised = params.repetition_penalty != 1.0;
        let seen = if penalised { vec![false; vocab] } else { Vec::new() };
        let work = if penalised { vec![0.0; vocab] } else { Vec::new() };
        let candidates = if params.temperature > 0.0 { Vec::with_capacity(vocab) } else { Vec::new() };
        Self { params, rng, seen, work, candidates }
    }

    /// Records a token for the repetition penalty.
    pub fn observe(&mut self, token: u32) {
        if let Some(s) = self.seen.get_mut(token as usize) {
            *s = true;
        }
    }

    /// The draw of the next token for a backend that samples on its device, taking the uniform
    /// number from this sampler's generator; `None` when the host must see the logits (a repetition
    /// penalty). Greedy is a draw at temperature 0, which uses no random number.
    pub fn device_draw(&mut self) -> Option<Draw> {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            return None;
        }
        let u = if p.temperature > 0.0 { self.rng.gen::<f32>() } else { 0.0 };
        Some(Draw { temperature: p.temperature, top_k: p.top_k, top_p: p.top_p, min_p: p.min_p, u })
    }

    /// Chooses the next token; `logits` are left unchanged.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let logits = if p.repetition_penalty != 1.0 {
            for ((w, &l), &s) in self.work.iter_mut().zip(logits).zip(&self.seen) {
                *w = match (s, l > 0.0) {
                    (false, _) => l,
                    (true, true) => l / p.repetition_penalty,
                    (true, false) => l * p.repetition_penalty,
                };
            }
            &self.work[..]
        } else {
            logits
        };
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (l * inv_t, i as u32)));
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit_desc);
        // Softmax over the candidates, in place (probabilities replace logits).
        let max = c[0].0;
        let mut total = 0.0f64;
        for x in c.iter_mut() {
            x.0 = (x.0 - max).exp();
            total += x.0 as f64;
        }
        for x in c.iter_mut() {
            x.0 = (x.0 as f64 / total) as f32;
        }
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p.
            let mut cum = 0.0f32;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                cum += x.0;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * c[0].0;
            let keep = c.iter().take_while(|x| x.0 >= floor).count().max(1);
            c.truncate(keep);
        }
        let mass: f32 = c.iter().map(|x| x.0).sum();
        let mut r = self.rng.gen::<f32>() * mass;
        for &(prob, id) in c.iter() {
            if r < prob {
                return id;
            }
            r -= prob;
        }
        c.last().map(|x| x.1).unwrap_or(0)
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

pub use crate::model::log_prob;

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, min_p, repetition_penalty: 1.0 }
    }

    #[test]
    fn greedy_and_top_k_1_pick_the_argmax() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        let mut s = Sampler::new(SamplingParams::greedy(), Some(1), 4);
        assert_eq!(s.sample(&logits), 1);
        let mut s = Sampler::new(params(1.5, 1, 1.0, 0.0), Some(1), 4);
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn seeded_draws_repeat_and_follow_the_distribution() {
        let logits = [0.0f32, 1.0, 2.0];
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0), Some(seed), 3);
            (0..3000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let d = draw(7);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for t in 0..3 {
            let freq = d.iter().filter(|&&x| x == t).count() as f32 / d.len() as f32;
            assert!((freq - logits[t as usize].exp() / z).abs() < 0.03, "token {t}: {freq}");
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probabilities ~ [0.665, 0.245, 0.09]
        let logits = [2.0f32, 1.0, 0.0];
        let mut s = Sampler::new(params(1.0, 0, 0.6, 0.0), Some(3), 3);
        assert!((0..200).all(|_| s.sample(&logits) == 0));
        let mut s = Sampler::new(params(1.0, 0, 1.0, 0.3), Some(3), 3);
        assert!((0..500).all(|_| s.sample(&logits) != 2));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let logits = [2.0f32, 1.5, -1.0];
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() }, None, 3);
        s.observe(0);
        assert_eq!(s.sample(&logits), 1);
        assert_eq!(s.work, [1.0, 1.5, -1.0]);
    }

    #[test]
    fn log_prob_is_normalised() {
        let l = [0.5f32, -1.0, 3.0];
        let total: f32 = (0..3).map(|t| log_prob(&l, t).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
