//! Tokenizer from GGUF metadata (`tokenizer.ggml.*`): rebuilt as a `tokenizer.json` document.
//!
//! A GGUF file has no `tokenizer.json`; it stores the vocabulary, merges, scores, token types and
//! special token ids as metadata under llama.cpp's key names. We turn those back into the
//! `tokenizer.json` the `tokenizers` crate reads, following Hugging Face's GGUF conversion
//! (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`) and, where that one departs from
//! the model's original tokenizer, the original tokenizer and llama.cpp (`src/llama-vocab.cpp`):
//!
//! - `tokenizer.ggml.model == "gpt2"`: byte-level BPE. The pre-tokenizer comes from
//!   `tokenizer.ggml.pre`, with llama.cpp's names and regexes (see [`SUPPORTED_BPE_PRE_TYPES`]).
//! - `tokenizer.ggml.model == "llama"`: SentencePiece-style BPE with byte fallback. The merges come
//!   from the file or, when it has none, are rebuilt from the vocabulary (ranked by score; for Gemma
//!   by position in the file, as transformers does).
//! - Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
//!   tokens, and `add_bos_token` / `add_eos_token` a `TemplateProcessing` post-processor.
//!
//! Where we depart from transformers' GGUF conversion, on purpose:
//! - "smollm", "starcoder" and the like split digits one by one first (transformers drops that);
//! - the Llama 3 family keeps BPE's `ignore_merges` (transformers drops it);
//! - "qwen2" / "qwen35" normalize to NFC, as Qwen's own tokenizer does (llama.cpp does not);
//! - a sentencepiece vocabulary gets its space prefix from a `Prepend` normalizer, at the start of
//!   the text and again after each added token, as sentencepiece and llama.cpp do (transformers'
//!   `Metaspace(prepend_scheme="first")` adds none to text that starts with a space);
//! - a missing `add_bos_token` defaults as in llama.cpp (on for sentencepiece and Llama 3).

use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::json;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

/// Builds the tokenizer described by a GGUF file's metadata.
pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<TextTokenizer> {
    let built = build(metadata)?;
    TextTokenizer::from_parts(&built.json, built.bos_token, built.eos_token, built.chat_template)
}

/// The `tokenizer.json` document (as text) that [`from_gguf`] builds its tokenizer from.
pub fn tokenizer_json_from_gguf(metadata: &HashMap<String, Value>) -> Result<String> {
    Ok(build(metadata)?.json)
}

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_UNK: &str = "tokenizer.ggml.unknown_token_id";
const KEY_PAD: &str = "tokenizer.ggml.padding_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_ARCH: &str = "general.architecture";

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// SentencePiece's whitespace marker.
const SPIECE_UNDERLINE: &str = "\u{2581}";

struct Built {
    json: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Metadata access
// ---------------------------------------------------------------------------------------------

fn missing(key: &str) -> Error {
    Error::model(format!("GGUF metadata is missing '{key}'"))
}

fn invalid(key: &str, what: &str) -> Error {
    Error::model(format!("GGUF metadata '{key}' is not {what}"))
}

fn as_int(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn as_float(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(f64::from(*x)),
        Value::F64(x) => Some(*x),
        other => as_int(other).map(|x| x as f64),
    }
}

fn opt_string<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(invalid(key, "a string")),
    }
}

fn opt_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => as_int(v).map(|x| Some(x != 0)).ok_or_else(|| invalid(key, "a boolean")),
    }
}

fn opt_array<'a>(md: &'a HashMap<String, Value>, key: &str, what: &str) -> Result<Option<&'a [Value]>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items.as_slice())),
        Some(_) => Err(invalid(key, what)),
    }
}

fn opt_str_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(items) = opt_array(md, key, "an array of strings")? else { return Ok(None) };
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(invalid(key, "an array of strings")),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// An optional per-token array, checked to cover every token.
fn opt_per_token<T>(
    md: &HashMap<String, Value>,
    key: &str,
    n_tokens: usize,
    what: &str,
    conv: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(items) = opt_array(md, key, what)? else { return Ok(None) };
    if items.len() < n_tokens {
        return Err(Error::model(format!("GGUF metadata '{key}' has {} entries for {n_tokens} tokens", items.len())));
    }
    items[..n_tokens].iter().map(|v| conv(v).ok_or_else(|| invalid(key, what))).collect::<Result<Vec<_>>>().map(Some)
}

