//! diffusers' `VaeImageProcessor` for the images Kiln takes in: PNG decoding as PIL's
//! `convert("RGB")` / `convert("L")` give it, normalisation to [-1, 1], inpainting's mask
//! preprocessing (grey, binarised at 0.5, nearest-neighbour down to the latent grid) and PIL's
//! `GaussianBlur`, which is what diffusers' `mask_processor.blur` applies.
//!
//! Images are never resized: diffusers resizes only to round sizes down to a multiple of the VAE
//! factor, and Kiln asks for sizes that are already valid instead.
use crate::error::{Error, Result};

/// An 8-bit image, interleaved: `channels` is 1 (grey) or 3 (RGB).
#[derive(Clone, Debug, PartialEq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

/// The largest input image read (a photo to be scaled down may exceed what the GPU holds).
pub(super) const MAX_PIXELS: u64 = 64_000_000;

impl Image8 {
    /// Decodes a PNG of any colour type. Palettes are expanded, 16-bit samples keep their high
    /// byte and alpha is dropped without compositing, as PIL's conversions do.
    pub fn decode_png(bytes: &[u8]) -> Result<Self> {
        let err = |e: png::DecodingError| Error::Invalid(format!("not a readable PNG: {e}"));
        let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::normalize_to_color8());
        let mut reader = decoder.read_info().map_err(err)?;
        let (width, height) = (reader.info().width, reader.info().height);
        // Checked before the pixels are allocated: a header may claim any size.
        if u64::from(width) * u64::from(height) > MAX_PIXELS {
            return Err(Error::Invalid(format!("the PNG is {width}×{height}, larger than the {} megapixels Kiln reads", MAX_PIXELS / 1_000_000)));
        }
        let size = reader.output_buffer_size().ok_or_else(|| Error::Invalid("PNG is too large".into()))?;
        let mut buf = vec![0; size];
        let info = reader.next_frame(&mut buf).map_err(err)?;
        buf.truncate(info.buffer_size());
        let (width, height) = (info.width as usize, info.height as usize);
        let (stride, keep) = match info.color_type {
            png::ColorType::Grayscale => (1, 1),
            png::ColorType::GrayscaleAlpha => (2, 1),
            png::ColorType::Rgb => (3, 3),
            png::ColorType::Rgba => (4, 3),
            png::ColorType::Indexed => return Err(Error::Invalid("PNG palette was not expanded".into())),
        };
        let pixels = buf.chunks_exact(stride).flat_map(|px| px[..keep].iter().copied()).collect();
        Ok(Self { width, height, channels: keep, pixels })
    }

    /// PIL's `convert("RGB")`: grey is repeated into the three channels.
    pub fn to_rgb(&self) -> Image8 {
        match self.channels {
            3 => self.clone(),
            _ => Image8 { pixels: self.pixels.iter().flat_map(|&v| [v; 3]).collect(), channels: 3, ..*self },
        }
    }

    /// PIL's `convert("L")`: ITU-R 601-2 luma in PIL's 16-bit fixed point.
    pub fn to_luma(&self) -> Vec<u8> {
        match self.channels {
            1 => self.pixels.clone(),
            _ => self
                .pixels
                .chunks_exact(3)
                .map(|p| ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8)
                .collect(),
        }
    }

    /// `[1, 3, H, W]` planar values in [-1, 1]: `x / 255 * 2 - 1` in float32 as diffusers'
    /// `pil_to_numpy` and `normalize` compute it.
    pub fn normalized(&self) -> Vec<f32> {
        let rgb = self.to_rgb();
        let plane = self.width * self.height;
        let mut out = vec![0.0f32; 3 * plane];
        for (i, px) in rgb.pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (f32::from(px[c]) / 255.0) * 2.0 - 1.0;
            }
        }
        out
    }

    /// PIL's `ImageFilter.GaussianBlur(radius)`: three box blurs per axis whose widths
    /// approximate a Gaussian of standard deviation `radius`, each rounded to 8 bits, exactly as
    /// Pillow's `BoxBlur.c` computes them. `radius` 0 returns the image unchanged.
    pub fn gaussian_blur(&self, radius: f32) -> Image8 {
        if radius <= 0.0 {
            return self.clone();
        }
        const PASSES: usize = 3;
        let box_radius = gaussian_box_radius(radius, PASSES as f32);
        let (w, h, ch) = (self.width, self.height, self.channels);
        let mut out = self.clone();
        let mut line = Vec::new();
        let mut blurred = Vec::new();
        // Blurs one line of the image in place; `at(i)` is the line's i-th pixel index.
        let mut blur_line = |pixels: &mut [u8], len: usize, at: &dyn Fn(usize) -> usize| {
            line.clear();
            line.extend((0..len).map(|i| pixels[at(i)]));
            for _ in 0..PASSES {
                box_blur_line(&line, &mut blurred, box_radius);
                std::mem::swap(&mut line, &mut blurred);
            }
            for (i, &v) in line.iter().enumerate() {
                pixels[at(i)] = v;
            }
        };
        for c in 0..ch {
            // Rows, then columns (Pillow transposes and blurs rows again).
            for y in 0..h {
                blur_line(&mut out.pixels, w, &|x| (y * w + x) * ch + c);
            }
            for x in 0..w {
                blur_line(&mut out.pixels, h, &|y| (y * w + x) * ch + c);
            }
        }
        out
    }
}

