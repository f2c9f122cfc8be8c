//! An input image fitted to the size the model takes, as Automatic1111's resize modes fit
//! it: stretched, scaled to cover and cropped, or scaled to fit and the rest filled from its
//! edges. Resampling is PIL's antialiased Lanczos-3 (A1111 resizes with `Image.LANCZOS`).
use super::image_processor::Image8;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResizeMode {
    /// "Just resize": stretched to the size (A1111's default).
    #[default]
    Just,
    /// "Crop and resize": scaled to cover the size, the overflow cut off evenly.
    Crop,
    /// "Resize and fill": scaled to fit inside, the bands left filled with its edge pixels.
    Fill,
}

impl ResizeMode {
    pub const ALL: [ResizeMode; 3] = [ResizeMode::Just, ResizeMode::Crop, ResizeMode::Fill];

    /// As `--resize-mode` and the page name it.
    pub fn name(self) -> &'static str {
        match self {
            ResizeMode::Just => "just",
            ResizeMode::Crop => "crop",
            ResizeMode::Fill => "fill",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name).ok_or_else(|| Error::Invalid(format!("resize mode {name:?} is not one of just, crop, fill")))
    }

    /// Automatic1111's label.
    pub fn label(self) -> &'static str {
        match self {
            ResizeMode::Just => "Just resize",
            ResizeMode::Crop => "Crop and resize",
            ResizeMode::Fill => "Resize and fill",
        }
    }

    /// `image` at `width`×`height` and, when it had another size, a note for the user saying
    /// so; `what` names it.
    pub fn fit(self, image: Image8, width: usize, height: usize, what: &str) -> (Image8, Option<String>) {
        if (image.width, image.height) == (width, height) {
            return (image, None);
        }
        let note = format!("the {what} ({}×{}) was resized to {width}×{height} ({})", image.width, image.height, self.label());
        (self.apply(&image, width, height), Some(note))
    }

    /// `image` at `width`×`height` (itself when it has that size already).
    pub fn apply(self, image: &Image8, width: usize, height: usize) -> Image8 {
        if (image.width, image.height) == (width, height) {
            return image.clone();
        }
        let (w, h) = (image.width, image.height);
        // The scaled image's size; A1111 computes it in integers the same way.
        let (sw, sh) = match self {
            ResizeMode::Just => (width, height),
            ResizeMode::Crop if width * h > w * height => (width, h * width / w),
            ResizeMode::Crop => (w * height / h, height),
            ResizeMode::Fill if width * h < w * height => (width, h * width / w),
            ResizeMode::Fill => (w * height / h, height),
        };
        let scaled = lanczos(image, sw.max(1), sh.max(1));
        // Centred; outside the scaled image the nearest edge pixel (cropping is the same
        // lookup with no outside).
        let (left, top) = ((width as isize - sw as isize) / 2, (height as isize - sh as isize) / 2);
        let c = image.channels;
        let mut pixels = Vec::with_capacity(width * height * c);
        for y in 0..height {
            let sy = (y as isize - top).clamp(0, sh as isize - 1) as usize;
            for x in 0..width {
                let sx = (x as isize - left).clamp(0, sw as isize - 1) as usize;
                pixels.extend_from_slice(&scaled.pixels[(sy * sw + sx) * c..][..c]);
            }
        }
        Image8 { width, height, channels: c, pixels }
    }
}

/// `image` resampled to `width`×`height`, one axis at a time, as PIL's `resize(…, LANCZOS)`.
fn lanczos(image: &Image8, width: usize, height: usize) -> Image8 {
    let c = image.channels;
    let values: Vec<f32> = image.pixels.iter().map(|&v| f32::from(v)).collect();
    // Rows first: [h][w][c] → [h][width][c], then columns: → [height][width][c].
    let rows = resample(&values, image.height, image.width, c, width);
    let transposed = transpose(&rows, image.height, width, c);
    let columns = resample(&transposed, width, image.height, c, height);
    let pixels = transpose(&columns, width, height, c).into_iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect();
    Image8 { width, height, channels: c, pixels }
}

