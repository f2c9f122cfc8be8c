//! Automatic1111's `parameters` text read back, as its `parse_generation_parameters` reads it:
//! the prompt, the negative prompt, and the settings line's fields with their values as
//! written (a JSON-quoted value unquoted). Kiln writes the same text ([`super::png`]).
use serde::Serialize;

use crate::error::{Error, Result};
use crate::schedulers::SchedulerKind;

/// The parts of a `parameters` text.
#[derive(Debug, PartialEq)]
pub struct Infotext {
    pub prompt: String,
    pub negative_prompt: String,
    /// The settings line's fields in order (`Steps`, `Sampler`, `CFG scale`, …); a repeated
    /// name keeps its first place and its last value.
    pub fields: Vec<(String, String)>,
}

impl Infotext {
    pub fn parse(text: &str) -> Self {
        let mut lines: Vec<&str> = text.trim().split('\n').collect();
        // The last line holds the settings when at least three fields can be read from it.
        let last = lines.pop().unwrap_or_default();
        let (mut fields, found) = settings_fields(last);
        if found < 3 {
            lines.push(last);
            fields.clear();
        }
        let (mut prompt, mut negative_prompt, mut negative) = (String::new(), String::new(), false);
        for line in lines {
            let mut line = line.trim();
            if let Some(rest) = line.strip_prefix("Negative prompt:") {
                negative = true;
                line = rest.trim();
            }
            // As A1111 joins them: a line break only once the text has begun.
            let text = if negative { &mut negative_prompt } else { &mut prompt };
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(line);
        }
        Infotext { prompt, negative_prompt, fields }
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The settings Kiln can apply, read from the fields; the others are kept to be shown.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings { prompt: self.prompt.clone(), negative_prompt: self.negative_prompt.clone(), ..Settings::default() };
        let scheduler = self.field("Sampler").and_then(|sampler| SchedulerKind::from_a1111(sampler, self.field("Schedule type")));
        for (name, value) in &self.fields {
            let applied = match name.as_str() {
                "Steps" => value.parse().ok().map(|v| settings.steps = Some(v)),
                "Sampler" | "Schedule type" => scheduler.map(|kind| settings.scheduler = Some(kind.name())),
                "CFG scale" => value.parse().ok().map(|v| settings.guidance = Some(v)),
                "Seed" => value.parse().ok().map(|v| settings.seed = Some(v)),
                "Size" => value.split_once('x').and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?))).map(|(w, h)| {
                    (settings.width, settings.height) = (Some(w), Some(h));
                }),
                "Denoising strength" => value.parse().ok().map(|v| settings.strength = Some(v)),
                _ => None,
            };
            if applied.is_none() {
                settings.unused.push((name.clone(), value.clone()));
            }
        }
        settings
    }
}

/// What Kiln applies of a `parameters` text, in its own terms (`scheduler` as `kiln
/// --scheduler` names it).
#[derive(Debug, Default, PartialEq, Serialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export, rename = "PngInfo", optional_fields))]
pub struct Settings {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: Option<usize>,
    pub scheduler: Option<&'static str>,
    pub guidance: Option<f64>,
    #[cfg_attr(test, ts(as = "Option<f64>"))]
    pub seed: Option<u64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub strength: Option<f64>,
    /// Fields Kiln has no setting for, or whose value it cannot read, as written.
    pub unused: Vec<(String, String)>,
}

