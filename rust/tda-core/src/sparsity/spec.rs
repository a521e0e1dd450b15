//! Which neurons decoding keeps, as a user asks for it.
//!
//! - `Dense`: all of them.
//! - `Griffin { density }`: per layer the top `floor(density * n)` (at least 1) neurons by GRIFFIN
//!   score (arXiv 2404.01365).
//! - `Tda(thresholds)`: neuron `j` of layer `l` is kept iff its TDA score `s_j >= tau_l`
//!   (arXiv 2408.11393). Calibrated thresholds may depend on the prompt length; see [`Thresholds`].
//! - `TdaDensity(d)`: TDA with the engine's own calibration for density `d`.
//! - `Cats(keep)`: per decoded token, the gate `a_j = act(g_j)` of every neuron; up and down only
//!   where `|a_j| >= t_l`, a per-layer threshold that a fraction `keep` of gate values passes on
//!   the engine's calibration text (CATS, arXiv 2404.08763).
//! - `Hybrid { density, keep }`: the prompt chooses a superset `K` as TDA at `density`; each decoded
//!   token computes the gate over `K` only, then up and down for the neurons of `K` that pass.
//!
//! Resolved, every method but GRIFFIN is one [`Thresholds`]: per layer a TDA threshold (0 keeps
//! every neuron in the superset) and a gate threshold (0: no per-token gate). Calibration over both
//! knobs gives each layer its own pair.

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub enum Sparsity {
    #[default]
    Dense,
    Griffin {
        density: f64,
    },
    Tda(Arc<Thresholds>),
    TdaDensity(f64),
    Cats(f64),
    Hybrid {
        density: f64,
        keep: f64,
    },
}

impl Sparsity {
    pub fn is_dense(&self) -> bool {
        matches!(self, Sparsity::Dense)
    }

    /// Parses `dense`, `griffin:0.5`, `tda:0.5` (engine calibration), `cats:0.7` and
    /// `hybrid:0.9,0.5` (density, keep) — the CLI and bench syntax.
    pub fn parse(s: &str) -> Result<Self> {
        let (method, arg) = s.split_once(':').map_or((s, None), |(m, a)| (m, Some(a)));
        let method = method.trim().to_ascii_lowercase();
        let numbers = |want: usize, example: &str| -> Result<Vec<f64>> {
            let a = arg.ok_or_else(|| Error::arg(format!("sparsity '{s}' needs {example}")))?;
            let v = a
                .split(',')
                .map(|x| {
                    x.trim().parse::<f64>().map_err(|_| Error::arg(format!("sparsity '{s}': '{x}' is not a number")))
                })
                .collect::<Result<Vec<f64>>>()?;
            if v.len() != want {
                return Err(Error::arg(format!("sparsity '{s}' needs {example}")));
            }
            Ok(v)
        };
        match method.as_str() {
            "dense" if arg.is_none() => Ok(Sparsity::Dense),
            "griffin" => {
                let d = numbers(1, "a density, e.g. 'griffin:0.5'")?[0];
                check_density(d)?;
                Ok(Sparsity::Griffin { density: d })
            }
            "tda" => {
                let d = numbers(1, "a density, e.g. 'tda:0.5'")?[0];
                check_density(d)?;
                Ok(Sparsity::TdaDensity(d))
            }
            "cats" => {
                let k = numbers(1, "a keep fraction, e.g. 'cats:0.7'")?[0];
                check_keep(k)?;
                Ok(Sparsity::Cats(k))
            }
            "hybrid" => {
                let v = numbers(2, "a density and a keep fraction, e.g. 'hybrid:0.9,0.5'")?;
                check_density(v[0])?;
                check_keep(v[1])?;
                Ok(Sparsity::Hybrid { density: v[0], keep: v[1] })
            }
            _ => Err(Error::arg(format!(
                "unknown sparsity '{s}'; expected 'dense', 'tda:DENSITY', 'griffin:DENSITY', 'cats:KEEP' or \
                 'hybrid:DENSITY,KEEP'"
            ))),
        }
    }

    /// The spec as [`Sparsity::parse`] reads it (thresholds as `tda[...]`).
    pub fn label(&self) -> String {
        match self {
            Sparsity::Dense => "dense".into(),
            Sparsity::Griffin { density } => format!("griffin:{density}"),
            Sparsity::TdaDensity(d) => format!("tda:{d}"),
            Sparsity::Cats(k) => format!("cats:{k}"),
            Sparsity::Hybrid { density, keep } => format!("hybrid:{density},{keep}"),
            Sparsity::Tda(t) => match t.gate.is_empty() {
                true => "tda[thresholds]".into(),
                false => "tda+gate[thresholds]".into(),
            },
        }
    }
}

