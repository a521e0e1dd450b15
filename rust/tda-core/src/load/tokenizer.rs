//! Text <-> token ids (HF `tokenizer.json` through the `tokenizers` crate), special tokens from
//! `tokenizer_config.json`, and the chat template (jinja, rendered with minijinja).

use crate::error::{parse_json, read_text, Error, Result};
use serde_json::Value;
use std::path::Path;

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json` and `chat_template.jinja` (optional).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = read_text(&path, "tokenizer file")?;
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| Error::model(format!("invalid tokenizer file {}: {e}", path.display())))?;
        let mut tok = Self { inner, bos_token: None, eos_token: None, chat_template: None };
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let cfg: Value = parse_json(&read_text(&cfg_path, "tokenizer config")?, &cfg_path)?;
            tok.bos_token = special_token(cfg.get("bos_token"));
            tok.eos_token = special_token(cfg.get("eos_token"));
            tok.chat_template = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default", else the first.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            tok.chat_template = Some(read_text(&jinja, "chat template")?);
        }
        Ok(tok)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::arg(format!("cannot tokenize text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::arg(format!("cannot detokenize ids: {e}")))
    }

    /// Renders a conversation (a JSON list of `{"role", "content"}` objects) with the model's template.
    pub fn apply_chat_template(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::arg("this model has no chat template (tokenizer_config.json has no 'chat_template')")
        })?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for "today's date"; a fixed, documented answer keeps rendering deterministic.
            let _ = fmt;
            "26 Jul 2024".to_string()
        });
        env.add_template("chat", template)
            .map_err(|e| Error::model(format!("invalid chat template: {e}")))?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| Error::arg(format!("chat template failed: {e}")))
    }
}

/// `"<s>"` or `{"content": "<s>", ...}`.
fn special_token(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}