/// An optional token id, checked to be in the vocabulary.
fn opt_token_id(md: &HashMap<String, Value>, key: &str, n_tokens: usize) -> Result<Option<usize>> {
    let Some(v) = md.get(key) else { return Ok(None) };
    let id = as_int(v).ok_or_else(|| invalid(key, "an integer"))?;
    if id < 0 || id as u64 >= n_tokens as u64 {
        return Err(Error::model(format!("GGUF metadata '{key}' = {id} is out of range for {n_tokens} tokens")));
    }
    Ok(Some(id as usize))
}

// ---------------------------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------------------------

/// What the tokenizer's parts have in common, whichever model it is.
struct Common<'a> {
    tokens: Vec<&'a str>,
    token_types: Option<Vec<i64>>,
    bos: Option<usize>,
    eos: Option<usize>,
    unk: Option<usize>,
    pad: Option<usize>,
}

fn build(md: &HashMap<String, Value>) -> Result<Built> {
    let model = opt_string(md, KEY_MODEL)?.ok_or_else(|| missing(KEY_MODEL))?;
    let tokens = opt_str_array(md, KEY_TOKENS)?.ok_or_else(|| missing(KEY_TOKENS))?;
    if tokens.is_empty() {
        return Err(Error::model(format!("GGUF metadata '{KEY_TOKENS}' is empty")));
    }
    let n = tokens.len();
    let token_types = opt_per_token(md, KEY_TOKEN_TYPE, n, "an array of integers", as_int)?;
    let (bos, eos, unk, pad) = (
        opt_token_id(md, KEY_BOS, n)?,
        opt_token_id(md, KEY_EOS, n)?,
        opt_token_id(md, KEY_UNK, n)?,
        opt_token_id(md, KEY_PAD, n)?,
    );
    let mut common = Common { tokens, token_types, bos, eos, unk, pad };
    let doc = match model {
        "gpt2" => build_byte_level(md, &common)?,
        "llama" => {
            // llama.cpp's defaults for a sentencepiece vocabulary that names no special tokens.
            let default = |id: usize| (id < n).then_some(id);
            if md.get(KEY_BOS).is_none() {
                common.bos = default(1);
            }
            if md.get(KEY_EOS).is_none() {
                common.eos = default(2);
            }
            if md.get(KEY_UNK).is_none() {
                common.unk = default(0);
            }
            build_sentencepiece(md, &common)?
        }
        other => {
            return Err(Error::model(format!(
                "unsupported GGUF tokenizer model '{other}' ('{KEY_MODEL}'); supported: gpt2, llama"
            )))
        }
    };
    let name = |id: Option<usize>| id.map(|i| common.tokens[i].to_string());
    Ok(Built {
        json: doc,
        bos_token: name(common.bos),
        eos_token: name(common.eos),
        chat_template: opt_string(md, KEY_CHAT_TEMPLATE)?.map(str::to_string),
    })
}

/// `tokenizer.json`'s `added_tokens` entry.
#[derive(serde::Serialize)]
struct AddedToken<'a> {
    id: usize,
    content: &'a str,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

/// A BPE model as `tokenizer.json` spells it.
#[derive(serde::Serialize)]
struct BpeModel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: Option<&'static str>,
    end_of_word_suffix: Option<&'static str>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: Vocab<'a>,
    merges: Vec<(&'a str, &'a str)>,
}

/// The vocabulary, written in id order. A token spelled twice keeps its last id, as a Python dict
/// built from the list would (and as `tokenizers` reads a repeated key).
struct Vocab<'a>(&'a [Cow<'a, str>]);

impl Serialize for Vocab<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (id, token) in self.0.iter().enumerate() {
            map.serialize_entry(token.as_ref(), &id)?;
        }
        map.end()
    }
}

