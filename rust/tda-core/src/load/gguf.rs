//! GGUF files (llama.cpp's container): hyper-parameters from the metadata, tensors dequantized at
//! load time, and llama.cpp's converter conventions undone so the model sees HF's tensors:
//! - Llama q/k projections are stored with rows permuted for llama.cpp's interleaved rope;
//! - Gemma RMSNorm weights are stored as `1 + w`;
//! - a tied output matrix is omitted (`output.weight` absent).
//!
//! The metadata is translated into an HF `config.json` object, so one parser ([`ModelConfig`])
//! serves both formats, and `convert` can write it out.

use super::{Precision, WeightData, WeightSource};
use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::quant::{QBlocks, QType};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value as Json};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// GGUF `general.architecture` values, the HF class and the HF `model_type` each maps to.
const ARCHITECTURES: &[(&str, &str, &str)] = &[
    ("llama", "LlamaForCausalLM", "llama"),
    ("mistral", "MistralForCausalLM", "mistral"),
    ("gemma", "GemmaForCausalLM", "gemma"),
    ("gemma2", "Gemma2ForCausalLM", "gemma2"),
    ("gemma3", "Gemma3ForCausalLM", "gemma3_text"),
    ("qwen2", "Qwen2ForCausalLM", "qwen2"),
    ("qwen3", "Qwen3ForCausalLM", "qwen3"),
];

/// Pairs of (GGUF, HF) module names.
type NameTable = &'static [(&'static str, &'static str)];

/// Top-level tensors, (GGUF, HF).
const TOP_NAMES: NameTable =
    &[("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")];

pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file: Mutex<File>,
    arch: String,
}

/// Whether a file starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