/// A density must lie in (0, 1]; NaN fails.
pub fn check_density(d: f64) -> Result<()> {
    if !(d > 0.0 && d <= 1.0) {
        return Err(Error::arg(format!("density must be in (0, 1], got {d}")));
    }
    Ok(())
}

/// A per-token keep fraction must lie in (0, 1]; NaN fails.
pub fn check_keep(k: f64) -> Result<()> {
    if !(k > 0.0 && k <= 1.0) {
        return Err(Error::arg(format!("keep must be in (0, 1], got {k}")));
    }
    Ok(())
}

/// Per-layer TDA thresholds, optionally as a function of the prompt length, and optional
/// per-layer gate thresholds.
///
/// With `prompt_lengths` empty, `values` has one row used for every prompt. Otherwise row `i`
/// holds the thresholds calibrated for prompts of `prompt_lengths[i]` tokens, and a prompt of
/// `S` tokens uses the row-wise interpolation in `log S`, clamped at both ends.
///
/// `gate` is empty (no per-token gate) or holds one threshold per layer: a decoded token computes
/// up and down only for the neurons of the prompt's set whose `|act(g_j)| >= gate[l]` (0: all).
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    pub prompt_lengths: Vec<usize>,
    pub values: Vec<Vec<f32>>,
    pub gate: Vec<f32>,
    /// Free-form facts about how they were made (model, method, target, per-layer densities, ...).
    pub meta: Value,
}

pub const FORMAT: &str = "tda-engine-thresholds";

impl Thresholds {
    /// The same thresholds for every prompt length.
    pub fn fixed(values: Vec<f32>) -> Self {
        Self { prompt_lengths: vec![], values: vec![values], gate: vec![], meta: json!({}) }
    }

    /// The gate threshold of `layer` (0: no per-token gate).
    pub fn gate_at(&self, layer: usize) -> f32 {
        self.gate.get(layer).copied().unwrap_or(0.0)
    }

    pub fn num_layers(&self) -> usize {
        self.values.first().map_or(0, Vec::len)
    }