#[derive(serde::Serialize)]
struct Document<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<AddedToken<'a>>,
    normalizer: serde_json::Value,
    pre_tokenizer: serde_json::Value,
    post_processor: serde_json::Value,
    decoder: serde_json::Value,
    model: BpeModel<'a>,
}

fn to_json(doc: &Document<'_>) -> Result<String> {
    serde_json::to_string(doc).map_err(|e| Error::model(format!("cannot write the GGUF tokenizer as JSON: {e}")))
}

/// The added tokens: control tokens (special) and user-defined ones (not special), each kept whole
/// and matched in the raw text. `keep` says whether a token can be added (is in the vocabulary as
/// spelled in the file); the special token ids are added as special too.
fn added_tokens<'a>(common: &Common<'a>, keep: impl Fn(usize) -> bool) -> Vec<AddedToken<'a>> {
    let named: HashSet<usize> = [common.bos, common.eos, common.unk, common.pad].into_iter().flatten().collect();
    let mut out = Vec::new();
    for (id, &content) in common.tokens.iter().enumerate() {
        let ty = common.token_types.as_ref().map_or(1, |t| t[id]);
        let special = ty == TOKEN_TYPE_CONTROL || named.contains(&id);
        if !(special || ty == TOKEN_TYPE_USER_DEFINED) || !keep(id) {
            continue;
        }
        out.push(AddedToken {
            id,
            content,
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special,
        });
    }
    out
}

/// `TemplateProcessing` adding BOS and/or EOS around each sequence (as transformers'
/// `update_post_processor` writes it).
fn post_processor(common: &Common<'_>, add_bos: bool, add_eos: bool) -> serde_json::Value {
    let bos = common.bos.filter(|_| add_bos);
    let eos = common.eos.filter(|_| add_eos);
    let special = |id: usize, type_id: u32| json!({"SpecialToken": {"id": common.tokens[id], "type_id": type_id}});
    let seq = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (name, type_id, out) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
        if let Some(b) = bos {
            out.push(special(b, type_id));
        }
        out.push(seq(name, type_id));
        if let Some(e) = eos {
            out.push(special(e, type_id));
        }
    }
    let pair: Vec<_> = single.iter().cloned().chain(pair).collect();
    let mut special_tokens = serde_json::Map::new();
    for id in [bos, eos].into_iter().flatten() {
        let t = common.tokens[id];
        special_tokens.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens})
}