impl GgufFile {
    /// Reads the header, metadata and tensor directory, and checks that every tensor lies inside
    /// the file (a truncated download fails here, not halfway through loading).
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::not_found(path, "GGUF file"),
            _ => Error::model(format!("cannot open {}: {e}", path.display())),
        })?;
        let bad = |e: candle_core::Error| Error::model(format!("invalid GGUF file {}: {e}", path.display()));
        if !is_gguf(path) {
            return Err(Error::model(format!("{} is not a GGUF file (bad magic)", path.display())));
        }
        let content = Content::read(&mut file).map_err(bad)?;
        let file_size = file.metadata().map_err(|e| Error::model(e.to_string()))?.len();
        for (name, info) in &content.tensor_infos {
            // Checked arithmetic: a corrupt directory's dimensions must not wrap around into a
            // small, plausible size.
            let elems = info.shape.dims().iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            let block = info.ggml_dtype.block_size() as u64;
            let end = elems.filter(|e| e % block == 0).and_then(|e| {
                (e / block)
                    .checked_mul(info.ggml_dtype.type_size() as u64)?
                    .checked_add(content.tensor_data_offset)?
                    .checked_add(info.offset)
            });
            let Some(_) = end.filter(|&end| end <= file_size) else {
                let end = end.map_or("beyond any file size".to_string(), |e| format!("up to {e}"));
                return Err(Error::model(format!(
                    "truncated or corrupt GGUF file {}: tensor '{name}' (shape {:?}) needs bytes {end}, the file has {file_size}",
                    path.display(),
                    info.shape.dims()
                )));
            };
        }
        let arch = meta_str(&content, "general.architecture", path)?.to_string();
        Ok(Self { path: path.to_path_buf(), content, file: Mutex::new(file), arch })
    }

    pub fn metadata(&self) -> &std::collections::HashMap<String, Value> {
        &self.content.metadata
    }

    /// The HF `config.json` equivalent of the metadata.
    pub fn hf_config(&self) -> Result<Json> {
        let a = self.arch.as_str();
        let (_, class, model_type) = ARCHITECTURES.iter().find(|(g, _, _)| *g == a).ok_or_else(|| {
            let names: Vec<&str> = ARCHITECTURES.iter().map(|(g, _, _)| *g).collect();
            Error::model(format!(
                "unsupported GGUF architecture '{a}' in {}; supported: {}",
                self.path.display(),
                names.join(", ")
            ))
        })?;
        let key = |k: &str| format!("{a}.{k}");
        let source = self.path.display().to_string();
        // Each count is checked against the config limits under its GGUF name, before it sizes anything.
        let opt = |k: &str, hf: &str| -> Result<Option<u64>> {
            let v = self.meta_u64(&key(k))?;
            if let Some(v) = v {
                crate::config::check_limit(hf, &key(k), v, &source)?;
            }
            Ok(v)
        };
        let req = |k: &str| -> Result<u64> {
            let hf = match k {
                "attention.head_count" => "num_attention_heads",
                "embedding_length" => "hidden_size",
                "feed_forward_length" => "intermediate_size",
                "block_count" => "num_hidden_layers",
                "context_length" => "max_position_embeddings",
                _ => "",
            };
            opt(k, hf)?.ok_or_else(|| self.missing(&key(k)))
        };
        let heads = req("attention.head_count")?;
        let hidden = req("embedding_length")?;
        let embd = self.content.tensor_infos.get("token_embd.weight").ok_or_else(|| {
            Error::model(format!("GGUF file {} has no tensor 'token_embd.weight'", self.path.display()))
        })?;
        let vocab = embd.shape.dims()[0];
        let head_dim = opt("attention.key_length", "head_dim")?.unwrap_or(hidden / heads.max(1));
        let mut c = Map::new();
        c.insert("architectures".into(), json!([class]));
        c.insert("model_type".into(), json!(model_type));
        c.insert("hidden_size".into(), json!(hidden));
        c.insert("intermediate_size".into(), json!(req("feed_forward_length")?));
        c.insert("num_hidden_layers".into(), json!(req("block_count")?));
        c.insert("num_attention_heads".into(), json!(heads));
        c.insert(
            "num_key_value_heads".into(),
            json!(opt("attention.head_count_kv", "num_key_value_heads")?.unwrap_or(heads)),
        );
        c.insert("head_dim".into(), json!(head_dim));
        c.insert("vocab_size".into(), json!(vocab));
        c.insert("max_position_embeddings".into(), json!(req("context_length")?));
        if let Some(eps) = self.meta_f64(&key("attention.layer_norm_rms_epsilon"))? {
            c.insert("rms_norm_eps".into(), json!(eps));
        }
        let has = |t: &str| self.content.tensor_infos.contains_key(t);
        c.insert("tie_word_embeddings".into(), json!(!has("output.weight")));
        c.insert("attention_bias".into(), json!(has("blk.0.attn_q.bias") || has("blk.0.attn_output.bias")));
        c.insert("mlp_bias".into(), json!(has("blk.0.ffn_up.bias")));
        for (k, hf) in
            [("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")]
        {
            if let Some(v) = self.meta_u64(k)? {
                c.insert(hf.into(), json!(v));
            }
        }
        let theta = self.meta_f64(&key("rope.freq_base"))?;
        let scaling = match self.meta_str_opt(&key("rope.scaling.type")) {
            None | Some("none") => Json::Null,
            Some("linear") => {
                json!({"rope_type": "linear", "factor": self.meta_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0)})
            }
            Some(other) => {
                return Err(Error::model(format!(
                    "unsupported rope scaling '{other}' in GGUF file {}",
                    self.path.display()
                )))
            }
        };
        let window = opt("attention.sliding_window", "sliding_window")?;
        match a {
            "gemma3" => {
                c.insert("rope_theta".into(), json!(theta.unwrap_or(1_000_000.0)));
                c.insert("rope_local_base_freq".into(), json!(10_000.0));
                c.insert("rope_scaling".into(), scaling);
                c.insert("sliding_window".into(), json!(window));
                let pattern = opt("attention.sliding_window_pattern", "sliding_window_pattern")?.unwrap_or(6);
                c.insert("sliding_window_pattern".into(), json!(pattern));
                c.insert("query_pre_attn_scalar".into(), json!(head_dim));
                c.insert("final_logit_softcapping".into(), Json::Null);
                c.insert("attn_logit_softcapping".into(), Json::Null);
            }
            "gemma2" => {
                c.insert("rope_theta".into(), json!(theta.unwrap_or(10_000.0)));
                c.insert("sliding_window".into(), json!(window));
                c.insert("query_pre_attn_scalar".into(), json!(head_dim));
                for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
                    c.insert(k.into(), json!(self.meta_f64(&key(k))?));
                }
            }
            _ => {
                c.insert("rope_theta".into(), json!(theta.unwrap_or(10_000.0)));
                c.insert("rope_scaling".into(), scaling);
                if a == "mistral" || window.is_some() {
                    c.insert("sliding_window".into(), json!(window));
                }
            }
        }
        Ok(Json::Object(c))
    }

    /// The model configuration; llama.cpp's per-frequency rope factors (`rope_freqs.weight`,
    /// written for Llama 3.1-style scaling) become [`RopeScaling::Factors`].
    pub fn config(&self) -> Result<ModelConfig> {
        let source = self.path.display().to_string();
        let mut cfg = ModelConfig::from_hf_json(&self.hf_config()?.to_string(), &source)?;
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            let f = self.dequantize("rope_freqs.weight")?.flatten_all()?.to_vec1::<f32>()?;
            if f.len() != cfg.head_dim / 2 {
                return Err(Error::model(format!(
                    "{source}: rope_freqs has {} values, expected head_dim / 2 = {}",
                    f.len(),
                    cfg.head_dim / 2
                )));
            }
            for r in &mut cfg.ropes {
                r.scaling = RopeScaling::Factors(f.iter().map(|&x| x as f64).collect());
            }
        }
        Ok(cfg)
    }

    /// A GGUF tensor as f32, in row-major `(rows, cols)` order.
    fn dequantize(&self, name: &str) -> Result<Tensor> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let q = self
            .content
            .tensor(&mut *file, name, &Device::Cpu)
            .map_err(|e| Error::model(format!("cannot read tensor '{name}' from {}: {e}", self.path.display())))?;
        Ok(q.dequantize(&Device::Cpu)?)
    }

    /// (GGUF, HF) module names of this architecture's layers (`blk.N.` / `model.layers.N.`).
    /// Gemma 2/3's "sandwich" norms name the pre-FFN norm differently.
    fn layer_names(&self) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
        const COMMON: NameTable = &[
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("attn_q_norm", "self_attn.q_norm"),
            ("attn_k_norm", "self_attn.k_norm"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
            ("attn_norm", "input_layernorm"),
        ];
        const PLAIN_NORMS: NameTable = &[("ffn_norm", "post_attention_layernorm")];
        const SANDWICH_NORMS: NameTable = &[
            ("post_attention_norm", "post_attention_layernorm"),
            ("ffn_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        ];
        let sandwich = matches!(self.arch.as_str(), "gemma2" | "gemma3");
        COMMON.iter().chain(if sandwich { SANDWICH_NORMS } else { PLAIN_NORMS })
    }

    /// The GGUF tensor name of an HF tensor name, for this file's architecture.
    fn gguf_name(&self, hf: &str) -> Option<String> {
        let (module, suffix) = hf.rsplit_once('.')?;
        if let Some((g, _)) = TOP_NAMES.iter().find(|(_, h)| *h == module) {
            return Some(format!("{g}.{suffix}"));
        }
        let (layer, m) = module.strip_prefix("model.layers.")?.split_once('.')?;
        let (g, _) = self.layer_names().find(|(_, h)| *h == m)?;
        Some(format!("blk.{layer}.{g}.{suffix}"))
    }

    /// The HF name of a GGUF tensor (the inverse of [`Self::gguf_name`]); `None` for tensors that
    /// have no HF counterpart (such as `rope_freqs.weight`, which lives in the config).
    fn hf_name(&self, gguf: &str) -> Option<String> {
        let (module, suffix) = gguf.rsplit_once('.')?;
        if let Some((_, h)) = TOP_NAMES.iter().find(|(g, _)| *g == module) {
            return Some(format!("{h}.{suffix}"));
        }
        let (layer, g) = module.strip_prefix("blk.")?.split_once('.')?;
        let (_, m) = self.layer_names().find(|(name, _)| *name == g)?;
        Some(format!("model.layers.{layer}.{m}.{suffix}"))
    }

    /// Writes the model as an HF directory: `model.safetensors` (float32, HF tensor layout),
    /// `config.json`, `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template).
    pub fn convert_to_hf(&self, out: &Path) -> Result<()> {
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(Error::model(format!(
                "{}: per-frequency rope factors (rope_freqs) have no config.json equivalent; cannot convert",
                self.path.display()
            )));
        }
        let io = |e: std::io::Error| Error::model(format!("cannot write to {}: {e}", out.display()));
        std::fs::create_dir_all(out).map_err(io)?;
        let mut config = self.hf_config()?;
        config["torch_dtype"] = json!("float32");
        let tokenizer = super::gguf_tokenizer::from_gguf(self.metadata())?;
        let tokenizer_json = super::gguf_tokenizer::tokenizer_json_from_gguf(self.metadata())?;
        let mut tensors = std::collections::HashMap::new();
        for (g, info) in &self.content.tensor_infos {
            if let Some(hf) = self.hf_name(g) {
                tensors.insert(hf.clone(), self.tensor(&hf, info.shape.dims(), DType::F32)?);
            }
        }
        candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
        let write = |name: &str, v: &Json| {
            std::fs::write(out.join(name), serde_json::to_string_pretty(v).unwrap_or_default()).map_err(io)
        };
        write("config.json", &config)?;
        std::fs::write(out.join("tokenizer.json"), tokenizer_json).map_err(io)?;
        let mut tc = Map::new();
        tc.insert("bos_token".into(), json!(tokenizer.bos_token));
        tc.insert("eos_token".into(), json!(tokenizer.eos_token));
        if let Some(t) = &tokenizer.chat_template {
            tc.insert("chat_template".into(), json!(t));
        }
        write("tokenizer_config.json", &Json::Object(tc))
    }

    fn meta_u64(&self, k: &str) -> Result<Option<u64>> {
        match self.content.metadata.get(k) {
            None => Ok(None),
            Some(v) => {
                v.to_u64().or_else(|_| v.to_u32().map(u64::from)).map(Some).map_err(|_| self.bad_type(k, "an integer"))
            }
        }
    }

    fn meta_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(k) {
            None => Ok(None),
            Some(v) => {
                v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map(Some).map_err(|_| self.bad_type(k, "a float"))
            }
        }
    }

    fn meta_str_opt(&self, k: &str) -> Option<&str> {
        self.content.metadata.get(k).and_then(|v| v.to_string().ok()).map(String::as_str)
    }

    fn missing(&self, k: &str) -> Error {
        Error::model(format!("GGUF metadata of {} is missing '{k}'", self.path.display()))
    }

    fn bad_type(&self, k: &str, want: &str) -> Error {
        Error::model(format!("GGUF metadata '{k}' in {} must be {want}", self.path.display()))
    }
}

