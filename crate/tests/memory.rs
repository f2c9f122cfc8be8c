//! What keeps memory small: VAE decoding in windows, against decoding at once.
mod common;

use burn::tensor::{Distribution, Tensor};

use kiln::pipeline::png::to_rgb8;
use kiln::pipeline::tiles::{TileSize, Tiles};

/// Windows of 16 latents overlapping by 8 on a 32² grid (256² pixels) against one decode, on
/// the random-weight fixture VAE with standard normal latents. Each window normalizes with its
/// own group statistics (as diffusers' tiled VAE does), so the images differ; the blend keeps
/// it to the bound below (measured: mean 7.2/255, PSNR 28.3 dB).
#[test]
fn tiled_vae_decode_stays_close_to_whole() {
    let device = common::wgpu();
    let mut pipes = common::Pipelines::new(&device);
    let vae = &pipes.get("sd1-tiny").vae;
    let f = vae.config.scale_factor();
    let latents = Tensor::<4>::random([1, vae.config.latent_channels, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let to_png = |image: Tensor<4>| to_rgb8(&image.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0).into_data().try_to_vec::<f32>().unwrap(), 32 * f, 32 * f);
    let whole = to_png(vae.decode(latents.clone()));
    let tiles = Tiles::new(TileSize { size: 16, overlap: 8 }, 32, 32, 1).unwrap().expect("several windows");
    let tiled = to_png(tiles.decode(latents, f, |window| vae.decode(window)));
    let (max, mean) = common::pixel_diff(&whole, &tiled);
    let db = common::psnr(&tiled, &whole);
    println!("tiled vs whole: max {max}/255, mean {mean:.2}/255, PSNR {db:.1} dB");
    assert!(db >= 25.0 && mean <= 9.0, "max {max}, mean {mean:.2}, PSNR {db:.1} dB");
}