/// Splits a merge line `"a b"` at its first space after the first character (as llama.cpp does,
/// so that a piece may itself begin with a space).
fn split_merge<'a>(key: &str, line: &'a str) -> Result<(&'a str, &'a str)> {
    let start = line.chars().next().map_or(0, char::len_utf8);
    match line[start..].find(' ') {
        Some(pos) => Ok((&line[..start + pos], &line[start + pos + 1..])),
        None => Err(Error::model(format!("GGUF metadata '{key}' has an invalid merge {line:?}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Byte-level BPE ("gpt2")
// ---------------------------------------------------------------------------------------------

/// GPT-2's byte -> printable character table.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut table = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).expect("valid code point");
    }
    table
}

const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

const QWEN35_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}",
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// How a byte-level vocabulary splits text before BPE.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BpeSplit {
    /// GPT-2's regex (`ByteLevel(use_regex=true)`).
    Gpt2,
    /// Every digit on its own, then GPT-2's regex (StarCoder, SmolLM).
    DigitsGpt2,
    /// One regex (`Split(..., "isolated")`), then bytes to characters.
    Regex(&'static str),
}

/// The pre-tokenizer llama.cpp picks for `tokenizer.ggml.pre` (`llama_vocab::impl::load` and
/// `llm_tokenizer_bpe`), with llama.cpp's `ignore_merges` and default `add_bos`, and whether the
/// original tokenizer normalizes to NFC first.
#[derive(Debug, Clone, Copy)]
struct BpePre {
    split: BpeSplit,
    ignore_merges: bool,
    add_bos: bool,
    nfc: bool,
}

/// The `tokenizer.ggml.pre` values this module knows (those of llama.cpp whose pre-tokenizer is
/// one of GPT-2's, StarCoder's, Llama 3's, Qwen 2's, Qwen 3.5's, Tekken's or GPT-4o's regexes).
pub const SUPPORTED_BPE_PRE_TYPES: &[&str] = &[
    "default",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "jina-v2-es",
    "jina-v2-de",
    "gigachat",
    "a.x-4.0",
    "mellum",
    "mpt",
    "olmo",
    "jais",
    "exaone4",
    "trillion",
    "granite-docling",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
    "mellum2",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "dbrx",
    "smaug-bpe",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "megrez",
    "stablelm2",
    "hunyuan",
    "solar-open",
    "qwen35",
    "tekken",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "minimax-m2",
];

fn bpe_pre_tokenizer(pre: &str) -> Option<BpePre> {
    let plain = |split| BpePre { split, ignore_merges: false, add_bos: false, nfc: false };
    Some(match pre {
        // A file without a pre-tokenizer type: llama.cpp falls back to its own "default" regexes
        // (and warns that quality is degraded); we use GPT-2's, as transformers does.
        "default" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de" | "gigachat"
        | "a.x-4.0" | "mellum" | "mpt" | "olmo" | "jais" | "exaone4" | "trillion" | "granite-docling" => {
            plain(BpeSplit::Gpt2)
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            plain(BpeSplit::DigitsGpt2)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" => {
            BpePre { split: BpeSplit::Regex(LLAMA3_SPLIT), ignore_merges: true, add_bos: true, nfc: false }
        }
        "dbrx" | "smaug-bpe" => plain(BpeSplit::Regex(LLAMA3_SPLIT)),
        // Qwen's own tokenizer.json normalizes to NFC (llama.cpp does not).
        "qwen2" | "deepseek-r1-qwen" => BpePre { nfc: true, ..plain(BpeSplit::Regex(QWEN2_SPLIT)) },
        "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan" | "solar-open" => plain(BpeSplit::Regex(QWEN2_SPLIT)),
        "qwen35" => BpePre { nfc: true, ..plain(BpeSplit::Regex(QWEN35_SPLIT)) },
        "tekken" => BpePre { split: BpeSplit::Regex(TEKKEN_SPLIT), ignore_merges: true, add_bos: true, nfc: false },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => plain(BpeSplit::Regex(GPT4O_SPLIT)),
        _ => return None,
    })
}

fn byte_level(use_regex: bool) -> serde_json::Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn build_byte_level(md: &HashMap<String, Value>, common: &Common<'_>) -> Result<String> {
    let pre_name = opt_string(md, KEY_PRE)?.unwrap_or("default");
    let pre = bpe_pre_tokenizer(pre_name).ok_or_else(|| {
        Error::model(format!("unsupported GGUF pre-tokenizer '{pre_name}' ('{KEY_PRE}') for a gpt2 tokenizer"))
    })?;
    let merge_lines = opt_str_array(md, KEY_MERGES)?.ok_or_else(|| missing(KEY_MERGES))?;
    let merges = merge_lines.iter().map(|l| split_merge(KEY_MERGES, l)).collect::<Result<Vec<_>>>()?;

    // Every real token is spelled in the byte alphabet; one that is not (an added token written
    // as plain text) is respelled byte by byte, as transformers does.
    let table = bytes_to_unicode();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let vocab: Vec<Cow<'_, str>> =
        common
            .tokens
            .iter()
            .map(|&t| {
                if in_alphabet(t) {
                    Cow::Borrowed(t)
                } else {
                    Cow::Owned(t.bytes().map(|b| table[b as usize]).collect())
                }
            })
            .collect();
    let added = added_tokens(common, |id| in_alphabet(common.tokens[id]));

    let add_bos = opt_bool(md, KEY_ADD_BOS)?.unwrap_or(pre.add_bos);
    let add_eos = opt_bool(md, KEY_ADD_EOS)?.unwrap_or(false);
    let pre_tokenizer = match pre.split {
        BpeSplit::Gpt2 => byte_level(true),
        BpeSplit::DigitsGpt2 => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        BpeSplit::Regex(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]}),
    };
    let doc = Document {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens: added,
        normalizer: if pre.nfc { json!({"type": "NFC"}) } else { serde_json::Value::Null },
        pre_tokenizer,
        post_processor: post_processor(common, add_bos, add_eos),
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        model: BpeModel {
            kind: "BPE",
            dropout: None,
            unk_token: None,
            continuing_subword_prefix: Some(""),
            end_of_word_suffix: Some(""),
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges: pre.ignore_merges,
            vocab: Vocab(&vocab),
            merges,
        },
    };
    to_json(&doc)
}