fn meta_str<'a>(c: &'a Content, k: &str, path: &Path) -> Result<&'a str> {
    c.metadata
        .get(k)
        .ok_or_else(|| Error::model(format!("GGUF metadata of {} is missing '{k}'", path.display())))?
        .to_string()
        .map(String::as_str)
        .map_err(|_| Error::model(format!("GGUF metadata '{k}' in {} must be a string", path.display())))
}

/// Undoes llama.cpp's q/k row permutation: GGUF row `h*d + 2j + s` is HF row `h*d + s*d/2 + j`
/// (rows of `cols` elements: values, or the bytes of a row of blocks).
fn unpermute_rows<T: Copy + Default>(data: &[T], rows: usize, cols: usize, heads: usize) -> Vec<T> {
    let d = rows / heads;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for j in 0..d / 2 {
            for s in 0..2 {
                let src = (h * d + 2 * j + s) * cols;
                let dst = (h * d + s * d / 2 + j) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

impl GgufFile {
    /// The GGUF name of HF tensor `name`, checked to exist with exactly `shape` (from the
    /// directory, before the tensor is read or allocated).
    fn checked_name(&self, name: &str, shape: &[usize]) -> Result<String> {
        let g = self
            .gguf_name(name)
            .filter(|g| self.content.tensor_infos.contains_key(g))
            .ok_or_else(|| Error::model(format!("missing tensor '{name}' in GGUF file {}", self.path.display())))?;
        let dims = self.content.tensor_infos[&g].shape.dims();
        if dims != shape {
            return Err(Error::model(format!(
                "tensor '{g}' in {} has shape {dims:?}, expected {shape:?}",
                self.path.display()
            )));
        }
        Ok(g)
    }

    /// llama.cpp permutes Llama's q/k rows (weights and biases) for its rope layout: the number of
    /// heads to undo it over, for such a tensor.
    fn permuted_heads(&self, g: &str) -> Result<Option<usize>> {
        let head_key = if g.contains(".attn_q.") {
            "attention.head_count"
        } else if g.contains(".attn_k.") {
            "attention.head_count_kv"
        } else {
            return Ok(None);
        };
        if self.arch != "llama" {
            return Ok(None);
        }
        let key = format!("{}.{head_key}", self.arch);
        let heads =
            self.meta_u64(&key)?.or(self.meta_u64("llama.attention.head_count")?).ok_or_else(|| self.missing(&key))?;
        Ok(Some(heads as usize))
    }

    /// The blocks of a quantized matrix as stored (q/k rows unpermuted whole); `None` for a
    /// float tensor.
    fn blocks(&self, name: &str, rows: usize, cols: usize) -> Result<Option<QBlocks>> {
        let g = self.checked_name(name, &[rows, cols])?;
        let Some(q) = QType::from_ggml(self.content.tensor_infos[&g].ggml_dtype) else {
            return Ok(None);
        };
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let t = self
            .content
            .tensor(&mut *file, &g, &Device::Cpu)
            .map_err(|e| Error::model(format!("cannot read tensor '{g}' from {}: {e}", self.path.display())))?;
        let data = t.data()?;
        let blocks = match self.permuted_heads(&g)? {
            Some(heads) => QBlocks::from_bytes(q, &unpermute_rows(&data, rows, q.row_bytes(cols), heads)),
            None => QBlocks::from_bytes(q, &data),
        };
        Ok(Some(blocks))
    }
}

impl WeightSource for GgufFile {
    /// Quantized matrices stay in their blocks for [`Precision::Stored`]; everything else is
    /// dequantized (and, for [`Precision::Quant`], quantized again).
    fn matrix(&self, name: &str, rows: usize, cols: usize, want: Precision) -> Result<WeightData> {
        if want == Precision::Stored {
            if let Some(b) = self.blocks(name, rows, cols)? {
                return Ok(WeightData::Blocks(b));
            }
        }
        super::matrix_from_tensor(self, name, rows, cols, want)
    }

    fn contains(&self, name: &str) -> bool {
        self.gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let g = self.checked_name(name, shape)?;
        let t = self.dequantize(&g)?;
        let mut t = t.to_dtype(DType::F32)?;
        if let Some(heads) = self.permuted_heads(&g)? {
            let (rows, cols) = (shape[0], shape.get(1).copied().unwrap_or(1));
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            t = Tensor::from_vec(unpermute_rows(&data, rows, cols, heads), shape, &Device::Cpu)?;
        }
        // llama.cpp stores Gemma's norm weights as 1 + w; the model adds the 1 itself.
        if self.arch.starts_with("gemma") && g.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        Ok(t.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, d, cols) = (3, 8, 2);
        let rows = heads * d;
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for s in 0..2 {
                for j in 0..d / 2 {
                    let src = (h * d + s * d / 2 + j) * cols;
                    let dst = (h * d + j * 2 + s) * cols;
                    gguf[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, cols, heads), hf);
    }
}
