//! The largest GPU buffer a run would make, against the device's binding limit. A size whose
//! buffer cannot fit is refused before anything runs, with the largest size of its aspect
//! ratio that can. (The VAE decoder is left out: it decodes in windows that fit, `tiles.rs`.)
use super::StableDiffusion;
use crate::device;
use crate::error::{Error, Result};

/// How a mode's buffers grow with the size the user chose: the output's, or the x4
/// upscaler's input's.
pub(super) struct Footprint {
    pub width: usize,
    pub height: usize,
    /// Sides must stay multiples of this.
    pub multiple: usize,
    /// Chosen pixels per latent pixel along a side: the VAE's factor, or 1 for the upscaler.
    pub latent_step: usize,
    /// Output pixels per chosen pixel along a side: 1, or the upscaler's 4.
    pub output_scale: usize,
    /// The upscaler's tile side, which bounds the UNet's grid.
    pub tile: Option<usize>,
    /// Whether the VAE encodes an image of the chosen size (image to image, inpainting).
    pub encodes_image: bool,
}

impl StableDiffusion {
    /// Refuses `size` when its largest buffer, with `batch` UNet inputs at once (2 with
    /// guidance), is more than one binding of this device holds.
    pub(super) fn check_buffers(&self, size: &Footprint, batch: usize) -> Result<()> {
        let limit = device::max_binding_bytes(&self.device);
        let (bytes, part) = self.largest_buffer(size, batch, size.width, size.height);
        if bytes <= limit {
            return Ok(());
        }
        let fits = match self.largest_fitting(size, batch, limit) {
            Some((w, h)) => format!("the largest size of this aspect ratio that fits is {w}×{h}"),
            None => "no size of this aspect ratio fits".to_owned(),
        };
        Err(Error::Invalid(format!(
            "{}×{} needs {} in one GPU buffer for {part}, more than this device's maxStorageBufferBindingSize of {}; {fits}",
            size.width,
            size.height,
            mib(bytes),
            mib(limit)
        )))
    }

    /// The largest buffer at `width` × `height` and what makes it.
    fn largest_buffer(&self, size: &Footprint, batch: usize, width: usize, height: usize) -> (u64, &'static str) {
        let (mut grid_w, mut grid_h) = (width / size.latent_step, height / size.latent_step);
        if let Some(tile) = size.tile {
            (grid_w, grid_h) = (grid_w.min(tile), grid_h.min(tile));
        }
        let pixels = width as u64 * height as u64;
        let output = 3 * 4 * pixels * (size.output_scale * size.output_scale) as u64;
        let unet = batch as u64 * self.unet.config.widest_activation_bytes(grid_w, grid_h);
        let encoder = if size.encodes_image { self.vae.config.encoder_bytes_per_pixel() as u64 * pixels } else { 0 };
        [(output, "the image"), (unet, "the UNet's widest activation"), (encoder, "the VAE encoder's first activations")].into_iter().max_by_key(|&(bytes, _)| bytes).expect("three parts")
    }

    /// The largest size that fits, both sides shrunk by one factor and rounded down to the multiple.
    fn largest_fitting(&self, size: &Footprint, batch: usize, limit: u64) -> Option<(usize, usize)> {
        let steps = size.width.max(size.height) / size.multiple;
        (1..steps).rev().map(|k| (size.width * k / steps / size.multiple * size.multiple, size.height * k / steps / size.multiple * size.multiple)).find(|&(w, h)| {
            w > 0 && h > 0 && self.largest_buffer(size, batch, w, h).0 <= limit
        })
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}
