//! Per-neuron statistics of the FFN intermediate activation over the prompt, accumulated inside
//! the prefill. For the `S` prompt rows `A[t, :]` of a layer:
//!
//! ```text
//! sum_sq[j]  = sum_t A[t, j]^2                    TDA:     s_j = sqrt(sum_sq[j] / S)
//! griffin[j] = sum_t A[t, j]^2 / ||A[t, :]||^2     GRIFFIN: s_j = sqrt(griffin[j])
//! ```
//!
//! Two passes over `A` per row, against the `3 d n` multiply-adds per row of the FFN itself.

pub struct NeuronStats {
    /// Prompt rows seen so far.
    pub tokens: usize,
    n: usize,
    sum_sq: Vec<Vec<f32>>,
    griffin: Vec<Vec<f32>>,
}

impl NeuronStats {
    pub fn new(layers: usize, n: usize) -> Self {
        Self { tokens: 0, n, sum_sq: vec![vec![0.0; n]; layers], griffin: vec![vec![0.0; n]; layers] }
    }

    pub fn layers(&self) -> usize {
        self.sum_sq.len()
    }

    pub fn neurons(&self) -> usize {
        self.n
    }

    pub fn reset(&mut self) {
        self.tokens = 0;
        self.sum_sq.iter_mut().chain(self.griffin.iter_mut()).for_each(|v| v.fill(0.0));
    }

    /// Adds the statistics of one forward over `rows` prompt rows: `acc` holds, per layer, the `n`
    /// sums of `A^2` and then the `n` sums of the row-normalised `A^2` (see `Backend::observe`).
    pub fn add(&mut self, rows: usize, acc: &[f32]) {
        let n = self.n;
        self.tokens += rows;
        for (l, (ss, gr)) in self.sum_sq.iter_mut().zip(self.griffin.iter_mut()).enumerate() {
            let (a, g) = acc[2 * l * n..2 * (l + 1) * n].split_at(n);
            ss.iter_mut().zip(a).for_each(|(s, a)| *s += a);
            gr.iter_mut().zip(g).for_each(|(s, g)| *s += g);
        }
    }

    /// Adds `rows` rows of layer `layer`'s activation `a` (`rows x n`). Layer 0 counts the rows.
    pub fn observe(&mut self, layer: usize, a: &[f32], rows: usize) {
        let n = self.n;
        if layer == 0 {
            self.tokens += rows;
        }
        let (ss, gr) = (&mut self.sum_sq[layer], &mut self.griffin[layer]);
        for row in a[..rows * n].chunks_exact(n) {
            let norm2 = crate::kernels::cpu::dot(row, row);
            let inv = if norm2 > 0.0 { 1.0 / norm2 } else { 0.0 };
            for ((s, g), v) in ss.iter_mut().zip(gr.iter_mut()).zip(row) {
                let v2 = v * v;
                *s += v2;
                *g += v2 * inv;
            }
        }
    }

    /// TDA scores of `layer`: the root mean square of each neuron's activation over the prompt.
    pub fn tda_scores(&self, layer: usize, out: &mut Vec<f32>) {
        let inv = 1.0 / self.tokens.max(1) as f32;
        out.clear();
        out.extend(self.sum_sq[layer].iter().map(|s| (s * inv).sqrt()));
    }

    /// GRIFFIN scores of `layer`: the norm of each neuron's column of the row-normalised activation.
    pub fn griffin_scores(&self, layer: usize, out: &mut Vec<f32>) {
        out.clear();
        out.extend(self.griffin[layer].iter().map(|g| g.sqrt()));
    }

    /// `sum_t A[t, j]^2` of `layer` (the activation energy of each neuron).
    pub fn energy(&self, layer: usize) -> &[f32] {
        &self.sum_sq[layer]
    }

    pub fn copy_from(&mut self, other: &NeuronStats) {
        self.tokens = other.tokens;
        for (a, b) in self.sum_sq.iter_mut().zip(&other.sum_sq) {
            a.copy_from_slice(b);
        }
        for (a, b) in self.griffin.iter_mut().zip(&other.griffin) {
            a.copy_from_slice(b);
        }
    }
}

impl Clone for NeuronStats {
    fn clone(&self) -> Self {
        Self { tokens: self.tokens, n: self.n, sum_sq: self.sum_sq.clone(), griffin: self.griffin.clone() }
    }
}
