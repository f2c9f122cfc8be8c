//! Overlapping windows for work too large to do at once: the x4 upscaler denoises and decodes
//! window by window, and the VAE decodes large images in windows that fit one GPU binding.
use burn::tensor::{Tensor, TensorData};

use crate::error::{Error, Result};
use crate::model::vae::VaeConfig;

/// Tile size and minimum overlap, in pixels of the grid being tiled (the upscaler's input, the VAE's latents).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileSize {
    pub size: usize,
    pub overlap: usize,
}

/// Overlapping windows over the latent grid, placed evenly with at least the asked overlap and
/// on multiples of the UNet's down-sampling. Each window's result is weighted by a ramp that
/// rises linearly across its inner edges (and stays 1 at the image border), then the weighted
/// sum is divided by the sum of weights, so seams fade over the overlap.
pub struct Tiles {
    /// `(y, x, height, width)` in latent pixels.
    windows: Vec<(usize, usize, usize, usize)>,
    size: TileSize,
    /// Latent `(height, width)`.
    extent: (usize, usize),
}

impl Tiles {
    /// `None` when one window covers the image (the untiled pipeline).
    pub fn new(size: TileSize, width: usize, height: usize, multiple: usize) -> Result<Option<Self>> {
        if size.size == 0 || !size.size.is_multiple_of(multiple) {
            return Err(Error::Invalid(format!("tile size {} is not a positive multiple of {multiple} (the UNet's down-sampling)", size.size)));
        }
        if size.overlap >= size.size {
            return Err(Error::Invalid(format!("tile overlap {} must be smaller than the tile size {}", size.overlap, size.size)));
        }
        if width <= size.size && height <= size.size {
            return Ok(None);
        }
        let rows = starts(height, size, multiple);
        let columns = starts(width, size, multiple);
        let windows = rows
            .iter()
            .flat_map(|&y| columns.iter().map(move |&x| (y, x, size.size.min(height), size.size.min(width))))
            .collect();
        Ok(Some(Self { windows, size, extent: (height, width) }))
    }

    /// Windows for decoding a latent grid of `width` × `height` whose decoder activations
    /// would outgrow one GPU binding of `max_binding` bytes (SD at 512² and above on a device
    /// with WebGPU's guaranteed 128 MiB); `None` when the whole grid fits. Square tiles as
    /// large as fit, on multiples of 8, overlapping by a quarter.
    pub fn for_vae_decode(config: &VaeConfig, width: usize, height: usize, max_binding: u64) -> Option<Self> {
        if decoder_fits(config, width, height, max_binding) {
            return None;
        }
        let per_latent = config.decoder_bytes_per_latent().max(1) as u64;
        let side = (((max_binding / per_latent) as f64).sqrt() as usize / 8 * 8).max(8);
        Self::new(TileSize { size: side, overlap: side / 4 }, width, height, 1).expect("a valid tile size")
    }

    /// Whether the VAE decoder's activations for the largest window fit one binding of
    /// `max_binding` bytes.
    pub fn fit_decoder(&self, config: &VaeConfig, max_binding: u64) -> bool {
        decoder_fits(config, self.size.size.min(self.extent.1), self.size.size.min(self.extent.0), max_binding)
    }

    /// Runs `f` on each window of `input` (`[B, C, H, W]` on the latent grid) and blends the
    /// results (`[B, C', H, W]`).
    pub(super) fn blend(&self, input: Tensor<4>, f: impl Fn(Tensor<4>) -> Tensor<4>) -> Tensor<4> {
        self.combine(1, |(y, x, h, w)| f(input.clone().slice([0..input.dims()[0], 0..input.dims()[1], y..y + h, x..x + w])))
    }

    /// Decodes `latents` window by window with `decode`, which scales each side by `factor`.
    pub fn decode(&self, latents: Tensor<4>, factor: usize, decode: impl Fn(Tensor<4>) -> Tensor<4>) -> Tensor<4> {
        let [b, c, _, _] = latents.dims();
        self.combine(factor, |(y, x, h, w)| decode(latents.clone().slice([0..b, 0..c, y..y + h, x..x + w])))
    }