/// Every `Name: value` of a settings line, as A1111's pattern
/// `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)` finds them, and how many it found
/// (repeats included).
fn settings_fields(line: &str) -> (Vec<(String, String)>, usize) {
    let chars: Vec<char> = line.chars().collect();
    let mut fields: Vec<(String, String)> = Vec::new();
    let (mut at, mut found) = (0, 0);
    while at < chars.len() {
        let Some((name, value, next)) = field_at(&chars, at) else {
            at += 1;
            continue;
        };
        found += 1;
        match fields.iter_mut().find(|(k, _)| *k == name) {
            Some(field) => field.1 = value,
            None => fields.push((name, value)),
        }
        at = next.max(at + 1);
    }
    (fields, found)
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The field that starts at `start`, and where the next search begins.
fn field_at(c: &[char], start: usize) -> Option<(String, String, usize)> {
    let skip_space = |mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let name_start = skip_space(start);
    if !c.get(name_start).is_some_and(|&ch| is_word(ch)) {
        return None;
    }
    let mut i = name_start + 1;
    while i < c.len() && (is_word(c[i]) || matches!(c[i], ' ' | '-' | '/')) {
        i += 1;
    }
    if i == name_start + 1 || c.get(i) != Some(&':') {
        return None;
    }
    let name: String = c[name_start..i].iter().collect();
    let value_start = skip_space(i + 1);
    let ends_field = |i: usize| i == c.len() || c[i] == ',';
    if let Some(end) = quoted_end(c, value_start).filter(|&end| ends_field(end)) {
        let raw: String = c[value_start..end].iter().collect();
        let value = serde_json::from_str::<String>(&raw).unwrap_or(raw);
        return Some((name, value, end + 1));
    }
    let mut end = value_start;
    while !ends_field(end) {
        end += 1;
    }
    Some((name, c[value_start..end].iter().collect(), end + 1))
}

/// Just past the closing quote of a `"…"` (backslash escapes, not empty) at `start`.
fn quoted_end(c: &[char], start: usize) -> Option<usize> {
    if c.get(start) != Some(&'"') {
        return None;
    }
    let mut i = start + 1;
    while i < c.len() {
        match c[i] {
            '\\' => i += 2,
            '"' if i > start + 1 => return Some(i + 1),
            '"' => return None,
            _ => i += 1,
        }
    }
    None
}

/// The `parameters` text of a PNG (tEXt, zTXt or iTXt, before or after the image data);
/// `None` when it has none.
pub fn read_png(bytes: &[u8]) -> Result<Option<String>> {
    let err = |e: png::DecodingError| Error::Invalid(format!("not a readable PNG: {e}"));
    let find = |info: &png::Info| -> Option<String> {
        let latin1 = info.uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters").map(|t| t.text.clone());
        let compressed = || info.compressed_latin1_text.iter().find(|t| t.keyword == "parameters").and_then(|t| t.get_text().ok());
        let utf8 = || info.utf8_text.iter().find(|t| t.keyword == "parameters").and_then(|t| t.get_text().ok());
        latin1.or_else(compressed).or_else(utf8)
    };
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().map_err(err)?;
    if let Some(text) = find(reader.info()) {
        return Ok(Some(text));
    }
    // Text after the image data is read only once the image has been (its size checked first).
    let (width, height) = (reader.info().width, reader.info().height);
    if u64::from(width) * u64::from(height) > super::image_processor::MAX_PIXELS {
        return Err(Error::Invalid(format!("the PNG is {width}×{height}, too large to read")));
    }
    let size = reader.output_buffer_size().ok_or_else(|| Error::Invalid("the PNG is too large".into()))?;
    reader.next_frame(&mut vec![0; size]).map_err(err)?;
    reader.finish().map_err(err)?;
    Ok(find(reader.info()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Vec<(String, String)> {
        Infotext::parse(text).fields
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn reads_what_a1111_writes() {
        let text = "a castle on a hill,\n(masterpiece:1.2)\nNegative prompt: blurry,\nlow quality\n\
                    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: abc123, \
                    Denoising strength: 0.75, Lora hashes: \"detail: 0a1b, style: 2c3d\", Hires upscale: 2";
        let info = Infotext::parse(text);
        assert_eq!(info.prompt, "a castle on a hill,\n(masterpiece:1.2)");
        assert_eq!(info.negative_prompt, "blurry,\nlow quality");
        assert_eq!(
            info.fields,
            pairs(&[
                ("Steps", "20"),
                ("Sampler", "DPM++ 2M Karras"),
                ("CFG scale", "7"),
                ("Seed", "1234"),
                ("Size", "512x768"),
                ("Model hash", "abc123"),
                ("Denoising strength", "0.75"),
                ("Lora hashes", "detail: 0a1b, style: 2c3d"),
                ("Hires upscale", "2"),
            ])
        );
        assert_eq!(info.field("Seed"), Some("1234"));
    }

    #[test]
    fn settings_are_what_kiln_can_apply_and_the_rest_is_kept() {
        let text = "a castle\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, \
                    Size: 512x768, Model hash: abc123, Denoising strength: 0.75, Clip skip: 2";
        let settings = Infotext::parse(text).settings();
        let expected = Settings {
            prompt: "a castle".into(),
            negative_prompt: "blurry".into(),
            steps: Some(20),
            scheduler: Some("dpmpp-2m-karras"),
            guidance: Some(7.0),
            seed: Some(1234),
            width: Some(512),
            height: Some(768),
            strength: Some(0.75),
            unused: pairs(&[("Model hash", "abc123"), ("Clip skip", "2")]),
        };
        assert_eq!(settings, expected);
        // A1111 1.9 and later write the schedule apart; samplers Kiln lacks, and bad values, stay unused.
        let sampler = |fields: &str| Infotext::parse(&format!("x\nSteps: 2, Seed: 3, {fields}")).settings();
        assert_eq!(sampler("Sampler: DPM++ 2M, Schedule type: Karras").scheduler, Some("dpmpp-2m-karras"));
        assert_eq!(sampler("Sampler: DPM++ 2M, Schedule type: Automatic").scheduler, Some("dpmpp-2m-karras"));
        assert_eq!(sampler("Sampler: Euler a, Schedule type: Automatic").scheduler, Some("euler-a"));
        assert_eq!(sampler("Sampler: PLMS").scheduler, Some("pndm"));
        let unknown = sampler("Sampler: DPM++ SDE, Size: 5x");
        assert_eq!((unknown.scheduler, unknown.unused), (None, pairs(&[("Sampler", "DPM++ SDE"), ("Size", "5x")])));
    }

    #[test]
    fn a_text_without_a_settings_line_is_all_prompt() {
        let info = Infotext::parse("\n\njust a prompt: with a colon\n\nand a second line\nNegative prompt:\nlate");
        assert_eq!((info.prompt.as_str(), info.negative_prompt.as_str()), ("just a prompt: with a colon\n\nand a second line", "late"));
        let info = Infotext::parse("just a prompt: with a colon\nand a second line");
        assert_eq!(info.prompt, "just a prompt: with a colon\nand a second line");
        assert!(info.fields.is_empty() && info.negative_prompt.is_empty());
        // Two fields are not a settings line (A1111 needs three).
        assert_eq!(Infotext::parse("x\nSteps: 2, Seed: 3").prompt, "x\nSteps: 2, Seed: 3");
    }

    #[test]
    fn values_are_strings_as_written() {
        assert_eq!(fields("Steps: 020, CFG scale: 7.50, Size: 64x64"), pairs(&[("Steps", "020"), ("CFG scale", "7.50"), ("Size", "64x64")]));
        // A quote that does not end the field is part of a plain value; escapes are undone.
        assert_eq!(fields(r#"Aa: "x" y, Bb: "a\"b", Cc: 1"#), pairs(&[("Aa", "\"x\" y"), ("Bb", "a\"b"), ("Cc", "1")]));
        // A repeated name keeps its place and takes the last value; a name has two characters or more.
        assert_eq!(fields("Aa: 1, Bb: 2, Aa: 3, C: 4"), pairs(&[("Aa", "3"), ("Bb", "2")]));
    }

    #[test]
    fn kiln_text_round_trips() {
        let params = super::super::png::GenerationParams {
            prompt: "a cat\non two lines".into(),
            negative_prompt: "dull".into(),
            steps: 4,
            sampler: "Euler a".into(),
            cfg_scale: 7.5,
            seed: Some(9),
            width: 64,
            height: 96,
            model: "my model, v2".into(),
        };
        let info = Infotext::parse(&params.a1111_text(&[("Denoising strength", "0.5".into())]));
        assert_eq!((info.prompt.as_str(), info.negative_prompt.as_str()), ("a cat\non two lines", "dull"));
        assert_eq!(
            info.fields,
            pairs(&[("Steps", "4"), ("Sampler", "Euler a"), ("CFG scale", "7.5"), ("Seed", "9"), ("Size", "64x96"), ("Model", "my model, v2"), ("Denoising strength", "0.5")])
        );
        let png = super::super::png::encode(&[0; 3], 1, 1, "ünïcödé\nSteps: 1, Seed: 2, Size: 1x1").unwrap();
        assert_eq!(read_png(&png).unwrap().as_deref(), Some("ünïcödé\nSteps: 1, Seed: 2, Size: 1x1"));
        assert!(read_png(b"not a png").unwrap_err().to_string().contains("not a readable PNG"));
    }
}
