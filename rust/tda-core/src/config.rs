//! Model hyper-parameters: HF `config.json` (classic and transformers-5 layouts) turned into one
//! [`ModelConfig`]. Architectures differ only by the flags here; one decoder serves them all.

use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// The architectures this engine runs, by their HF `architectures[0]` name.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Gemma,
    Gemma2,
    Gemma3,
    Qwen2,
    Qwen3,
}

/// The gate activation of the gated FFN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
}

/// How an RMSNorm applies its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormStyle {
    /// `x / rms(x) * w` (Llama, Mistral, Qwen).
    Scale,
    /// `x / rms(x) * (1 + w)` (Gemma family).
    OnePlus,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors (llama.cpp's `rope_freqs` tensor, Llama 3.1-style scaling).
    Factors(Vec<f64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Per-layer attention layout.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// A query at position p sees keys at positions p-W+1 ..= p (HF's sliding-window mask).
    pub sliding_window: Option<usize>,
    /// Index into [`ModelConfig::ropes`].
    pub rope: usize,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The HF class name, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub norm: NormStyle,
    pub act: Activation,
    /// Gemma scales the embeddings by sqrt(hidden_size).
    pub embed_scale: Option<f32>,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm over head_dim on q and k before rope (Gemma 3, Qwen 3).
    pub qk_norm: bool,
    /// Gemma 2/3: extra norms after attention and around the FFN.
    pub sandwich_norm: bool,
    /// Multiplies q.k (1/sqrt(head_dim), or 1/sqrt(query_pre_attn_scalar)).
    pub query_scale: f32,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    pub ropes: Vec<RopeConfig>,
    pub layers: Vec<LayerSpec>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint declares (`torch_dtype` or `dtype`), informational.
    pub declared_dtype: Option<String>,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parses an HF `config.json` text. `source` names the file in errors.
    pub fn from_hf_json(text: &str, source: &str) -> Result<Self> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| Error::model(format!("invalid JSON in {source}: {e}")))?;
        let root = root.as_object().ok_or_else(|| Error::model(format!("{source}: expected a JSON object")))?;
        let architecture = match root.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str) {
            Some(a) => a.to_string(),
            None => match root.get("model_type").and_then(Value::as_str) {
                Some(t) => model_type_to_arch(t).unwrap_or(t).to_string(),
                None => return Err(Error::model(format!("{source}: missing required field 'architectures'"))),
            },
        };
        let arch = match architecture.as_str() {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "GemmaForCausalLM" => Arch::Gemma,
            "Gemma2ForCausalLM" => Arch::Gemma2,
            "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => Arch::Gemma3,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            other => {
                return Err(Error::model(format!(
                    "unsupported architecture '{other}' in {source}; supported: {}",
                    SUPPORTED_ARCHITECTURES.join(", ")
                )))
            }
        };
        // Multimodal Gemma 3 keeps the text model's fields in `text_config`.
        let cfg = match root.get("text_config").and_then(Value::as_object) {
            Some(tc) if architecture == "Gemma3ForConditionalGeneration" => tc,
            _ => root,
        };
        let f = Fields { map: cfg, source };
        let gemma = matches!(arch, Arch::Gemma | Arch::Gemma2 | Arch::Gemma3);

        let hidden_size = f.req_usize("hidden_size")?;
        let num_heads = f.req_usize("num_attention_heads")?;
        let num_layers = f.req_usize("num_hidden_layers")?;
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if matches!(arch, Arch::Qwen3) => 128,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(Error::model(format!(
                        "{source}: hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} and no head_dim is given"
                    )));
                }
                hidden_size / num_heads
            }
        };
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::model(format!(
                "{source}: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        for (name, v) in [
            ("hidden_size", hidden_size),
            ("num_attention_heads", num_heads),
            ("num_hidden_layers", num_layers),
            ("head_dim", head_dim),
        ] {
            if v == 0 {
                return Err(Error::model(format!("{source}: field '{name}' must be positive")));
            }
        }
        if head_dim % 2 != 0 {
            return Err(Error::model(format!("{source}: head_dim {head_dim} must be even for rotary embeddings")));
        }

        let act_name = f
            .opt_str("hidden_activation")
            .or_else(|| if gemma { None } else { f.opt_str("hidden_act") })
            .unwrap_or(if gemma { "gelu_pytorch_tanh" } else { "silu" });
        let act = match act_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            other => return Err(Error::model(format!("{source}: unsupported activation '{other}'"))),
        };

        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };

        let (query_scale, attn_softcap, final_softcap) = match arch {
            Arch::Gemma2 | Arch::Gemma3 => {
                let qpas = f.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
                let (a_def, f_def) = if arch == Arch::Gemma2 { (Some(50.0), Some(30.0)) } else { (None, None) };
                let attn = f.opt_f64_or_null("attn_logit_softcapping", a_def)?;
                let fin = f.opt_f64_or_null("final_logit_softcapping", f_def)?;
                ((qpas.powf(-0.5)) as f32, attn.map(|v| v as f32), fin.map(|v| v as f32))
            }
            _ => ((head_dim as f64).powf(-0.5) as f32, None, None),
        };

        let (ropes, layer_rope) = parse_ropes(&f, arch)?;
        let layer_kinds = layer_types(&f, arch, num_layers)?;
        let window = f.opt_usize("sliding_window")?;
        let layers = layer_kinds
            .iter()
            .map(|&sliding| {
                let sliding_window = if sliding {
                    Some(window.ok_or_else(|| {
                        Error::model(format!("{source}: sliding-window layers need a 'sliding_window' size"))
                    })?)
                } else {
                    None
                };
                Ok(LayerSpec { sliding_window, rope: layer_rope(sliding) })
            })
            .collect::<Result<Vec<_>>>()?;

        let default_max_pos = match arch {
            Arch::Llama => 2048,
            Arch::Mistral => 32768,
            Arch::Gemma | Arch::Gemma2 => 8192,
            Arch::Gemma3 => 131072,
            Arch::Qwen2 | Arch::Qwen3 => 32768,
        };
        let cfg = ModelConfig {
            architecture,
            arch,
            vocab_size: f.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.req_usize("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(default_max_pos),
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            norm: if gemma { NormStyle::OnePlus } else { NormStyle::Scale },
            act,
            embed_scale: if gemma { Some((hidden_size as f32).sqrt()) } else { None },
            tie_word_embeddings: f
                .opt_bool("tie_word_embeddings")?
                .or_else(|| root.get("tie_word_embeddings").and_then(Value::as_bool))
                .unwrap_or(gemma),
            qkv_bias,
            o_bias,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            qk_norm: matches!(arch, Arch::Gemma3 | Arch::Qwen3),
            sandwich_norm: matches!(arch, Arch::Gemma2 | Arch::Gemma3),
            query_scale,
            attn_softcap,
            final_softcap,
            ropes,
            layers,
            bos_token_id: token_ids(cfg.get("bos_token_id").or_else(|| root.get("bos_token_id"))).first().copied(),
            eos_token_ids: token_ids(cfg.get("eos_token_id").or_else(|| root.get("eos_token_id"))),
            declared_dtype: f
                .opt_str("dtype")
                .or_else(|| f.opt_str("torch_dtype"))
                .or_else(|| root.get("torch_dtype").and_then(Value::as_str))
                .map(str::to_string),
        };
        if cfg.vocab_size == 0 || cfg.intermediate_size == 0 {
            return Err(Error::model(format!("{source}: vocab_size and intermediate_size must be positive")));
        }
        Ok(cfg)
    }
}