/// Pillow's `_gaussian_blur_radius` (Gwosdek et al. 2011, extended box blur): the fractional box
/// radius whose `passes` repetitions have variance `radius²`. C float/double mix kept.
fn gaussian_box_radius(radius: f32, passes: f32) -> f32 {
    let sigma2 = radius * radius / passes;
    let length = (12.0 * f64::from(sigma2) + 1.0).sqrt() as f32;
    let whole = ((f64::from(length) - 1.0) / 2.0).floor() as f32;
    let mut fraction = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * sigma2);
    fraction /= 6.0 * (sigma2 - (whole + 1.0) * (whole + 1.0));
    whole + fraction
}

/// `ImagingHorizontalBoxBlur` on one line: a box of `2r + 1` pixels plus fractional end weights,
/// edges extended, in Pillow's unsigned 8.24 fixed point (wrapping like C's `UINT32`).
fn box_blur_line(input: &[u8], output: &mut Vec<u8>, float_radius: f32) {
    let size = input.len();
    let last = size - 1;
    let radius = float_radius as usize;
    let ww = (16_777_216f32 / (float_radius * 2.0 + 1.0)) as u32;
    let fw = (16_777_216u32.wrapping_sub((radius as u32 * 2 + 1).wrapping_mul(ww))) / 2;
    // The window's pixel at `i`, edges extended.
    let px = |i: isize| u32::from(input[i.clamp(0, last as isize) as usize]);
    let r = radius as isize;
    // Sum of the window centred on pixel -1.
    let mut acc = (-r - 1..r).fold(0u32, |acc, i| acc.wrapping_add(px(i)));
    output.clear();
    for x in 0..size as isize {
        acc = acc.wrapping_add(px(x + r)).wrapping_sub(px(x - r - 1));
        let bulk = acc.wrapping_mul(ww).wrapping_add((px(x - r - 1) + px(x + r + 1)).wrapping_mul(fw));
        output.push((bulk.wrapping_add(1 << 23) >> 24) as u8);
    }
}

/// An inpainting mask after `StableDiffusionInpaintPipeline`'s preprocessing: 1 = repaint,
/// 0 = keep.
pub struct Mask {
    /// Full resolution `[H, W]`, for `masked_image = image * (mask < 0.5)`.
    pub full: Vec<f32>,
    /// The latent grid `[H/f, W/f]`: `F.interpolate(mask, size)`'s nearest neighbour, which picks
    /// the top-left pixel of each `f`×`f` cell.
    pub latent: Vec<f32>,
}

