//! What keeps memory small: VAE decoding in windows (against decoding at once), weights held
//! on the device as stored, and encoders that hold no device memory between uses.
mod common;

use std::sync::Mutex;

use burn::tensor::{DType, Distribution, Tensor};

use kiln::files::Folder;
use kiln::package::{self, TensorEntry};
use kiln::pipeline::image_processor::Image8;
use kiln::pipeline::img2img::Img2Img;
use kiln::pipeline::png::to_rgb8;
use kiln::pipeline::tiles::{TileSize, Tiles};
use kiln::pipeline::{Request, StableDiffusion};
use kiln::quant::Format;
use kiln::pipeline::family::on_demand;

/// The tests share the device and one counts its bytes in use, so they run one at a time.
static ALONE: Mutex<()> = Mutex::new(());

/// Windows of 16 latents overlapping by 8 on a 32² grid (256² pixels) against one decode, on
/// the random-weight fixture VAE with standard normal latents. Each window normalizes with its
/// own group statistics (as diffusers' tiled VAE does), so the images differ; the blend keeps
/// it to the bound below (measured: mean 7.2/255, PSNR 28.3 dB).
#[test]
fn tiled_vae_decode_stays_close_to_whole() {
    let _alone = ALONE.lock();
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

/// Between uses, the device holds the UNet's and the VAE decoder's weights in their stored
/// form and nothing else: the text encoder and the VAE's encoder are built when used and
/// dropped after. Each weight matrix is its stored bytes (up to the padding of quantized ones
/// to whole `u32` words) and norms and biases are f32, so the expected figures are exact; f16,
/// q8 and q4 are held as stored where the adapter has shader-f16 (lavapipe does).
#[test]
fn devices_hold_the_stored_weights_and_no_encoders_between_uses() {
    let _alone = ALONE.lock();
    let device = common::wgpu();
    let formats = if device.supports_dtype(DType::F16) { Format::ALL.as_slice() } else { &[Format::F32] };
    for &format in formats {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("residency/sd1-tiny-{}", format.name()));
        let _ = std::fs::remove_dir_all(&dir);
        let manifest = package::pack(&Folder(common::fixtures().join("sd1-tiny")), format, &dir).expect("pack");
        let device_bytes = |wanted: bool| -> u64 {
            let on_device = |t: &&TensorEntry| !t.name.ends_with("embedding.weight") && on_demand(&t.file, &t.name) == wanted;
            let bytes = |t: &TensorEntry| if t.shape.len() < 2 { 4 * t.shape[0] } else { t.length };
            manifest.tensors.iter().filter(on_device).map(|t| bytes(t) as u64).sum()
        };
        let (resident, encoders) = (device_bytes(false), device_bytes(true));
        let in_use = || {
            device.sync().unwrap();
            device.memory_cleanup();
            device.memory_pool_usage().expect("wgpu reports its pools").bytes_in_use
        };
        let pipe = StableDiffusion::open(&dir, None, &Default::default(), &device).expect("package loads");
        let loaded = in_use();
        if format == Format::F32 {
            // The fixture's own (f32) folder, loaded as published, is held exactly as its package.
            let published = StableDiffusion::open(&common::fixtures().join("sd1-tiny"), None, &Default::default(), &device).expect("fixture loads");
            let both = in_use();
            assert!((resident..resident + 1024).contains(&(both - loaded)), "as published: {} more, the UNet and decoder {resident}", both - loaded);
            drop(published);
        }
        let req = Request { prompt: "a lighthouse".into(), steps: Some(2), ..Default::default() };
        let text = pipe.start(req.clone()).expect("text to image starts");
        let after_prompt = in_use();
        drop(text);
        let image = Image8 { width: 64, height: 64, channels: 3, pixels: vec![128; 64 * 64 * 3] };
        let img2img = pipe.start_img2img(req, Img2Img { image, resize: Default::default(), strength: 0.5, encode_noise: None }).expect("image to image starts");
        let after_image = in_use();
        drop(img2img);
        let name = format.name();
        println!("{name}: weights resident {resident}, encoders {encoders}; in use: loaded {loaded}, after the prompt {after_prompt}, after the image {after_image}");
        // A few bytes of burn's own may sit beside the weights.
        assert!((resident..resident + 1024).contains(&loaded), "{name}: loaded {loaded}, the UNet and decoder {resident}");
        // What a started generation holds: the text states (2 × 77 × 32, guided) and the
        // latents (4 × 8 × 8), in f32; the encoders that made them are gone.
        let states = (2 * 77 * 32 + 4 * 8 * 8) * 4;
        assert_eq!(after_prompt - loaded, states, "{name}: after the prompt");
        assert_eq!(after_image - loaded, states, "{name}: after the image");
    }
}