/// The largest value each count of a config may take. Every count sizes an allocation (weights, run
/// state, rope tables), so a corrupt or absurd config is refused before anything is allocated. The
/// limits sit far above every released model of the supported families (the largest: 126 layers,
/// hidden size 16384, 128 heads, head_dim 256, a vocabulary of 262144, a context of 10 M) and far
/// below what would exhaust a machine's memory just for bookkeeping.
pub const LIMITS: &[(&str, u64)] = &[
    ("num_hidden_layers", 1 << 12),
    ("hidden_size", 1 << 17),
    ("intermediate_size", 1 << 20),
    ("num_attention_heads", 1 << 12),
    ("num_key_value_heads", 1 << 12),
    ("head_dim", 1 << 12),
    ("vocab_size", 1 << 23),
    ("max_position_embeddings", 1 << 26),
    ("sliding_window", 1 << 26),
    ("sliding_window_pattern", 1 << 12),
];

/// Checks `value` of the config field `field` against [`LIMITS`]; the error names `shown` (the
/// field's name where it was read: the HF name, or a GGUF metadata key) and `source`.
pub fn check_limit(field: &str, shown: &str, value: u64, source: &str) -> Result<()> {
    match LIMITS.iter().find(|(f, _)| *f == field) {
        Some(&(_, max)) if value > max => Err(Error::model(format!(
            "{source}: '{shown}' is {value}, more than any supported model has (at most {max}); \
             the config is corrupt or not for this engine"
        ))),
        _ => Ok(()),
    }
}

