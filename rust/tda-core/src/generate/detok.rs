//! Incremental detokenisation: the text added by each new token, never splitting a character.
//!
//! Decodes a short window `ids[prefix..]` and subtracts the text of `ids[prefix..read]`, so that
//! tokenizers whose output depends on the neighbours (SentencePiece spaces, byte fallback) stay right.

use crate::error::Result;
use crate::load::tokenizer::TextTokenizer;

#[derive(Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Adds a token and returns the text it completes (possibly empty, e.g. half of a UTF-8 character).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(now[before.len()..].to_string())
        } else {
            Ok(String::new())
        }
    }
}