// ---------------------------------------------------------------------------------------------
// SentencePiece-style BPE ("llama")
// ---------------------------------------------------------------------------------------------

/// Architectures whose sentencepiece vocabulary is Gemma's (transformers' `gemma_tokenizer`).
const GEMMA_ARCHITECTURES: &[&str] = &["gemma", "gemma2", "gemma3", "gemma3n"];

/// Python's `str.isspace` for one character.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Merges implied by a vocabulary: every split of a token into two tokens, best first by the
/// token's score. This is transformers' `generate_merges(vocab, vocab_scores)`, tie-breaks included
/// (by score, then longer left piece, then longer right piece, then the vocabulary's order).
fn generate_merges<'a>(tokens: &'a [Cow<'a, str>], scores: &[f64]) -> Vec<(&'a str, &'a str)> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        index.insert(t.as_ref(), i);
    }
    let mut seen: HashSet<&str> = HashSet::with_capacity(tokens.len());
    // (left, right, score, chars in left, chars in right)
    let mut merges: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
    let mut local: Vec<(&str, &str, usize, usize)> = Vec::new();
    for t in tokens.iter().map(|t| t.as_ref()) {
        if !seen.insert(t) {
            continue;
        }
        let score = scores[index[t]];
        local.clear();
        for (at, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(at);
            if let (Some(&il), Some(&ir)) = (index.get(l), index.get(r)) {
                local.push((l, r, il, ir));
            }
        }
        local.sort_by_key(|&(_, _, il, ir)| (il, ir));
        merges.extend(local.iter().map(|&(l, r, _, _)| (l, r, score, l.chars().count(), r.chars().count())));
    }
    // Python's `sorted(..., reverse=True)` is stable: equal keys keep their order.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges.into_iter().map(|(l, r, ..)| (l, r)).collect()
}