fn model_type_to_arch(t: &str) -> Option<&'static str> {
    Some(match t {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "gemma" => "GemmaForCausalLM",
        "gemma2" => "Gemma2ForCausalLM",
        "gemma3_text" => "Gemma3ForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        _ => return None,
    })
}

/// `eos_token_id` may be an int, a list of ints, or null.
pub(crate) fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

/// Which layers use sliding-window attention: `layer_types` when given, else each architecture's rule.
fn layer_types(f: &Fields, arch: Arch, n: usize) -> Result<Vec<bool>> {
    if let Some(v) = f.map.get("layer_types").filter(|v| !v.is_null()) {
        let list = v.as_array().ok_or_else(|| Error::model(format!("{}: 'layer_types' must be a list", f.source)))?;
        if list.len() != n {
            return Err(Error::model(format!(
                "{}: 'layer_types' has {} entries but num_hidden_layers is {n}",
                f.source,
                list.len()
            )));
        }
        return list
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                other => Err(Error::model(format!("{}: unsupported layer type {other:?}", f.source))),
            })
            .collect();
    }
    let window = f.opt_usize("sliding_window")?;
    Ok((0..n)
        .map(|i| match arch {
            Arch::Mistral => window.is_some(),
            Arch::Qwen2 | Arch::Qwen3 => {
                let use_sw = f.opt_bool("use_sliding_window").ok().flatten().unwrap_or(false);
                let max_window_layers = f.opt_usize("max_window_layers").ok().flatten().unwrap_or(n);
                use_sw && window.is_some() && i >= max_window_layers
            }
            Arch::Gemma2 => (i + 1) % 2 != 0,
            Arch::Gemma3 => {
                let pattern = f
                    .opt_usize("sliding_window_pattern")
                    .ok()
                    .flatten()
                    .or_else(|| f.opt_usize("_sliding_window_pattern").ok().flatten())
                    .unwrap_or(6);
                (i + 1) % pattern != 0
            }
            Arch::Llama | Arch::Gemma => false,
        })
        .collect())
}

type LayerRope = Box<dyn Fn(bool) -> usize>;

/// Rope settings in both layouts. Returns the distinct rope configs and, given whether a layer is
/// sliding, which one it uses (only Gemma 3 gives local layers their own base).
fn parse_ropes(f: &Fields, arch: Arch) -> Result<(Vec<RopeConfig>, LayerRope)> {
    let default_theta = match arch {
        Arch::Gemma3 => 1_000_000.0,
        _ => 10_000.0,
    };
    let params = f.map.get("rope_parameters").and_then(Value::as_object);
    if arch == Arch::Gemma3 {
        let (global, local) = match params {
            Some(p) if p.contains_key("full_attention") || p.contains_key("sliding_attention") => {
                let g = match p.get("full_attention").and_then(Value::as_object) {
                    Some(m) => rope_from_obj(m, default_theta, f.source)?,
                    None => RopeConfig { theta: default_theta, scaling: RopeScaling::None },
                };
                let l = match p.get("sliding_attention").and_then(Value::as_object) {
                    Some(m) => rope_from_obj(m, 10_000.0, f.source)?,
                    None => RopeConfig { theta: 10_000.0, scaling: RopeScaling::None },
                };
                (g, l)
            }
            Some(p) => (rope_from_obj(p, default_theta, f.source)?, classic_local(f)?),
            None => (classic_rope(f, default_theta)?, classic_local(f)?),
        };
        return Ok((vec![global, local], Box::new(usize::from)));
    }
    let rope = match params {
        Some(p) => rope_from_obj(p, default_theta, f.source)?,
        None => classic_rope(f, default_theta)?,
    };
    Ok((vec![rope], Box::new(|_| 0)))
}

fn classic_local(f: &Fields) -> Result<RopeConfig> {
    Ok(RopeConfig { theta: f.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0), scaling: RopeScaling::None })
}