    /// The weighted blend of `run` over every window, at `scale` × the latent grid.
    fn combine(&self, scale: usize, run: impl Fn((usize, usize, usize, usize)) -> Tensor<4>) -> Tensor<4> {
        let (height, width) = (self.extent.0 * scale, self.extent.1 * scale);
        let ramp = self.size.overlap * scale;
        let mut sum: Option<Tensor<4>> = None;
        let mut total = vec![0.0f32; height * width];
        for &(y, x, h, w) in &self.windows {
            let out = run((y, x, h, w));
            let [b, c, oh, ow] = out.dims();
            debug_assert_eq!((oh, ow), (h * scale, w * scale));
            let (y, x) = (y * scale, x * scale);
            let wy = edge_weights(y, oh, height, ramp);
            let wx = edge_weights(x, ow, width, ramp);
            let weights: Vec<f32> = wy.iter().flat_map(|&a| wx.iter().map(move |&b| a * b)).collect();
            for (i, &v) in weights.iter().enumerate() {
                total[(y + i / ow) * width + x + i % ow] += v;
            }
            let plane = Tensor::<4>::from_data(TensorData::new(weights, [1, 1, oh, ow]), &out.device()).expand([b, c, oh, ow]);
            let acc = sum.take().unwrap_or_else(|| Tensor::zeros([b, c, height, width], &out.device()));
            let region = [0..b, 0..c, y..y + oh, x..x + ow];
            sum = Some(acc.clone().slice_assign(region.clone(), acc.slice(region) + out * plane));
        }
        let sum = sum.expect("at least one window");
        let [b, c, _, _] = sum.dims();
        let total = Tensor::<4>::from_data(TensorData::new(total, [1, 1, height, width]), &sum.device()).expand([b, c, height, width]);
        sum / total
    }
}

/// Window starts along an axis of `length`: as few windows as keep `overlap`, spread evenly,
/// rounded down to multiples of `multiple` (the last ends at the border).
/// Whether the VAE decoder's activations for a `width` × `height` latent grid fit one binding
/// of `max_binding` bytes. In u64: on wasm32 the product of a large image would wrap.
fn decoder_fits(config: &VaeConfig, width: usize, height: usize, max_binding: u64) -> bool {
    config.decoder_bytes_per_latent() as u64 * width as u64 * height as u64 <= max_binding
}

fn starts(length: usize, size: TileSize, multiple: usize) -> Vec<usize> {
    if length <= size.size {
        return vec![0];
    }
    let stride = size.size - size.overlap;
    let count = (length - size.overlap).div_ceil(stride);
    let span = length - size.size;
    (0..count).map(|i| if i + 1 == count { span } else { i * span / (count - 1) / multiple * multiple }).collect()
}

/// A window's weights along one axis: rising linearly over `ramp` pixels at an edge inside the
/// image, 1 elsewhere; never 0, so every pixel has weight.
fn edge_weights(start: usize, len: usize, extent: usize, ramp: usize) -> Vec<f32> {
    let ramp = ramp.min(len / 2);
    (0..len)
        .map(|i| {
            let mut w = 1.0f32;
            if start > 0 && i < ramp {
                w = w.min((i + 1) as f32 / (ramp + 1) as f32);
            }
            if start + len < extent && len - i <= ramp {
                w = w.min((len - i) as f32 / (ramp + 1) as f32);
            }
            w
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_axis_with_the_overlap() {
        let size = TileSize { size: 16, overlap: 4 };
        assert_eq!(starts(16, size, 4), vec![0]);
        assert_eq!(starts(28, size, 4), vec![0, 12]);
        assert_eq!(starts(40, size, 4), vec![0, 12, 24]);
        // Spread evenly, on multiples of 4, the last against the border.
        assert_eq!(starts(30, size, 2), vec![0, 6, 14]);
        assert_eq!(starts(50, TileSize { size: 16, overlap: 8 }, 4), vec![0, 4, 12, 20, 24, 34]);
        for length in 17..80 {
            let s = starts(length, size, 4);
            assert!(s.windows(2).all(|p| p[1] > p[0] && p[0] + size.size >= p[1] + size.overlap.saturating_sub(3)), "{length}: {s:?}");
            assert_eq!(*s.last().unwrap() + size.size, length);
        }
    }

    #[test]
    fn weights_ramp_only_at_inner_edges() {
        assert_eq!(edge_weights(0, 4, 4, 2), vec![1.0; 4]);
        assert_eq!(edge_weights(0, 6, 10, 2), vec![1.0, 1.0, 1.0, 1.0, 2.0 / 3.0, 1.0 / 3.0]);
        assert_eq!(edge_weights(4, 6, 10, 2), vec![1.0 / 3.0, 2.0 / 3.0, 1.0, 1.0, 1.0, 1.0]);
    }
}