impl Mask {
    /// Grey via PIL's luma, then `mask >= 0.5` (on `L / 255` in float32, i.e. `L >= 128`).
    /// `blur` is applied first, as `mask_processor.blur(mask, blur)` would be by a diffusers user.
    pub fn preprocess(mask: &Image8, blur: f32, factor: usize) -> Mask {
        let luma = mask.gaussian_blur(blur).to_luma();
        let full: Vec<f32> = luma.iter().map(|&l| if f32::from(l) / 255.0 >= 0.5 { 1.0 } else { 0.0 }).collect();
        let (w, h) = (mask.width, mask.height);
        let latent = (0..h / factor).flat_map(|y| (0..w / factor).map(move |x| (y, x))).map(|(y, x)| full[y * factor * w + x * factor]).collect();
        Mask { full, latent }
    }

    /// The normalised image with the repainted region set to 0 (diffusers' `masked_image`).
    pub fn mask_image(&self, normalized: &[f32]) -> Vec<f32> {
        let plane = self.full.len();
        normalized.iter().enumerate().map(|(i, &v)| if self.full[i % plane] < 0.5 { v } else { 0.0 }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(width: usize, height: usize, pixels: Vec<u8>) -> Image8 {
        Image8 { width, height, channels: 1, pixels }
    }

    /// Values from Pillow 13: `Image.fromarray(a).filter(ImageFilter.GaussianBlur(2))` on a 16×16
    /// zero image with `a[4:10, 5:12] = 255`, row 7.
    #[test]
    fn blur_matches_pillow() {
        let mut pixels = vec![0u8; 256];
        for y in 4..10 {
            for x in 5..12 {
                pixels[y * 16 + x] = 255;
            }
        }
        let blurred = grey(16, 16, pixels).gaussian_blur(2.0);
        assert_eq!(&blurred.pixels[7 * 16..8 * 16], &[2, 8, 24, 51, 88, 130, 167, 192, 201, 192, 167, 130, 88, 51, 24, 9]);
    }

    #[test]
    fn luma_and_binarisation_follow_pil() {
        let rgb = Image8 { width: 2, height: 1, channels: 3, pixels: vec![255, 0, 0, 128, 128, 128] };
        assert_eq!(rgb.to_luma(), vec![76, 128]);
        let mask = Mask::preprocess(&grey(2, 1, vec![127, 128]), 0.0, 1);
        assert_eq!(mask.full, vec![0.0, 1.0]);
    }

    #[test]
    fn latent_mask_takes_each_cells_top_left_pixel() {
        let mut pixels = vec![0u8; 16];
        pixels[2] = 255; // (0, 2): top-left of cell (0, 1)
        pixels[5] = 255; // (1, 1): inside cell (0, 0), not its corner
        let mask = Mask::preprocess(&grey(4, 4, pixels), 0.0, 2);
        assert_eq!(mask.latent, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn png_colour_types_decode_as_pil_converts_them() {
        let encode = |color: png::ColorType, data: &[u8]| {
            let mut bytes = Vec::new();
            let mut encoder = png::Encoder::new(&mut bytes, 1, 1);
            encoder.set_color(color);
            encoder.set_depth(png::BitDepth::Eight);
            encoder.write_header().unwrap().write_image_data(data).unwrap();
            bytes
        };
        let rgba = Image8::decode_png(&encode(png::ColorType::Rgba, &[10, 20, 30, 0])).unwrap();
        assert_eq!((rgba.channels, rgba.pixels.clone()), (3, vec![10, 20, 30]));
        let grey_alpha = Image8::decode_png(&encode(png::ColorType::GrayscaleAlpha, &[99, 7])).unwrap();
        assert_eq!(grey_alpha.to_rgb().pixels, vec![99, 99, 99]);
        assert!(Image8::decode_png(b"not a png").is_err());
    }
}