fn build_sentencepiece(md: &HashMap<String, Value>, common: &Common<'_>) -> Result<String> {
    let arch = opt_string(md, KEY_ARCH)?.unwrap_or("");
    let gemma = GEMMA_ARCHITECTURES.contains(&arch);
    let n = common.tokens.len();

    // Gemma writes its whitespace tokens ("  ", "   ", ...) with real spaces, while its normalizer
    // turns spaces into "▁": spell them with "▁" so that the merges reach them.
    let vocab: Vec<Cow<'_, str>> = common
        .tokens
        .iter()
        .map(|&t| {
            if gemma && t.contains(' ') && t.chars().all(py_isspace) {
                Cow::Owned(SPIECE_UNDERLINE.repeat(t.chars().count()))
            } else {
                Cow::Borrowed(t)
            }
        })
        .collect();

    let merge_lines = opt_str_array(md, KEY_MERGES)?;
    let merges = match &merge_lines {
        Some(lines) => lines.iter().map(|l| split_merge(KEY_MERGES, l)).collect::<Result<Vec<_>>>()?,
        None if gemma => {
            // Gemma's merge order is the order of the tokens in the file.
            let positions: Vec<f64> = (0..n).map(|i| -(i as f64)).collect();
            generate_merges(&vocab, &positions)
        }
        None => {
            let scores = opt_per_token(md, KEY_SCORES, n, "an array of numbers", as_float)?
                .ok_or_else(|| missing(KEY_SCORES))?;
            generate_merges(&vocab, &scores)
        }
    };

    let vocab_index: HashSet<&str> = vocab.iter().map(|t| t.as_ref()).collect();
    let added = added_tokens(common, |id| vocab_index.contains(common.tokens[id]));

    // llama.cpp prefixes a space for sentencepiece vocabularies unless the file says otherwise
    // (and prefixes it again after each special token, as the "legacy" Llama normalizer does).
    // Gemma files say no; Gemma's own tokenizer adds none.
    let add_space_prefix = opt_bool(md, KEY_ADD_SPACE_PREFIX)?.unwrap_or(!gemma);
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPIECE_UNDERLINE}, replace]})
    } else {
        replace
    };
    let pre_tokenizer = if gemma {
        json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false})
    } else {
        serde_json::Value::Null
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let add_bos = opt_bool(md, KEY_ADD_BOS)?.unwrap_or(true);
    let add_eos = opt_bool(md, KEY_ADD_EOS)?.unwrap_or(false);
    let doc = Document {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens: added,
        normalizer,
        pre_tokenizer,
        post_processor: post_processor(common, add_bos, add_eos),
        decoder: json!({"type": "Sequence", "decoders": decoders}),
        model: BpeModel {
            kind: "BPE",
            dropout: None,
            unk_token: common.unk.map(|i| common.tokens[i]),
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: true,
            byte_fallback: true,
            ignore_merges: false,
            vocab: Vocab(&vocab),
            merges,
        },
    };
    to_json(&doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    fn ints(items: &[i32]) -> Value {
        Value::Array(items.iter().map(|&x| Value::I32(x)).collect())
    }

    /// A tiny byte-level vocabulary: every byte, a few merges, two control tokens.
    fn gpt2_metadata(pre: &str) -> HashMap<String, Value> {
        let table = bytes_to_unicode();
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
        tokens.extend(table.iter().map(|c| c.to_string()));
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2"];
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        let mut types = vec![3, 3];
        types.extend(std::iter::repeat_n(1, tokens.len() - 2));
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        HashMap::from([
            (KEY_MODEL.to_string(), Value::String("gpt2".into())),
            (KEY_PRE.to_string(), Value::String(pre.into())),
            (KEY_TOKENS.to_string(), strings(&refs)),
            (KEY_TOKEN_TYPE.to_string(), ints(&types)),
            (KEY_MERGES.to_string(), strings(&merges)),
            (KEY_BOS.to_string(), Value::U32(1)),
            (KEY_EOS.to_string(), Value::U32(0)),
            (KEY_ADD_BOS.to_string(), Value::Bool(true)),
            (KEY_CHAT_TEMPLATE.to_string(), Value::String("{{ bos_token }}".into())),
        ])
    }

    fn id(tok: &TextTokenizer, t: &str) -> u32 {
        tok.token_to_id(t).unwrap_or_else(|| panic!("no token {t:?}"))
    }

    #[test]
    fn byte_level_bpe_from_synthetic_metadata() {
        let tok = from_gguf(&gpt2_metadata("smollm")).unwrap();
        assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token.as_deref(), Some("<|endoftext|>"));
        assert_eq!(tok.chat_template.as_deref(), Some("{{ bos_token }}"));
        let ids = tok.encode("hello world 12<|endoftext|>", false).unwrap();
        // "smollm" splits digits one by one, so the merge "1 2" never applies.
        let expect = [id(&tok, "hello"), id(&tok, "Ġworld"), id(&tok, "Ġ"), id(&tok, "1"), id(&tok, "2"), 0];
        assert_eq!(ids, expect);
        // add_bos_token = true: BOS first with special tokens, not without.
        let with = tok.encode("hello", true).unwrap();
        assert_eq!(with, vec![1, id(&tok, "hello")]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello world 12<|endoftext|>");
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello world 12");
        // GPT-2's regex keeps "12" together, so the merge applies.
        let tok = from_gguf(&gpt2_metadata("gpt-2")).unwrap();
        assert_eq!(tok.encode(" 12", false).unwrap(), vec![id(&tok, "Ġ"), id(&tok, "12")]);
    }

    #[test]
    fn every_supported_pre_type_builds() {
        for pre in SUPPORTED_BPE_PRE_TYPES {
            let tok = from_gguf(&gpt2_metadata(pre)).unwrap_or_else(|e| panic!("{pre}: {e}"));
            let ids = tok.encode("hello world, 1234 héllo\n\n  x", false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), "hello world, 1234 héllo\n\n  x", "{pre}");
        }
    }

    #[test]
    fn pre_type_defaults_follow_llama_cpp() {
        // Llama 3's vocabularies add BOS unless the file says otherwise; GPT-2's do not.
        let mut md = gpt2_metadata("llama-bpe");
        md.remove(KEY_ADD_BOS);
        let tok = from_gguf(&md).unwrap();
        assert_eq!(tok.encode("hello", true).unwrap(), vec![1, id(&tok, "hello")]);
        let json: serde_json::Value = serde_json::from_str(&tokenizer_json_from_gguf(&md).unwrap()).unwrap();
        assert_eq!(json["model"]["ignore_merges"], true);
        let mut md = gpt2_metadata("gpt-2");
        md.remove(KEY_ADD_BOS);
        let tok = from_gguf(&md).unwrap();
        assert_eq!(tok.encode("hello", true).unwrap(), vec![id(&tok, "hello")]);
        // Qwen normalizes to NFC first: "e" + U+0301 is "é" (bytes C3 A9, spelled "Ã©").
        let tok = from_gguf(&gpt2_metadata("qwen2")).unwrap();
        assert_eq!(tok.encode("e\u{301}", false).unwrap(), vec![id(&tok, "Ã"), id(&tok, "©")]);
        let tok = from_gguf(&gpt2_metadata("llama-bpe")).unwrap();
        assert_eq!(tok.encode("e\u{301}", false).unwrap(), vec![id(&tok, "e"), id(&tok, "Ì"), id(&tok, "ģ")]);
    }

    #[test]
    fn sentencepiece_from_synthetic_metadata() {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0f32, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (i, t) in ["▁", "a", "b", "ab", "▁a", "▁ab", "<tool>"].iter().enumerate() {
            tokens.push(t.to_string());
            types.push(if *t == "<tool>" { 4 } else { 1 });
            scores.push(-(i as f32));
        }
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut md = HashMap::from([
            (KEY_MODEL.to_string(), Value::String("llama".into())),
            (KEY_TOKENS.to_string(), strings(&refs)),
            (KEY_TOKEN_TYPE.to_string(), ints(&types)),
            (KEY_SCORES.to_string(), Value::Array(scores.iter().map(|&s| Value::F32(s)).collect())),
        ]);
        let tok = from_gguf(&md).unwrap();
        assert_eq!(tok.bos_token.as_deref(), Some("<s>"));
        assert_eq!(tok.eos_token.as_deref(), Some("</s>"));
        // A space is prefixed (no add_space_prefix key), and BOS is added by default.
        let ids = tok.encode("ab ab", true).unwrap();
        assert_eq!(ids, vec![1, id(&tok, "▁ab"), id(&tok, "▁ab")]);
        // Byte fallback for what the vocabulary lacks; "é" is C3 A9.
        let ids = tok.encode("é", false).unwrap();
        assert_eq!(ids, vec![id(&tok, "▁"), id(&tok, "<0xC3>"), id(&tok, "<0xA9>")]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "é");
        // User-defined tokens stay whole; the space prefix comes back after them (llama.cpp).
        let ids = tok.encode("a<tool>b", false).unwrap();
        assert_eq!(ids, vec![id(&tok, "▁a"), id(&tok, "<tool>"), id(&tok, "▁"), id(&tok, "b")]);

        md.insert(KEY_ADD_SPACE_PREFIX.to_string(), Value::Bool(false));
        md.insert(KEY_ADD_BOS.to_string(), Value::Bool(false));
        let tok = from_gguf(&md).unwrap();
        let ids = tok.encode("ab ab", true).unwrap();
        assert_eq!(ids, vec![id(&tok, "ab"), id(&tok, "▁ab")]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "ab ab");
    }

    #[test]
    fn generated_merges_follow_transformers_order() {
        let tokens: Vec<Cow<'_, str>> = ["a", "b", "c", "ab", "bc", "abc"].iter().map(|&t| Cow::Borrowed(t)).collect();
        let merges = generate_merges(&tokens, &[0.0, 0.0, 0.0, -1.0, -1.0, -2.0]);
        assert_eq!(merges, vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }

    #[test]
    fn errors_name_the_metadata() {
        let mut md = gpt2_metadata("smollm");
        md.remove(KEY_TOKENS);
        let err = from_gguf(&md).err().unwrap().to_string();
        assert!(err.contains("missing 'tokenizer.ggml.tokens'"), "{err}");

        let mut md = gpt2_metadata("no-such-pre");
        let err = from_gguf(&md).err().unwrap().to_string();
        assert!(err.contains("'no-such-pre'"), "{err}");
        md.insert(KEY_MODEL.to_string(), Value::String("bert".into()));
        let err = from_gguf(&md).err().unwrap().to_string();
        assert!(err.contains("unsupported GGUF tokenizer model 'bert'"), "{err}");

        let mut md = gpt2_metadata("smollm");
        md.remove(KEY_MERGES);
        let err = from_gguf(&md).err().unwrap().to_string();
        assert!(err.contains("missing 'tokenizer.ggml.merges'"), "{err}");

        let mut md = gpt2_metadata("smollm");
        md.insert(KEY_BOS.to_string(), Value::U32(1_000_000));
        let err = from_gguf(&md).err().unwrap().to_string();
        assert!(err.contains("'tokenizer.ggml.bos_token_id' = 1000000 is out of range"), "{err}");

        let mut md = gpt2_metadata("smollm");
        md.insert(KEY_TOKEN_TYPE.to_string(), ints(&[3, 3]));
        let err = from_gguf(&md).err().unwrap().to_string();
        assert!(err.contains("'tokenizer.ggml.token_type' has 2 entries"), "{err}");
    }

    /// Compares with ids that Hugging Face's tokenizers produced for real GGUF files: set
    /// TDA_GGUF_TEST_DIR to a folder holding the .gguf files and `expected_ids.json`
    /// (`{"models": [{"file", "cases": [{"text", "ids", "ids_no_special", "decoded"}]}]}`).
    /// With TDA_GGUF_TEST_DUMP=<folder>, also writes each built `tokenizer.json` there.
    #[test]
    fn real_gguf_files_match_reference_ids() {
        let Some(dir) = std::env::var_os("TDA_GGUF_TEST_DIR") else {
            println!("skipped: TDA_GGUF_TEST_DIR is not set (a folder with .gguf files and expected_ids.json)");
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected_ids.json")).unwrap()).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
        };
        let mut failures = Vec::new();
        let mut checked = 0;
        for model in expected["models"].as_array().unwrap() {
            let file = model["file"].as_str().unwrap();
            let path = dir.join(file);
            if !path.exists() {
                println!("skipped {file}: not in {}", dir.display());
                continue;
            }
            let mut f = std::fs::File::open(&path).unwrap();
            let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
            let t0 = std::time::Instant::now();
            let tok = from_gguf(&content.metadata).unwrap();
            println!("{file}: tokenizer built in {:.2?}", t0.elapsed());
            if let Some(out) = std::env::var_os("TDA_GGUF_TEST_DUMP") {
                let json = tokenizer_json_from_gguf(&content.metadata).unwrap();
                std::fs::write(std::path::Path::new(&out).join(format!("{file}.tokenizer.json")), json).unwrap();
            }
            for case in model["cases"].as_array().unwrap() {
                let text = case["text"].as_str().unwrap();
                let got = tok.encode(text, true).unwrap();
                if got != ids(&case["ids"]) {
                    failures.push(format!("{file} {text:?} (special): got {got:?}, want {:?}", ids(&case["ids"])));
                }
                let plain = tok.encode(text, false).unwrap();
                if plain != ids(&case["ids_no_special"]) {
                    failures.push(format!("{file} {text:?}: got {plain:?}, want {:?}", ids(&case["ids_no_special"])));
                }
                if let Some(decoded) = case["decoded"].as_str() {
                    let d = tok.decode(&ids(&case["ids_no_special"]), false).unwrap();
                    if d != decoded {
                        failures.push(format!("{file} {text:?}: decoded {d:?}, want {decoded:?}"));
                    }
                }
                checked += 1;
            }
        }
        println!("checked {checked} texts, {} mismatches", failures.len());
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
