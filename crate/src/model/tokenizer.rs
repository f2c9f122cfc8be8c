//! CLIP's byte-level BPE tokenizer, built with the `tokenizers` crate from a repo's
//! `tokenizer/` folder exactly as transformers' `CLIPTokenizer` builds it (the
//! tokenizers-backed class diffusers runs since transformers 5): NFC, whitespace runs to
//! one space, lower case, CLIP's word split, byte-level BPE with `</w>` word ends, and the
//! special tokens (start, end, pad, unknown) matched whole in the raw text.
use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};
use crate::files::ModelFiles;

/// CLIP's word pattern: special tokens, contractions, letter runs, single digits, punctuation runs.
const CLIP_PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    /// Positions including the start and end tokens (77 for every SD model).
    pub max_length: usize,
}

/// Ids for one prompt, and how many tokens truncation dropped.
pub struct Tokens {
    pub ids: Vec<u32>,
    pub dropped: usize,
}

/// The files a tokenizer folder may have (vocab.json + merges.txt or tokenizer.json, with or
/// without its configs; [`ClipTokenizer::load`] says what is missing).
pub const FILES: [&str; 5] = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

/// The files of a tokenizer folder, as text.
pub struct TokenizerFiles {
    pub vocab_json: Option<String>,
    pub merges_txt: Option<String>,
    pub tokenizer_json: Option<String>,
    pub tokenizer_config_json: Option<String>,
    pub special_tokens_map_json: Option<String>,
}

impl TokenizerFiles {
    /// The files under `folder/` (`tokenizer`, say).
    pub fn read(files: &dyn ModelFiles, folder: &str) -> Result<Self> {
        let text = |name: &str| -> Result<Option<String>> {
            let path = format!("{folder}/{name}");
            match files.read(&path)? {
                Some(bytes) => String::from_utf8(bytes).map(Some).map_err(|_| Error::Tokenizer(format!("{path} is not UTF-8 text"))),
                None => Ok(None),
            }
        };
        let [vocab_json, merges_txt, tokenizer_json, tokenizer_config_json, special_tokens_map_json] = FILES.map(text);
        Ok(Self { vocab_json: vocab_json?, merges_txt: merges_txt?, tokenizer_json: tokenizer_json?, tokenizer_config_json: tokenizer_config_json?, special_tokens_map_json: special_tokens_map_json? })
    }
}

/// A special token entry is a string, or `{"content": ..., "normalized": ...}`: a
/// normalized one also matches after lower-casing (`<|ENDOFTEXT|>`), a string never does.
fn special_entry(v: &Value) -> Option<AddedToken> {
    match v {
        Value::String(s) => Some(AddedToken::from(s.clone(), true)),
        Value::Object(o) => {
            let content = o.get("content").and_then(Value::as_str)?;
            let normalized = o.get("normalized").and_then(Value::as_bool).unwrap_or(false);
            Some(AddedToken::from(content.to_owned(), true).normalized(normalized))
        }
        _ => None,
    }
}

impl ClipTokenizer {
    /// `max_positions` is the text encoder's `max_position_embeddings`.
    pub fn load(files: &TokenizerFiles, max_positions: usize) -> Result<Self> {
        let err = |msg: String| Error::Tokenizer(msg);
        let parse = |text: &Option<String>, name: &str| -> Result<Value> {
            match text {
                Some(t) => serde_json::from_str(t).map_err(|e| err(format!("{name}: {e}"))),
                None => Ok(Value::Null),
            }
        };
        let config = parse(&files.tokenizer_config_json, "tokenizer_config.json")?;
        let special = parse(&files.special_tokens_map_json, "special_tokens_map.json")?;
        // tokenizer_config.json wins, as in transformers; special_tokens_map.json fills gaps.
        let special_token = |key: &str, default: &str| {
            config.get(key).and_then(special_entry).or_else(|| special.get(key).and_then(special_entry)).unwrap_or_else(|| AddedToken::from(default, true))
        };
        // transformers' order; a later entry with the same text replaces an earlier one.
        let bos = special_token("bos_token", "<|startoftext|>");
        let eos = special_token("eos_token", "<|endoftext|>");
        let unk = special_token("unk_token", &eos.content);
        let pad = special_token("pad_token", &eos.content);
        let model_max = config.get("model_max_length").and_then(Value::as_f64).map(|v| v as usize).unwrap_or(max_positions);

        let mut inner = match (&files.tokenizer_json, &files.vocab_json, &files.merges_txt) {
            (Some(json), _, _) => json.parse::<Tokenizer>().map_err(|e| err(format!("tokenizer.json: {e}")))?,
            (None, Some(vocab), Some(merges)) => Self::build_bpe(vocab, merges, &unk.content)?,
            _ => return Err(err("the tokenizer folder needs vocab.json and merges.txt (or tokenizer.json)".into())),
        };
        let id = |t: &AddedToken| inner.token_to_id(&t.content).ok_or_else(|| err(format!("special token {:?} is not in the vocabulary", t.content)));
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);
        // Special tokens typed in a prompt stay whole, as in transformers (SD 2.x's pad "!" too);
        // a tokenizer.json already lists them with its own flags.
        if files.tokenizer_json.is_none() {
            inner.add_special_tokens(vec![bos, eos, unk, pad]).map_err(|e| err(e.to_string()))?;
        }
        let max_length = model_max.min(max_positions);
        if max_length < 2 {
            return Err(err(format!("a prompt of {max_length} tokens has no room for the start and end tokens")));
        }
        Ok(Self { bos: bos_id, eos: eos_id, pad: pad_id, max_length, inner })
    }

    /// One more than the largest token id it can produce: the text encoder's `vocab_size` must
    /// be at least this.
    pub fn id_bound(&self) -> usize {
        self.inner.get_vocab(true).into_values().max().map_or(0, |id| id as usize + 1)
    }

    fn build_bpe(vocab_json: &str, merges_txt: &str, unk: &str) -> Result<Tokenizer> {
        let err = |msg: String| Error::Tokenizer(msg);
        let vocab: std::collections::HashMap<String, u32> = serde_json::from_str(vocab_json).map_err(|e| err(format!("vocab.json: {e}")))?;
        let merges = merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                l.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| err(format!("merges.txt: malformed line {l:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .end_of_word_suffix("</w>".into())
            .unk_token(unk.into())
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| err(e.to_string()))?;
        let normalizer = Sequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()]);
        tokenizer.with_normalizer(Some(normalizer)).map_err(|e| err(e.to_string()))?;
        let split = Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true).map_err(|e| err(e.to_string()))?;
        tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()])));
        Ok(tokenizer)
    }

    /// `[bos] + tokens + [eos]`, truncated and padded to `max_length` like diffusers'
    /// `tokenizer(prompt, padding="max_length", truncation=True)`.
    pub fn encode(&self, text: &str) -> Result<Tokens> {
        let body = self.tokenize(text)?;
        let kept = body.len().min(self.max_length - 2);
        Ok(Tokens { ids: self.wrap(&body[..kept]), dropped: body.len() - kept })
    }

    /// The text's tokens, without start, end or padding, however many there are.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `[bos] + body + [eos]`, padded to `max_length`; `body` holds at most `max_length - 2`.
    pub fn wrap(&self, body: &[u32]) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(body);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        ids
    }

    /// The comma's id (`,</w>`), where A1111 prefers to end a full chunk.
    pub fn comma(&self) -> Option<u32> {
        self.inner.token_to_id(",</w>")
    }
}