    /// Checks the shape against the model and that every value is finite and >= 0.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        if self.values.is_empty() {
            return Err(Error::arg("thresholds: no values"));
        }
        if !self.prompt_lengths.is_empty() && self.prompt_lengths.len() != self.values.len() {
            return Err(Error::arg(format!(
                "thresholds: {} prompt lengths but {} rows of values",
                self.prompt_lengths.len(),
                self.values.len()
            )));
        }
        if self.prompt_lengths.windows(2).any(|w| w[0] >= w[1]) || self.prompt_lengths.first() == Some(&0) {
            return Err(Error::arg(format!(
                "thresholds: prompt lengths must be increasing and >= 1, got {:?}",
                self.prompt_lengths
            )));
        }
        for row in &self.values {
            if row.len() != num_layers {
                return Err(Error::arg(format!(
                    "thresholds: got {} values, but the model has {num_layers} layers (give one per layer, or one \
                     number for all)",
                    row.len()
                )));
            }
            if let Some((l, v)) = row.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0)) {
                return Err(Error::arg(format!("thresholds: layer {l} has {v}; thresholds must be finite and >= 0")));
            }
        }
        if !self.gate.is_empty() && self.gate.len() != num_layers {
            return Err(Error::arg(format!(
                "thresholds: got {} gate thresholds, but the model has {num_layers} layers (give one per layer)",
                self.gate.len()
            )));
        }
        if let Some((l, v)) = self.gate.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0)) {
            return Err(Error::arg(format!(
                "thresholds: layer {l} has gate {v}; gate thresholds must be finite and >= 0"
            )));
        }
        Ok(())
    }

    /// The thresholds for a prompt of `len` tokens, into `out` (one per layer).
    pub fn at(&self, len: usize, out: &mut Vec<f32>) {
        out.clear();
        let lens = &self.prompt_lengths;
        if lens.len() <= 1 {
            out.extend_from_slice(&self.values[0]);
            return;
        }
        let i = lens.partition_point(|&l| l <= len);
        if i == 0 {
            out.extend_from_slice(&self.values[0]);
        } else if i == lens.len() {
            out.extend_from_slice(&self.values[lens.len() - 1]);
        } else {
            let (a, b) = (lens[i - 1] as f32, lens[i] as f32);
            let t = ((len as f32).ln() - a.ln()) / (b.ln() - a.ln());
            out.extend(self.values[i - 1].iter().zip(&self.values[i]).map(|(x, y)| x + t * (y - x)));
        }
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "format": FORMAT,
            "version": 1,
            "num_layers": self.num_layers(),
            "prompt_lengths": self.prompt_lengths,
            "thresholds": self.values,
            "meta": self.meta,
        });
        if !self.gate.is_empty() {
            v["gate"] = json!(self.gate);
        }
        v
    }

    /// Reads [`Thresholds::to_json`]'s document; `what` names the source in errors.
    pub fn from_json(v: &Value, what: &str) -> Result<Self> {
        let bad = |m: &str| Error::arg(format!("{what}: {m}"));
        if v.get("format").and_then(Value::as_str) != Some(FORMAT) {
            return Err(bad(&format!("not a thresholds file (expected \"format\": \"{FORMAT}\")")));
        }
        let lens = v.get("prompt_lengths").and_then(Value::as_array).ok_or_else(|| bad("missing 'prompt_lengths'"))?;
        let prompt_lengths = lens
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize).ok_or_else(|| bad("'prompt_lengths' must be positive integers")))
            .collect::<Result<Vec<_>>>()?;
        let rows = v.get("thresholds").and_then(Value::as_array).ok_or_else(|| bad("missing 'thresholds'"))?;
        let values = rows
            .iter()
            .map(|r| {
                r.as_array()
                    .ok_or_else(|| bad("'thresholds' must be a list of lists of numbers"))?
                    .iter()
                    .map(|x| x.as_f64().map(|x| x as f32).ok_or_else(|| bad("thresholds must be numbers")))
                    .collect::<Result<Vec<f32>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let gate = match v.get("gate") {
            None | Some(Value::Null) => vec![],
            Some(g) => g
                .as_array()
                .ok_or_else(|| bad("'gate' must be a list of numbers, one per layer"))?
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32).ok_or_else(|| bad("gate thresholds must be numbers")))
                .collect::<Result<Vec<f32>>>()?,
        };
        let t = Self { prompt_lengths, values, gate, meta: v.get("meta").cloned().unwrap_or_else(|| json!({})) };
        if t.values.is_empty() {
            return Err(bad("'thresholds' is empty"));
        }
        let layers = t.num_layers();
        t.validate(layers).map_err(|e| bad(&e.to_string()))?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_interpolate() {
        assert!(matches!(Sparsity::parse("dense").unwrap(), Sparsity::Dense));
        assert!(matches!(Sparsity::parse("griffin:0.5").unwrap(), Sparsity::Griffin { density } if density == 0.5));
        assert!(matches!(Sparsity::parse("tda:1").unwrap(), Sparsity::TdaDensity(d) if d == 1.0));
        for bad in ["tda", "tda:0", "tda:1.5", "tda:nan", "foo:0.5", "griffin:x", "dense:0.5"] {
            assert!(Sparsity::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(Sparsity::parse("cats:0.7").unwrap(), Sparsity::Cats(k) if k == 0.7));
        assert!(
            matches!(Sparsity::parse("hybrid:0.9, 0.5").unwrap(), Sparsity::Hybrid { density, keep } if density == 0.9 && keep == 0.5)
        );
        for bad in ["cats", "cats:0", "cats:1.01", "hybrid:0.9", "hybrid:0.9,0", "hybrid:0,0.5", "hybrid:a,b"] {
            assert!(Sparsity::parse(bad).is_err(), "{bad}");
        }
        let t = Thresholds {
            prompt_lengths: vec![16, 64],
            values: vec![vec![1.0, 2.0], vec![3.0, 2.0]],
            gate: vec![0.5, 0.0],
            meta: json!({}),
        };
        let mut out = vec![];
        t.at(8, &mut out);
        assert_eq!(out, vec![1.0, 2.0]);
        t.at(32, &mut out);
        assert!((out[0] - 2.0).abs() < 1e-6 && out[1] == 2.0);
        t.at(1000, &mut out);
        assert_eq!(out, vec![3.0, 2.0]);
        let back = Thresholds::from_json(&t.to_json(), "t").unwrap();
        assert_eq!(back, t);
        assert!(Thresholds::fixed(vec![f32::NAN]).validate(1).is_err());
        assert!(Thresholds::fixed(vec![0.1]).validate(2).is_err());
        let mut g = Thresholds::fixed(vec![0.1, 0.2]);
        g.gate = vec![0.3];
        assert!(g.validate(2).is_err());
        g.gate = vec![0.3, f32::INFINITY];
        assert!(g.validate(2).is_err());
    }
}
