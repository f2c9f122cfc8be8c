//! The finished image: diffusers' float-to-8-bit conversion and a PNG carrying
//! Automatic1111's `parameters` text, so other tools read the settings back.
use crate::error::{Error, Result};

/// What produced an image, in the form Automatic1111's web UI writes and reads.
pub struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub sampler: String,
    pub cfg_scale: f64,
    /// `None` when the noise came from a file and no seed was given.
    pub seed: Option<u64>,
    pub width: usize,
    pub height: usize,
    pub model: String,
}

impl GenerationParams {
    /// The text, with mode-specific settings appended to the settings line
    /// (`("Denoising strength", "0.75")`).
    pub fn a1111_text(&self, extra: &[(&str, String)]) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        }
        text.push_str(&format!("\nSteps: {}, Sampler: {}, CFG scale: {}", self.steps, quote(&self.sampler), self.cfg_scale));
        if let Some(seed) = self.seed {
            text.push_str(&format!(", Seed: {seed}"));
        }
        text.push_str(&format!(", Size: {}x{}, Model: {}", self.width, self.height, quote(&self.model)));
        for (key, value) in extra {
            text.push_str(&format!(", {key}: {}", quote(value)));
        }
        text
    }
}

/// A settings-line value as Automatic1111 writes it: JSON-quoted when it holds a comma, colon or
/// newline, which would otherwise split it.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) { serde_json::Value::from(value).to_string() } else { value.to_owned() }
}

/// `[3, H, W]` values mapped to [0, 1] → interleaved RGB bytes, clamped and rounded half to
/// even as diffusers' `(x.clamp(0, 1) * 255).round()`.
pub fn to_rgb8(chw: &[f32], width: usize, height: usize) -> Vec<u8> {
    let plane = width * height;
    let mut out = Vec::with_capacity(plane * 3);
    for i in 0..plane {
        for c in 0..3 {
            out.push((chw[c * plane + i].clamp(0.0, 1.0) * 255.0).round_ties_even() as u8);
        }
    }
    out
}

/// An 8-bit RGB PNG with a `parameters` chunk: tEXt when the text is Latin-1, else iTXt (as PIL does).
pub fn encode(rgb: &[u8], width: usize, height: usize, parameters: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let err = |e: png::EncodingError| Error::Invalid(format!("PNG encoding failed: {e}"));
    let mut encoder = png::Encoder::new(&mut bytes, width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    if parameters.chars().all(|c| (c as u32) < 256) {
        encoder.add_text_chunk("parameters".into(), parameters.into()).map_err(err)?;
    } else {
        encoder.add_itxt_chunk("parameters".into(), parameters.into()).map_err(err)?;
    }
    let mut writer = encoder.write_header().map_err(err)?;
    writer.write_image_data(rgb).map_err(err)?;
    writer.finish().map_err(err)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_parameters() {
        let mut p = GenerationParams {
            prompt: "a cat".into(),
            negative_prompt: "blurry".into(),
            steps: 20,
            sampler: "Euler a".into(),
            cfg_scale: 7.0,
            seed: Some(42),
            width: 512,
            height: 768,
            model: "sd15".into(),
        };
        assert_eq!(p.a1111_text(&[]), "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, Model: sd15");
        p.negative_prompt.clear();
        p.seed = None;
        p.cfg_scale = 7.5;
        assert_eq!(p.a1111_text(&[]), "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Size: 512x768, Model: sd15");
        assert_eq!(
            p.a1111_text(&[("Denoising strength", 0.75.to_string()), ("Mask blur", 4.to_string())]),
            "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Size: 512x768, Model: sd15, Denoising strength: 0.75, Mask blur: 4"
        );
        // A value that would split the settings line is quoted, as Automatic1111 does.
        p.model = "my model, v2: \"final\"".into();
        assert_eq!(p.a1111_text(&[]), "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Size: 512x768, Model: \"my model, v2: \\\"final\\\"\"");
    }

    #[test]
    fn png_round_trip_keeps_pixels_and_text() {
        let rgb: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 13) as u8).collect();
        for text in ["plain text", "ünïcödé ✨ prompt"] {
            let bytes = encode(&rgb, 3, 2, text).unwrap();
            let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size().unwrap()];
            reader.next_frame(&mut buf).unwrap();
            assert_eq!(buf, rgb);
            let info = reader.info();
            let found: Vec<String> = info
                .uncompressed_latin1_text
                .iter()
                .map(|t| t.text.clone())
                .chain(info.utf8_text.iter().map(|t| t.get_text().unwrap()))
                .collect();
            assert_eq!(found, vec![text.to_string()]);
        }
    }

    #[test]
    fn conversion_is_planar_to_interleaved() {
        // Two pixels; planes R = [0, 1], G = [0.5, 0.25], B = [1, 0].
        let chw = [0.0, 1.0, 0.5, 0.25, 1.0, 0.0];
        assert_eq!(to_rgb8(&chw, 2, 1), vec![0, 128, 255, 255, 64, 0]);
    }
}
