//! Prompts as Automatic1111 reads them (its default settings): emphasis brackets, `BREAK`,
//! and any length, as weighted chunks of 75 tokens that the text encoder encodes one by one.
//!
//! - `(a)` multiplies a's weight by 1.1, `[a]` divides it by 1.1, `(a:1.3)` sets a factor;
//!   brackets nest, an unclosed one applies to the end, `\(` `\)` `\[` `\]` `\\` are literal.
//! - Each run of text of one weight is tokenized on its own; a chunk holds 75 tokens; when a
//!   chunk fills up within 20 tokens after a comma, the words after the comma move to the next.
//! - `<lora:name:weight>` names a LoRA to apply (A1111's extra network syntax; weight 1 when
//!   left out); the tag is not text and is removed before the rest is read ([`lora_tags`]).
//! - `BREAK` outside brackets ends the chunk. (A1111 also splits inside brackets, where the
//!   marker then carries the brackets' weight and becomes the word "break" weighted −1.1; here
//!   it is only a word there.)
use crate::error::{Error, Result};
use crate::model::tokenizer::ClipTokenizer;

/// A1111's `comma_padding_backtrack` default.
const COMMA_BACKTRACK: usize = 20;

#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    /// Text and its weight (1.0 unless emphasised).
    Text(String, f64),
    /// `BREAK`: the next text starts a new chunk.
    Break,
}

/// One chunk for the text encoder: `[start] + up to 75 tokens + [end] + padding`, with each
/// position's weight (1 for the special tokens and the padding).
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Splits `text` into weighted pieces, adjacent pieces of equal weight merged, as A1111's
/// `parse_prompt_attention`. A weight that is not a number (`(a:1.2.3)`) is an error.
pub fn parse(text: &str) -> Result<Vec<Piece>> {
    let mut pieces: Vec<Piece> = Vec::new();
    let (mut round, mut square) = (Vec::new(), Vec::new());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let mut taken = c.len_utf8();
        match c {
            '\\' => {
                // An escaped bracket or backslash is text; a lone backslash is an empty piece,
                // which (as in A1111) keeps its neighbours' text apart when weighted.
                let next = rest[1..].chars().next().filter(|n| "()[]\\".contains(*n));
                pieces.push(Piece::Text(next.map(String::from).unwrap_or_default(), 1.0));
                taken += next.map_or(0, char::len_utf8);
            }
            '(' => round.push(pieces.len()),
            '[' => square.push(pieces.len()),
            ')' if !round.is_empty() => multiply(&mut pieces, round.pop(), 1.1),
            ']' if !square.is_empty() => multiply(&mut pieces, square.pop(), 1.0 / 1.1),
            ':' => match explicit_weight(rest) {
                Some((weight, len)) if !round.is_empty() => {
                    let weight: f64 = weight.parse().map_err(|_| Error::Invalid(format!("prompt: the emphasis weight {weight:?} in {:?} is not a number", &rest[..len])))?;
                    multiply(&mut pieces, round.pop(), weight);
                    taken = len;
                }
                Some((_, len)) => {
                    push_text(&mut pieces, &rest[..len], true);
                    taken = len;
                }
                None => push_text(&mut pieces, ":", true),
            },
            _ => {
                taken = rest.find(['\\', '(', ')', '[', ']', ':']).filter(|&i| i > 0).unwrap_or(if ")]".contains(c) { 1 } else { rest.len() });
                push_text(&mut pieces, &rest[..taken], round.is_empty() && square.is_empty());
            }
        }
        rest = &rest[taken..];
    }
    for start in round {
        multiply(&mut pieces, Some(start), 1.1);
    }
    for start in square {
        multiply(&mut pieces, Some(start), 1.0 / 1.1);
    }
    // The encoder's numbers are f32: a weight beyond them would give NaN text states.
    for piece in &pieces {
        if let Piece::Text(text, weight) = piece
            && !(*weight as f32).is_finite()
        {
            return Err(Error::Invalid(format!("prompt: the emphasis on {text:?} comes to {weight:e}, too large a weight to apply")));
        }
    }
    Ok(merge(pieces))
}

/// A1111's weight pattern at a `:`: `:\s*([+-]?[.\d]+)\s*\)`; the weight's text and the
/// length matched.
fn explicit_weight(text: &str) -> Option<(&str, usize)> {
    let after_colon = text[1..].trim_start();
    let sign = usize::from(after_colon.starts_with(['+', '-']));
    let digits = after_colon[sign..].find(|c: char| !(c == '.' || c.is_ascii_digit())).unwrap_or(after_colon.len() - sign);
    if digits == 0 {
        return None;
    }
    let weight = &after_colon[..sign + digits];
    let after_weight = after_colon[weight.len()..].trim_start();
    after_weight.starts_with(')').then(|| (weight, text.len() - after_weight.len() + 1))
}