fn classic_rope(f: &Fields, default_theta: f64) -> Result<RopeConfig> {
    let theta = f.opt_f64("rope_theta")?.unwrap_or(default_theta);
    let scaling = match f.map.get("rope_scaling").and_then(Value::as_object) {
        Some(m) => scaling_from_obj(m, f.source)?,
        None => RopeScaling::None,
    };
    Ok(RopeConfig { theta, scaling })
}

fn rope_from_obj(m: &Map<String, Value>, default_theta: f64, source: &str) -> Result<RopeConfig> {
    let theta = m.get("rope_theta").and_then(Value::as_f64).unwrap_or(default_theta);
    Ok(RopeConfig { theta, scaling: scaling_from_obj(m, source)? })
}

fn scaling_from_obj(m: &Map<String, Value>, source: &str) -> Result<RopeScaling> {
    let kind = m.get("rope_type").or_else(|| m.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        m.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::model(format!("{source}: rope scaling '{kind}' needs the field '{k}'")))
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(Error::model(format!(
                "{source}: unsupported rope scaling type '{other}' (supported: default, linear, llama3)"
            )))
        }
    })
}

/// Typed access to config fields with errors that name the field and the file.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    source: &'a str,
}

impl Fields<'_> {
    fn bad(&self, key: &str, want: &str) -> Error {
        Error::model(format!("{}: field '{key}' must be {want}, got {}", self.source, self.map[key]))
    }
    fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| Error::model(format!("{}: missing required field '{key}'", self.source)))
    }
    /// A count, checked against its [`LIMITS`] entry before anything is sized by it.
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let x = v.as_u64().ok_or_else(|| self.bad(key, "a non-negative integer"))?;
                check_limit(key, key, x, self.source)?;
                Ok(Some(x as usize))
            }
        }
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.bad(key, "a number")),
        }
    }
    /// Absent means `default`; an explicit null means "off".
    fn opt_f64_or_null(&self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.map.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.bad(key, "a number or null")),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.bad(key, "true or false")),
        }
    }
    fn opt_str(&self, key: &str) -> Option<&str> {
        self.map.get(key).and_then(Value::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
        "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":32},"torch_dtype":"float32"}"#;

    #[test]
    fn classic_and_v5_layouts_agree() {
        let classic = ModelConfig::from_hf_json(LLAMA, "c").unwrap();
        let v5 = LLAMA
            .replace(
                r#""rope_theta":500000.0,"rope_scaling":{"rope_type""#,
                r#""rope_parameters":{"rope_theta":500000.0,"rope_type""#,
            )
            .replace("torch_dtype", "dtype");
        let v5 = ModelConfig::from_hf_json(&v5, "v").unwrap();
        assert_eq!(classic.ropes, v5.ropes);
        assert_eq!(classic.declared_dtype, v5.declared_dtype);
        assert_eq!(classic.head_dim, 16);
        assert!(matches!(classic.ropes[0].scaling, RopeScaling::Llama3 { .. }));
    }

    #[test]
    fn gemma3_layer_rules() {
        let cfg = r#"{"architectures":["Gemma3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":7,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":32,"vocab_size":100,
            "sliding_window":8,"sliding_window_pattern":3,"rope_theta":1000000.0,"rope_local_base_freq":10000.0,
            "query_pre_attn_scalar":16}"#;
        let c = ModelConfig::from_hf_json(cfg, "g").unwrap();
        let sliding: Vec<bool> = c.layers.iter().map(|l| l.sliding_window.is_some()).collect();
        assert_eq!(sliding, [true, true, false, true, true, false, true]);
        assert_eq!(c.ropes[c.layers[0].rope].theta, 10000.0);
        assert_eq!(c.ropes[c.layers[2].rope].theta, 1000000.0);
        assert!((c.query_scale - 0.25).abs() < 1e-7);
        assert_eq!(c.final_softcap, None);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = ModelConfig::from_hf_json(&LLAMA.replace("LlamaForCausalLM", "FooForCausalLM"), "x").unwrap_err();
        assert!(e.to_string().contains("FooForCausalLM") && e.to_string().contains("Qwen3ForCausalLM"));
        let e = ModelConfig::from_hf_json(&LLAMA.replace(r#""hidden_size":64,"#, ""), "x").unwrap_err();
        assert!(e.to_string().contains("'hidden_size'"), "{e}");
        let e = ModelConfig::from_hf_json(&LLAMA.replace("llama3", "yarn"), "x").unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
    }
}
