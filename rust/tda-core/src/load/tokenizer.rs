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

    /// Builds a tokenizer from a `tokenizer.json` document and its special tokens and template
    /// (used for GGUF files, whose metadata carries the same information).
    pub fn from_parts(
        tokenizer_json: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
        chat_template: Option<String>,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes())
            .map_err(|e| Error::model(format!("invalid tokenizer: {e}")))?;
        Ok(Self { inner, bos_token, eos_token, chat_template })
    }

    /// The underlying `tokenizers` tokenizer (e.g. to save it as tokenizer.json).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
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
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::arg(format!("cannot detokenize ids: {e}")))
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
        env.add_function("strftime_now", |fmt: String| strftime_utc_today(&fmt));
        env.add_template("chat", template).map_err(|e| Error::model(format!("invalid chat template: {e}")))?;
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

/// The chat template to use when a model carries none (GGUF files often omit it): the official
/// template of the architecture's instruction-tuned models, as llama.cpp also falls back to.
pub fn builtin_chat_template(arch: crate::config::Arch) -> Option<&'static str> {
    use crate::config::Arch;
    match arch {
        Arch::Gemma | Arch::Gemma2 | Arch::Gemma3 => Some(include_str!("chat_templates/gemma.jinja")),
        _ => None,
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

/// Today's UTC date in a `strftime` format (the subset chat templates use: %d %m %Y %y %b %B %A %a %%).
fn strftime_utc_today(fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (m, weekday) = ((month - 1) as usize, DAYS[days.rem_euclid(7) as usize]);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[m][..3]),
            Some('B') => out.push_str(MONTHS[m]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_a_plausible_date() {
        let s = strftime_utc_today("%d %b %Y|%B|%m|%A|100%%");
        let parts: Vec<&str> = s.split('|').collect();
        let dmy: Vec<&str> = parts[0].split(' ').collect();
        assert_eq!(dmy[0].len(), 2);
        assert!(dmy[2].parse::<i32>().unwrap() >= 2024);
        assert!(parts[1].starts_with(dmy[1]));
        assert!((1..=12).contains(&parts[2].parse::<i32>().unwrap()));
        assert!(parts[3].ends_with("day"));
        assert_eq!(parts[4], "100%");
    }
}