/// Multiplies the weights of the pieces from `start` (a bracket's opening) on.
fn multiply(pieces: &mut [Piece], start: Option<usize>, factor: f64) {
    for piece in &mut pieces[start.unwrap_or(0)..] {
        if let Piece::Text(_, weight) = piece {
            *weight *= factor;
        }
    }
}

/// Appends text of weight 1, split at each `BREAK` when `breaks` (outside brackets).
fn push_text(pieces: &mut Vec<Piece>, text: &str, breaks: bool) {
    let mut rest = text;
    while let Some((before, after)) = breaks.then(|| split_break(rest)).flatten() {
        pieces.push(Piece::Text(before.to_owned(), 1.0));
        pieces.push(Piece::Break);
        rest = after;
    }
    pieces.push(Piece::Text(rest.to_owned(), 1.0));
}

/// The text before and after the first `BREAK` that is a whole word, with the whitespace
/// around it removed (A1111's `\s*\bBREAK\b\s*`).
fn split_break(text: &str) -> Option<(&str, &str)> {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let at = text.match_indices("BREAK").map(|(i, _)| i).find(|&i| !word(text[..i].chars().next_back()) && !word(text[i + 5..].chars().next()))?;
    Some((text[..at].trim_end(), text[at + 5..].trim_start()))
}

/// Joins neighbours of equal weight; empty input becomes one empty piece.
fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match (merged.last_mut(), piece) {
            (Some(Piece::Text(text, w)), Piece::Text(more, v)) if *w == v => text.push_str(&more),
            (_, piece) => merged.push(piece),
        }
    }
    if merged.is_empty() {
        merged.push(Piece::Text(String::new(), 1.0));
    }
    merged
}

/// A LoRA a prompt names: `<lora:name:weight>`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export))]
pub struct LoraTag {
    pub name: String,
    pub weight: f32,
}

/// The prompt without its `<lora:…>` tags, and the tags in order, as A1111's
/// `extra_networks.parse_prompt` reads them. A1111's third field (a separate UNet weight) is
/// refused unless it equals the second, since the weight scales the whole LoRA here.
pub fn lora_tags(text: &str) -> Result<(String, Vec<LoraTag>)> {
    let (mut rest, mut plain, mut tags) = (text, String::new(), Vec::new());
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        plain.push_str(&rest[..start]);
        let tag = &rest[start..start + len + 1];
        let fields: Vec<&str> = tag[6..len].split(':').collect();
        let weight =
            |i: usize| fields.get(i).map_or(Ok(1.0), |w| w.trim().parse::<f32>().map_err(|_| Error::Invalid(format!("prompt: the weight {w:?} in {tag} is not a number"))));
        let (name, weight, unet) = (fields[0].trim(), weight(1)?, fields.get(2).map(|_| weight(2)).transpose()?);
        if name.is_empty() || fields.len() > 3 || unet.is_some_and(|u| u != weight) {
            return Err(Error::Invalid(format!("prompt: {tag} is not <lora:name> or <lora:name:weight>")));
        }
        tags.push(LoraTag { name: name.to_owned(), weight });
        rest = &rest[start + len + 1..];
    }
    plain.push_str(rest);
    Ok((plain, tags))
}

/// The prompt's chunks, as A1111's `tokenize_line`: at least one, every one full length.
/// `<lora:…>` tags are not text.
pub fn chunks(tokenizer: &ClipTokenizer, text: &str) -> Result<Vec<Chunk>> {
    let room = tokenizer.max_length - 2;
    let comma = tokenizer.comma();
    let mut chunker = Chunker { tokenizer, chunks: Vec::new(), ids: Vec::new(), weights: Vec::new(), last_comma: None };
    for piece in parse(&lora_tags(text)?.0)? {
        let (text, weight) = match piece {
            Piece::Break => {
                chunker.close();
                continue;
            }
            Piece::Text(text, weight) => (text, weight as f32),
        };
        for id in tokenizer.tokenize(&text)? {
            if Some(id) == comma {
                chunker.last_comma = Some(chunker.ids.len());
            } else if let Some(at) = chunker.last_comma.filter(|&at| chunker.ids.len() == room && room - at <= COMMA_BACKTRACK) {
                let (ids, weights) = (chunker.ids.split_off(at + 1), chunker.weights.split_off(at + 1));
                chunker.close();
                (chunker.ids, chunker.weights) = (ids, weights);
            }
            if chunker.ids.len() == room {
                chunker.close();
            }
            chunker.ids.push(id);
            chunker.weights.push(weight);
        }
    }
    if !chunker.ids.is_empty() || chunker.chunks.is_empty() {
        chunker.close();
    }
    Ok(chunker.chunks)
}