/// Each of `lines` lines of `len` pixels resampled to `out` pixels.
fn resample(values: &[f32], lines: usize, len: usize, c: usize, out: usize) -> Vec<f32> {
    let taps = taps(len, out);
    let mut result = Vec::with_capacity(lines * out * c);
    for line in values.chunks_exact(len * c) {
        for (first, weights) in &taps {
            for channel in 0..c {
                result.push(weights.iter().enumerate().map(|(k, w)| w * line[(first + k) * c + channel]).sum());
            }
        }
    }
    result
}

/// For each output pixel, its first input pixel and the weights from there (PIL's
/// `precompute_coeffs`: the kernel widened by the scale when shrinking, weights normalised).
fn taps(len: usize, out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = len as f64 / out as f64;
    let filter_scale = scale.max(1.0);
    let support = 3.0 * filter_scale;
    (0..out)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let first = ((center - support + 0.5).floor().max(0.0)) as usize;
            let last = ((center + support + 0.5).floor() as usize).min(len);
            let weights: Vec<f64> = (first..last).map(|x| lanczos3((x as f64 - center + 0.5) / filter_scale)).collect();
            let total: f64 = weights.iter().sum();
            (first, weights.iter().map(|w| (w / total) as f32).collect())
        })
        .collect()
}

fn lanczos3(x: f64) -> f64 {
    let sinc = |x: f64| if x == 0.0 { 1.0 } else { (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x) };
    if x.abs() < 3.0 { sinc(x) * sinc(x / 3.0) } else { 0.0 }
}

/// `[a][b][c]` → `[b][a][c]`.
fn transpose(values: &[f32], a: usize, b: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for i in 0..a {
        for j in 0..b {
            out[(j * a + i) * c..][..c].copy_from_slice(&values[(i * b + j) * c..][..c]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grey image whose left half is 0 and right half 200.
    fn halves(width: usize, height: usize) -> Image8 {
        let pixels = (0..width * height).map(|i| if i % width < width / 2 { 0 } else { 200 }).collect();
        Image8 { width, height, channels: 1, pixels }
    }

    fn row(image: &Image8, y: usize) -> &[u8] {
        &image.pixels[y * image.width..][..image.width]
    }

    #[test]
    fn each_mode_fits_as_a1111_does() {
        let wide = halves(8, 4);
        // Stretched: both halves stay half each.
        let just = ResizeMode::Just.apply(&wide, 4, 4);
        assert_eq!((just.width, just.height), (4, 4));
        assert!(row(&just, 0)[0] < 20 && row(&just, 0)[3] > 180, "{:?}", row(&just, 0));
        // Cropped to its middle 4×4: still one dark and one light half, at full scale.
        let crop = ResizeMode::Crop.apply(&wide, 4, 4);
        assert_eq!(row(&crop, 2), &[0, 0, 200, 200]);
        // Fitted as 4×2 in the middle, the bands above and below copying its edge rows.
        let fill = ResizeMode::Fill.apply(&wide, 4, 4);
        assert!((0..4).all(|y| row(&fill, y) == row(&fill, 0)), "{:?}", fill.pixels);
        // Nothing happens at the image's own size.
        assert_eq!(ResizeMode::Crop.apply(&wide, 8, 4), wide);
    }

    #[test]
    fn lanczos_keeps_flat_images_flat_and_names_round_trip() {
        let flat = Image8 { width: 7, height: 5, channels: 3, pixels: vec![77; 7 * 5 * 3] };
        for (w, h) in [(3, 2), (16, 9), (7, 11)] {
            assert!(lanczos(&flat, w, h).pixels.iter().all(|&v| v == 77), "{w}x{h}");
        }
        for mode in ResizeMode::ALL {
            assert_eq!(ResizeMode::from_name(mode.name()).unwrap(), mode);
        }
        assert!(ResizeMode::from_name("stretch").unwrap_err().to_string().contains("just, crop, fill"));
    }
}