/// The chunk being filled, and those before it.
struct Chunker<'a> {
    tokenizer: &'a ClipTokenizer,
    chunks: Vec<Chunk>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    /// Where the current chunk's last comma is.
    last_comma: Option<usize>,
}

impl Chunker<'_> {
    /// Ends the current chunk (even an empty one): start and end tokens added, padded.
    fn close(&mut self) {
        let mut weights = [vec![1.0], std::mem::take(&mut self.weights), vec![1.0]].concat();
        weights.resize(self.tokenizer.max_length, 1.0);
        self.chunks.push(Chunk { ids: self.tokenizer.wrap(&std::mem::take(&mut self.ids)), weights });
        self.last_comma = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marks a `BREAK` in the expected pieces.
    const BREAK: (&str, f64) = ("", f64::INFINITY);

    fn text(pieces: &[(&str, f64)]) -> Vec<Piece> {
        pieces.iter().map(|&(t, w)| if w.is_infinite() { Piece::Break } else { Piece::Text(t.into(), w) }).collect()
    }

    fn check(prompt: &str, expected: &[(&str, f64)]) {
        let parsed = parse(prompt).unwrap();
        let expected = text(expected);
        assert_eq!(parsed.len(), expected.len(), "{prompt:?}: {parsed:?}");
        for (got, want) in parsed.iter().zip(&expected) {
            match (got, want) {
                (Piece::Text(a, w), Piece::Text(b, v)) => assert!(a == b && (w - v).abs() < 1e-12, "{prompt:?}: {parsed:?}"),
                (Piece::Break, Piece::Break) => {}
                _ => panic!("{prompt:?}: {parsed:?}"),
            }
        }
    }

    /// The examples in A1111's `parse_prompt_attention` documentation.
    #[test]
    fn a1111_documented_cases() {
        check("normal text", &[("normal text", 1.0)]);
        check("an (important) word", &[("an ", 1.0), ("important", 1.1), (" word", 1.0)]);
        check("(unbalanced", &[("unbalanced", 1.1)]);
        check("\\(literal\\]", &[("(literal]", 1.0)]);
        check("(unnecessary)(parens)", &[("unnecessaryparens", 1.1)]);
        check(
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            &[("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
        );
    }

    #[test]
    fn breaks_weights_and_literals() {
        check("a BREAK b", &[("a", 1.0), BREAK, ("b", 1.0)]);
        check("BREAK", &[("", 1.0), BREAK, ("", 1.0)]);
        check("BREAKING aBREAK BREAK_", &[("BREAKING aBREAK BREAK_", 1.0)]);
        check("(a BREAK b)", &[("a BREAK b", 1.1)]);
        check("(a: 0.5 )x", &[("a", 0.5), ("x", 1.0)]);
        check("[a]", &[("a", 1.0 / 1.1)]);
        check("a:1.5) b", &[("a:1.5) b", 1.0)]);
        check("time: noon", &[("time: noon", 1.0)]);
        check("a\\b\\\\", &[("ab\\", 1.0)]);
        check("a(\\:0.8)b", &[("a", 1.0), ("", 0.8), ("b", 1.0)]);
        check("))]]", &[("))]]", 1.0)]);
        check("", &[("", 1.0)]);
        check("(a:-1)", &[("a", -1.0)]);
    }

    #[test]
    fn a_malformed_weight_is_an_error() {
        let err = parse("(x:1.2.3)").unwrap_err().to_string();
        assert!(err.contains("\"1.2.3\"") && err.contains("not a number"), "{err}");
        assert!(parse("x:1.2.3)").is_ok(), "outside brackets it is text");
        for huge in [format!("(x:{})", "9".repeat(40)), format!("{}x", "(".repeat(1000))] {
            let err = parse(&huge).unwrap_err().to_string();
            assert!(err.contains("too large a weight"), "{err}");
        }
    }

    #[test]
    fn lora_tags_are_taken_out_of_the_text() {
        let tag = |name: &str, weight| LoraTag { name: name.into(), weight };
        let (plain, tags) = lora_tags("a cat <lora:ink_v2:0.8>, (sky)<lora:x>").unwrap();
        assert_eq!(plain, "a cat , (sky)");
        assert_eq!(tags, vec![tag("ink_v2", 0.8), tag("x", 1.0)]);
        assert_eq!(lora_tags("<lora:x:-0.5:-0.5> <lora:open").unwrap(), (" <lora:open".into(), vec![tag("x", -0.5)]));
        for bad in ["<lora::1>", "<lora:x:y>", "<lora:x:1:0.5>", "<lora:x:1:1:1>"] {
            assert!(lora_tags(bad).is_err(), "{bad}");
        }
    }
}
