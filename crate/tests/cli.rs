//! The `kiln` binary: a generation through the CLI equals diffusers' image and carries its
//! parameters; bad input fails with a clear message and exit code 2.
mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("kiln runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn fixture(path: &str) -> String {
    common::fixtures().join(path).to_string_lossy().into_owned()
}

/// A failing command exits 2 and says `needle` on stderr.
fn fails_with(args: &[&str], needle: &str) {
    let out = kiln(args);
    assert_eq!(out.status.code(), Some(2), "exit code for {args:?}; stderr: {}", stderr(&out));
    assert!(stderr(&out).contains(needle), "stderr for {args:?} lacks {needle:?}: {}", stderr(&out));
}

#[test]
fn generate_writes_diffusers_image_with_parameters() {
    let cases = common::cases();
    let case = cases
        .iter()
        .find(|c| c.model == "sd1-tiny" && c.scheduler == "euler" && c.negative_prompt.is_some() && c.width == c.height)
        .expect("an sd1 euler case with a negative prompt");
    let negative = case.negative_prompt.as_deref().unwrap();
    let out_path = temp_dir("gen").join("out.png");
    let (steps, guidance) = (case.steps.to_string(), case.guidance.to_string());
    let latents = fixture(&format!("images/{}", case.latents));
    let model = fixture(&case.model);
    let out = kiln(&[
        "generate", "--model", &model, "--prompt", &case.prompt, "--negative-prompt", negative, "--steps", &steps,
        "--guidance", &guidance, "--scheduler", "euler", "--latents", &latents, "--out", out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "kiln failed: {}", stderr(&out));
    assert!(stderr(&out).contains(&format!("step {steps}/{steps}")), "progress on stderr: {}", stderr(&out));
    let bytes = std::fs::read(&out_path).expect("PNG written");
    let (ours, w, h) = common::read_png(&bytes);
    let (theirs, _, _) = common::read_png(&std::fs::read(common::fixtures().join("images").join(&case.image)).expect("reference"));
    assert_eq!((w, h), (case.width, case.height));
    let (max, mean) = common::pixel_diff(&ours, &theirs);
    assert!(max <= 3 && mean <= 0.5, "max {max}, mean {mean}");

    let expected = format!(
        "{}\nNegative prompt: {negative}\nSteps: {steps}, Sampler: Euler, CFG scale: {guidance}, Size: {}x{}, Model: sd1-tiny",
        case.prompt, case.width, case.height
    );
    assert_eq!(png_texts(&bytes), vec![("parameters".to_string(), expected)]);
}

/// The PNG's text chunks as (keyword, text).
fn png_texts(bytes: &[u8]) -> Vec<(String, String)> {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().expect("PNG");
    let info = reader.info();
    info.uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .chain(info.utf8_text.iter().map(|t| (t.keyword.clone(), t.get_text().unwrap())))
        .collect()
}

/// Runs a successful command writing `out`; returns the image's pixels, size and parameters text.
fn succeeds(args: &[&str], out: &std::path::Path, last_step: &str) -> (Vec<u8>, usize, usize, String) {
    let result = kiln(args);
    assert!(result.status.success(), "kiln {args:?} failed: {}", stderr(&result));
    assert!(stderr(&result).contains(last_step), "progress on stderr: {}", stderr(&result));
    let bytes = std::fs::read(out).expect("PNG written");
    let (pixels, w, h) = common::read_png(&bytes);
    let mut texts = png_texts(&bytes);
    assert_eq!(texts.len(), 1, "one parameters chunk");
    let (keyword, text) = texts.pop().unwrap();
    assert_eq!(keyword, "parameters");
    (pixels, w, h, text)
}

#[test]
fn img2img_writes_image_with_parameters() {
    let out = temp_dir("img2img").join("out.png");
    let (model, init, out_str) = (fixture("sd1-tiny"), fixture("editing/init.png"), out.to_str().unwrap());
    let with_seed = |seed: &str| {
        let args = ["img2img", "--model", &model, "--prompt", "a hill", "--init-image", &init, "--strength", "0.5", "--steps", "4"];
        succeeds(&[&args[..], &["--scheduler", "euler", "--seed", seed, "--out", out_str]].concat(), &out, "step 2/2")
    };
    let (first, w, h, text) = with_seed("7");
    assert_eq!((w, h), (64, 64));
    assert_eq!(text, "a hill\nSteps: 4, Sampler: Euler, CFG scale: 7.5, Seed: 7, Size: 64x64, Model: sd1-tiny, Denoising strength: 0.5");
    assert_eq!(with_seed("7").0, first, "a seed gives the same image");
    // One step at strength 0.5 would run none (SD-Turbo's default): 2 run, and the user is told.
    let args = ["img2img", "--model", &model, "--prompt", "a hill", "--init-image", &init, "--strength", "0.5", "--steps", "1", "--out", out_str];
    let result = kiln(&args);
    assert!(stderr(&result).contains("warning: 1 steps × strength 0.5 would run none, so 2 steps are used"), "{}", stderr(&result));
    assert!(png_texts(&std::fs::read(&out).unwrap())[0].1.contains("Steps: 2,"), "the PNG says what ran");
    let (second, ..) = with_seed("8");
    assert_ne!(second, first, "another seed gives another image");

    // A batch: seeds 7 and 8 into batch-1.png and batch-2.png, the same images as one by one.
    let batch = out.with_file_name("batch.png");
    let args = ["img2img", "--model", &model, "--prompt", "a hill", "--init-image", &init, "--strength", "0.5", "--steps", "4", "--scheduler", "euler"];
    let result = kiln(&[&args[..], &["--seed", "7", "--count", "2", "--out", batch.to_str().unwrap()]].concat());
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(!batch.exists(), "numbered files only");
    for (n, (expected, seed)) in [(&first, "7"), (&second, "8")].into_iter().enumerate() {
        let bytes = std::fs::read(out.with_file_name(format!("batch-{}.png", n + 1))).expect("numbered PNG");
        assert_eq!(&common::read_png(&bytes).0, expected, "image {} of the batch", n + 1);
        assert!(png_texts(&bytes)[0].1.contains(&format!("Seed: {seed},")), "its own seed");
    }
}

#[test]
fn inpaint_writes_image_with_parameters() {
    let out = temp_dir("inpaint").join("out.png");
    let (model, init, mask, out_str) = (fixture("sd1-inpaint-tiny"), fixture("editing/init.png"), fixture("editing/mask.png"), out.to_str().unwrap());
    let (_, w, h, text) = succeeds(
        &["inpaint", "--model", &model, "--prompt", "a door", "--init-image", &init, "--mask", &mask, "--mask-blur", "2", "--steps", "3", "--seed", "1", "--out", out_str],
        &out,
        "step 4/4",
    );
    assert_eq!((w, h), (64, 64));
    assert_eq!(text, "a door\nSteps: 3, Sampler: PLMS, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: sd1-inpaint-tiny, Denoising strength: 1, Mask blur: 2");
    // A plain checkpoint inpaints by blending, from part-way with strength below 1.
    let (_, _, _, text) = succeeds(
        &["inpaint", "--model", &fixture("sd1-tiny"), "--prompt", "a door", "--init-image", &init, "--mask", &mask, "--strength", "0.5", "--steps", "4", "--scheduler", "ddim", "--seed", "1", "--out", out_str],
        &out,
        "step 2/2",
    );
    assert!(text.ends_with("Model: sd1-tiny, Denoising strength: 0.5, Mask blur: 0"), "{text}");
}

#[test]
fn upscale_writes_four_times_the_size() {
    let out = temp_dir("upscale").join("out.png");
    let (model, image, out_str) = (fixture("sd-x4-upscaler-tiny"), fixture("editing/low_res.png"), out.to_str().unwrap());
    let (_, w, h, text) = succeeds(&["upscale", "--model", &model, "--prompt", "", "--image", &image, "--steps", "2", "--seed", "3", "--out", out_str], &out, "step 2/2");
    assert_eq!((w, h), (128, 128));
    assert_eq!(text, "\nSteps: 2, Sampler: DDIM, CFG scale: 9, Seed: 3, Size: 128x128, Model: sd-x4-upscaler-tiny, Noise level: 20");
    let (_, w, _, text) = succeeds(
        &["upscale", "--model", &model, "--prompt", "", "--image", &image, "--steps", "1", "--tile", "16", "--tile-overlap", "8", "--out", out_str],
        &out,
        "step 1/1",
    );
    assert_eq!(w, 128);
    assert!(text.ends_with("Noise level: 20, Tile size: 16, Tile overlap: 8"), "{text}");
}

/// The latent x2 upscaler from the same command; its settings are its folder's, so the x4's
/// noise level and a scheduler are refused, and sizes follow its UNet.
#[test]
fn latent_upscale_writes_twice_the_size() {
    let dir = temp_dir("latent-upscale");
    let out = dir.join("out.png");
    let (model, image, out_str) = (fixture("sd-x2-latent-upscaler-tiny"), fixture("editing/init.png"), out.to_str().unwrap());
    let base = ["upscale", "--model", &model, "--prompt", "a house", "--image", &image, "--out", out_str];
    let upscale = |extra: &[&str], needle: &str| fails_with(&[&base[..], extra].concat(), needle);
    let (_, w, h, text) = succeeds(&[&base[..], &["--steps", "2", "--seed", "3"]].concat(), &out, "step 2/2");
    assert_eq!((w, h), (128, 128));
    assert_eq!(text, "a house\nSteps: 2, Sampler: Euler, CFG scale: 9, Seed: 3, Size: 128x128, Model: sd-x2-latent-upscaler-tiny");
    upscale(&["--noise-level", "20"], "a noise level does not apply");
    upscale(&["--scheduler", "ddim"], "its own scheduler config (euler): another scheduler does not apply");
    let (_, w, _, _) = succeeds(&[&base[..], &["--steps", "1", "--scheduler", "euler"]].concat(), &out, "step 1/1");
    assert_eq!(w, 128, "its own scheduler, named");
    upscale(&["--latents", &fixture("editing/img2img-ddim-0.8.latents.npy")], "initial latents have shape [1, 4, 8, 8]; this image needs [1, 4, 16, 16]");
    let small = dir.join("small.png");
    std::fs::write(&small, kiln::pipeline::png::encode(&vec![90; 12 * 24 * 3], 12, 24, "").unwrap()).unwrap();
    let small = [&["upscale", "--model", &model, "--prompt", "x", "--image", small.to_str().unwrap(), "--out", out_str][..]].concat();
    fails_with(&small, "the image's width 12 is not a multiple of 8 of at least 16");
}

/// A result's latents, written by --save-latents, stand for its pixels in the latent upscaler:
/// given diffusers' text-to-image latents and noise it makes diffusers' image.
#[test]
fn results_upscale_from_their_latents() {
    let dir = temp_dir("save-latents");
    let (png, latents) = (dir.join("a.png"), dir.join("a.npy"));
    let sd1 = fixture("sd1-tiny");
    let args = ["generate", "--model", &sd1, "--prompt", "x", "--steps", "1", "--seed", "2", "--out", png.to_str().unwrap(), "--save-latents", latents.to_str().unwrap()];
    succeeds(&args, &png, "step 1/1");
    assert_eq!(kiln::npy::read(&latents).expect("latents written").shape, [1, 4, 8, 8]);

    let case = |file: &str| fixture(&format!("latent-upscale/latent-x2-txt2img-guidance0.{file}"));
    let out = dir.join("up.png");
    let prompt = "a small house on a green hill under an evening sky";
    let (image_latents, noise) = (case("image_latents.npy"), case("latents.npy"));
    let upscale = ["upscale", "--model", &fixture("sd-x2-latent-upscaler-tiny"), "--prompt", prompt, "--image", &fixture("editing/init.png"), "--image-latents", &image_latents, "--latents", &noise, "--steps", "3", "--guidance", "0", "--out", out.to_str().unwrap()];
    let (pixels, w, h, _) = succeeds(&upscale, &out, "step 3/3");
    let (reference, ..) = common::read_png(&std::fs::read(case("png")).expect("reference"));
    let (max, mean) = common::pixel_diff(&pixels, &reference);
    assert!((w, h) == (128, 128) && max <= 3 && mean <= 0.5, "{w}x{h}: max {max}/255, mean {mean}/255");
}

#[test]
fn bad_edit_inputs_are_refused() {
    let dir = temp_dir("edit-errors");
    let out = dir.join("x.png");
    let out = out.to_str().unwrap();
    let (sd1, inpainting, upscaler) = (fixture("sd1-tiny"), fixture("sd1-inpaint-tiny"), fixture("sd-x4-upscaler-tiny"));
    let (init, mask, low_res) = (fixture("editing/init.png"), fixture("editing/mask.png"), fixture("editing/low_res.png"));
    let img2img = |model: &str, extra: &[&str], needle: &str| {
        fails_with(&[&["img2img", "--model", model, "--prompt", "x", "--init-image", &init, "--out", out][..], extra].concat(), needle)
    };
    img2img(&sd1, &["--strength", "0"], "strength 0 is outside (0, 1]");
    img2img(&sd1, &["--strength", "1.5"], "strength 1.5 is outside (0, 1]");
    img2img(&upscaler, &[], "use `kiln upscale`");
    img2img(&fixture("sd-x2-latent-upscaler-tiny"), &[], "the Stable Diffusion x2 latent upscaler (its UNet takes an image's latents): use `kiln upscale`");
    img2img(&inpainting, &[], "use `kiln inpaint`");
    fails_with(&["generate", "--model", &inpainting, "--prompt", "x", "--out", out], "use `kiln inpaint`");
    // sd1-tiny takes multiples of 32 (VAE factor 8 × UNet down-sampling 4): a size asked for
    // must be one; an image of another size is fitted (see `odd_sized_images_are_fitted`).
    img2img(&sd1, &["--width", "48"], "width 48 is not a positive multiple of 32");
    img2img(&sd1, &["--resize-mode", "stretch"], "resize mode \"stretch\" is not one of just, crop, fill");
    let not_png = dir.join("not.png");
    std::fs::write(&not_png, b"hello").unwrap();
    fails_with(&["img2img", "--model", &sd1, "--prompt", "x", "--init-image", not_png.to_str().unwrap(), "--out", out], "not a readable PNG");
    fails_with(&["img2img", "--model", &sd1, "--prompt", "x", "--init-image", "/nonexistent.png", "--out", out], "cannot read /nonexistent.png");

    let inpaint = |extra: &[&str], needle: &str| {
        fails_with(&[&["inpaint", "--model", &inpainting, "--prompt", "x", "--init-image", &init, "--out", out][..], extra].concat(), needle)
    };
    inpaint(&["--mask", &low_res], "the mask is 32x32 but the image is 64x64");
    inpaint(&["--mask", &mask, "--mask-blur=-1"], "mask blur -1 must be between 0 and 64 pixels");
    inpaint(&["--mask", &mask, "--mask-blur=1e9"], "mask blur 1000000000 must be between 0 and 64 pixels");
    inpaint(&["--mask", &mask, "--strength", "2"], "strength 2 is outside (0, 1]");

    let upscale = |model: &str, extra: &[&str], needle: &str| {
        fails_with(&[&["upscale", "--model", model, "--prompt", "x", "--image", &low_res, "--out", out][..], extra].concat(), needle)
    };
    upscale(&sd1, &[], "not an upscaler");
    upscale(&upscaler, &["--noise-level", "351"], "noise level 351 is above the model's maximum 350");
    upscale(&upscaler, &["--tile", "10"], "tile size 10 is not a positive multiple of 4");
    upscale(&upscaler, &["--tile", "16", "--tile-overlap", "16"], "tile overlap 16 must be smaller than the tile size 16");
}

/// A photo of a size the model does not take is fitted as A1111 fits it, and the user is told:
/// to its own size rounded (48×80 → 64×96), or to the size asked for.
#[test]
fn odd_sized_images_are_fitted() {
    let dir = temp_dir("fit");
    let odd = dir.join("odd.png");
    let pixels: Vec<u8> = (0..48 * 80 * 3).map(|i| (i % 251) as u8).collect();
    std::fs::write(&odd, kiln::pipeline::png::encode(&pixels, 48, 80, "").unwrap()).unwrap();
    let out = dir.join("out.png");
    let (model, odd, out_str) = (fixture("sd1-tiny"), odd.to_str().unwrap(), out.to_str().unwrap());
    for (extra, size, note) in [
        (&[][..], (64, 96), "the init image (48×80) was resized to 64×96 (Just resize)"),
        (&["--width", "64", "--height", "64", "--resize-mode", "crop"][..], (64, 64), "the init image (48×80) was resized to 64×64 (Crop and resize)"),
        (&["--width", "64", "--height", "64", "--resize-mode", "fill"][..], (64, 64), "the init image (48×80) was resized to 64×64 (Resize and fill)"),
    ] {
        let args = [&["img2img", "--model", &model, "--prompt", "x", "--init-image", odd, "--steps", "2", "--seed", "1", "--out", out_str][..], extra].concat();
        let result = kiln(&args);
        assert!(stderr(&result).contains(&format!("warning: {note}")), "{args:?}: {}", stderr(&result));
        let (_, w, h) = common::read_png(&std::fs::read(&out).expect("PNG written"));
        assert_eq!((w, h), size, "{args:?}");
    }
}

#[test]
fn bad_sizes_are_refused() {
    let out = temp_dir("size").join("x.png");
    let out = out.to_str().unwrap();
    fails_with(&["generate", "--model", &fixture("sd1-tiny"), "--prompt", "x", "--width", "100", "--out", out], "width 100 is not a positive multiple of 32");
    fails_with(&["generate", "--model", &fixture("sd1-tiny"), "--prompt", "x", "--height", "72", "--out", out], "height 72");
    fails_with(&["generate", "--model", &fixture("sd1-tiny"), "--prompt", "a (cat:1.2.3)", "--out", out], "the emphasis weight \"1.2.3\" in \":1.2.3)\" is not a number");
    let latents = fixture("editing/img2img-ddim-0.8.latents.npy");
    fails_with(&["generate", "--model", &fixture("sd1-tiny"), "--prompt", "x", "--count", "2", "--latents", &latents, "--out", out], "needs seeds, not --latents");
    // A size whose largest buffer would not fit one binding is refused before anything runs,
    // here on an adapter with WebGPU's guaranteed 128 MiB.
    let big = kiln_capped(128 << 10, &["generate", "--model", &fixture("sd1-tiny"), "--prompt", "x", "--width", "4096", "--height", "4096", "--out", out]);
    assert_eq!(big.status.code(), Some(2), "{}", stderr(&big));
    assert!(
        stderr(&big).contains(
            "4096×4096 needs 256.0 MiB in one GPU buffer for the UNet's widest activation, more than this device's maxStorageBufferBindingSize of 128.0 MiB; the largest size of this aspect ratio that fits is 2880×2880"
        ),
        "{}",
        stderr(&big)
    );
}

/// `kiln` on the default adapter with its buffer limits capped at `kib` KiB, as a small GPU.
fn kiln_capped(kib: u64, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).env("KILN_TEST_MAX_BINDING_KIB", kib.to_string()).args(args).output().expect("kiln runs")
}

/// A `width` × `height` RGB PNG with a deterministic pattern.
fn write_pattern(path: &std::path::Path, width: u32, height: u32) {
    let pixels: Vec<u8> = (0..height).flat_map(|y| (0..width).flat_map(move |x| [(x * 7 + y * 3) as u8, (x * y) as u8, (x + 5 * y) as u8])).collect();
    let mut encoder = png::Encoder::new(std::fs::File::create(path).expect("create PNG"), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.write_header().and_then(|mut w| w.write_image_data(&pixels)).expect("write PNG");
}

/// On a device whose bindings hold 8 MiB (the smallest cubecl's 8 MiB memory pages run on), a
/// size that cannot fit is refused before any step with the size that can, and that size runs:
/// the VAE decodes in windows that fit, where the upscaler's own 128-pixel tiles would not.
#[test]
fn small_devices_decode_in_windows_or_refuse_before_starting() {
    let dir = temp_dir("small-device");
    let (model, out) = (fixture("sd-x4-upscaler-tiny"), dir.join("out.png"));
    let refused = kiln_capped(8 << 10, &["generate", "--model", &fixture("sd1-tiny"), "--prompt", "x", "--width", "1024", "--height", "1024", "--out", out.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("1024×1024 needs 16.0 MiB in one GPU buffer for the UNet's widest activation, more than this device's maxStorageBufferBindingSize of 8.0 MiB; the largest size of this aspect ratio that fits is 704×704"),
        "{}",
        stderr(&refused)
    );
    let (large, fits) = (dir.join("256.png"), dir.join("208.png"));
    write_pattern(&large, 256, 256);
    write_pattern(&fits, 208, 208);
    let (large, fits, out_str) = (large.to_str().unwrap(), fits.to_str().unwrap(), out.to_str().unwrap());
    let upscale = |image| ["upscale", "--model", &model, "--prompt", "x", "--image", image, "--steps", "1", "--seed", "5", "--out", out_str];

    let refused = kiln_capped(8 << 10, &upscale(large));
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("256×256 needs 12.0 MiB in one GPU buffer for the image, more than this device's maxStorageBufferBindingSize of 8.0 MiB; the largest size of this aspect ratio that fits is 208×208"),
        "{}",
        stderr(&refused)
    );
    assert!(!stderr(&refused).contains("step") && !out.exists(), "nothing ran: {}", stderr(&refused));

    let capped = kiln_capped(8 << 10, &upscale(fits));
    assert!(capped.status.success(), "{}", stderr(&capped));
    let (windowed, w, h) = common::read_png(&std::fs::read(&out).expect("PNG written"));
    assert_eq!((w, h), (832, 832));
    let (whole, ..) = succeeds(&upscale(fits), &out, "step 1/1");
    // The same denoised latents decoded in 88-latent windows instead of the 128-pixel tiles:
    // only the blends at the windows' seams differ.
    let (max, mean) = common::pixel_diff(&windowed, &whole);
    assert!(max <= 16 && mean <= 1.0, "max {max}, mean {mean}");
}

#[test]
fn unknown_scheduler_lists_the_valid_ones() {
    let out = temp_dir("sched").join("x.png");
    fails_with(
        &["generate", "--model", &fixture("sd1-tiny"), "--prompt", "x", "--scheduler", "heun", "--out", out.to_str().unwrap()],
        "dpmpp-2m-karras",
    );
}

#[test]
fn unreadable_inputs_are_reported() {
    let dir = temp_dir("bad");
    let out = dir.join("x.png");
    let out = out.to_str().unwrap();
    fails_with(&["generate", "--model", "/nonexistent/model", "--prompt", "x", "--out", out], "model_index.json is missing");

    // A pipeline folder whose UNet weights are truncated.
    let broken = dir.join("broken");
    copy_dir(&common::fixtures().join("sd1-tiny"), &broken);
    let unet = broken.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&["generate", "--model", broken.to_str().unwrap(), "--prompt", "x", "--out", out], "not a valid safetensors file");

    let latents = dir.join("bad.npy");
    std::fs::write(&latents, b"not numpy").unwrap();
    fails_with(&["generate", "--model", &fixture("sd1-tiny"), "--prompt", "x", "--latents", latents.to_str().unwrap(), "--out", out], "not a .npy file");
}

/// NaN or Inf anywhere (given latents, any component's weights) fails the run with a message
/// that says where, and no picture is written; an unwritable `--out` fails before any work.
#[test]
fn non_finite_values_are_reported_not_drawn() {
    let dir = temp_dir("non-finite");
    let out = dir.join("x.png");
    let out_arg = out.to_str().unwrap();
    let generate = |model: &str, extra: &[&str], needle: &str| {
        fails_with(&[&["generate", "--model", model, "--prompt", "x", "--steps", "1", "--out", out_arg][..], extra].concat(), needle);
        assert!(!out.exists(), "no image is written when {needle:?}");
        assert!(!dir.join(".x.png.partial").exists(), "no partial file is left");
    };
    let latents = dir.join("nan.npy");
    let mut values = vec![0.5f32; 4 * 4 * 4];
    values[7] = f32::NAN;
    kiln::npy::write(&latents, &kiln::npy::Array { shape: vec![1, 4, 4, 4], values }).unwrap();
    generate(&fixture("sd1-tiny"), &["--latents", latents.to_str().unwrap()], "non-finite values (NaN or Inf) in the given initial latents");

    for (file, tensor, needle) in [
        ("text_encoder/model.safetensors", "text_model.final_layer_norm.bias", "in the text encoder's output"),
        ("unet/diffusion_pytorch_model.safetensors", "conv_out.bias", "in the latents after UNet step 1/1"),
        ("vae/diffusion_pytorch_model.safetensors", "decoder.conv_out.bias", "in the VAE's decoded image"),
    ] {
        let model = dir.join(format!("poisoned-{}", tensor.replace('.', "-")));
        copy_dir(&common::fixtures().join("sd1-tiny"), &model);
        poison(&model.join(file), tensor);
        generate(model.to_str().unwrap(), &[], needle);
    }

    let missing = dir.join("no/such/dir/x.png");
    let args = ["generate", "--model", &fixture("sd1-tiny"), "--prompt", "x", "--out", missing.to_str().unwrap()];
    fails_with(&args, "cannot write");
    assert!(!stderr(&kiln(&args)).contains("loaded"), "a bad --out is refused before the model loads");
}

/// Sets the first value of the f32 tensor `name` in a safetensors file to NaN.
fn poison(file: &std::path::Path, name: &str) {
    let mut bytes = std::fs::read(file).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    let offset = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
    bytes[offset..offset + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(file, bytes).unwrap();
}

/// `kiln info` prints a PNG's parameters; `--json` gives one object with every field as written.
#[test]
fn info_reads_a1111_parameters() {
    let dir = temp_dir("info");
    let file = dir.join("a1111.png");
    let text = "a castle, (detailed:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, \
                Model hash: abc123, Denoising strength: 0.75, Lora hashes: \"detail: 0a1b, style: 2c3d\"";
    std::fs::write(&file, kiln::pipeline::png::encode(&[0; 3], 1, 1, text).unwrap()).unwrap();
    let out = kiln(&["info", file.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let expected = serde_json::json!({
        "prompt": "a castle, (detailed:1.2)", "negative_prompt": "blurry", "Steps": "20", "Sampler": "DPM++ 2M Karras",
        "CFG scale": "7", "Seed": "1234", "Size": "512x768", "Model hash": "abc123", "Denoising strength": "0.75",
        "Lora hashes": "detail: 0a1b, style: 2c3d",
    });
    assert_eq!(json, expected);
    let plain = kiln(&["info", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&plain.stdout).contains("Sampler: DPM++ 2M Karras\n"));

    fails_with(&["info", &fixture("editing/init.png"), "--json"], "no `parameters` text");
    fails_with(&["info", dir.join("missing.png").to_str().unwrap()], "cannot read");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Serves `root` over HTTP on a free local port (one request per connection, 404 for what is
/// missing; a file `P.fault` holding `truncate` or `stall` makes `P` fail so); returns the
/// base URL and the count of requests so far.
fn serve(root: PathBuf) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut reader = BufReader::new(stream);
            let mut request = String::new();
            reader.read_line(&mut request).ok();
            for line in reader.by_ref().lines() {
                if line.map_or(true, |l| l.is_empty()) {
                    break;
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_owned();
            let mut stream = reader.into_inner();
            let fault = std::fs::read_to_string(root.join(format!("{path}.fault"))).unwrap_or_default();
            let response = match std::fs::read(root.join(&path)) {
                // Half the file and a closed connection, with no length to tell it is short.
                Ok(body) if fault == "truncate" => [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec(), body[..body.len() / 2].to_vec()].concat(),
                // Half the file, then silence on an open connection.
                Ok(body) if fault == "stall" => {
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
                    stream.write_all(&[head, body[..body.len() / 2].to_vec()].concat()).ok();
                    std::thread::spawn(move || {
                        std::thread::sleep(std::time::Duration::from_secs(60));
                        drop(stream);
                    });
                    continue;
                }
                Ok(body) => [format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes(), body].concat(),
                Err(_) => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            };
            stream.write_all(&response).ok();
        }
    });
    (url, requests)
}

/// `kiln pack` writes a package that `generate` takes as a folder or by URL (fetched into the
/// cache, shards verified); a shard whose hash is wrong is refused and never cached.
#[test]
fn packages_generate_from_a_folder_and_a_url() {
    let dir = temp_dir("pack");
    let package = dir.join("sd1-q8");
    let _ = std::fs::remove_dir_all(&package);
    let pack = kiln(&["pack", "--model", &fixture("sd1-tiny"), "--out", package.to_str().unwrap(), "--format", "q8"]);
    assert!(pack.status.success(), "{}", stderr(&pack));
    assert!(stderr(&pack).contains("as q8"), "{}", stderr(&pack));
    fails_with(&["pack", "--model", &fixture("sd1-tiny"), "--out", package.to_str().unwrap(), "--format", "q3"], "unknown weight format `q3`");

    let generate = |model: &str, out: &str, cache: &std::path::Path| {
        let args = ["generate", "--model", model, "--prompt", "a kiln", "--steps", "2", "--seed", "5", "--out", out];
        Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("XDG_CACHE_HOME", cache).output().expect("kiln runs")
    };
    let from_folder = dir.join("folder.png");
    let out = generate(package.to_str().unwrap(), from_folder.to_str().unwrap(), &dir);
    assert!(out.status.success(), "{}", stderr(&out));

    let url = format!("{}/sd1-q8", serve(dir.clone()).0);
    let cache = dir.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let from_url = dir.join("url.png");
    let out = generate(&url, from_url.to_str().unwrap(), &cache);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(common::read_png(&std::fs::read(&from_url).unwrap()).0, common::read_png(&std::fs::read(&from_folder).unwrap()).0);
    assert!(png_texts(&std::fs::read(&from_url).unwrap())[0].1.ends_with("Model: sd1-tiny"));

    // Served damaged: refused, and nothing of it cached.
    let shard = package.join("shard-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let _ = std::fs::remove_dir_all(&cache);
    let out = generate(&url, from_url.to_str().unwrap(), &cache);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("shard-00000.bin: SHA-256"), "{}", stderr(&out));
    let cached: Vec<_> = walk(&cache).into_iter().filter(|p| p.to_string_lossy().contains("shard")).collect();
    assert!(cached.is_empty(), "damaged shard cached: {cached:?}");
}

/// A diffusers repo by URL: an error page where a config should be, a weight file cut short
/// and a stalled host are refused and not cached; once every file is cached, later runs ask
/// the host nothing.
#[test]
fn repos_by_url_are_checked_and_fetched_once() {
    let dir = temp_dir("repo-url");
    let served = dir.join("served/sd1-tiny");
    let _ = std::fs::remove_dir_all(dir.join("served"));
    copy_dir(&common::fixtures().join("sd1-tiny"), &served);
    let (url, requests) = serve(dir.join("served"));
    let url = format!("{url}/sd1-tiny");
    let cache = dir.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let out = dir.join("x.png");
    let run = || {
        let args = ["generate", "--model", &url, "--prompt", "x", "--steps", "1", "--out", out.to_str().unwrap()];
        Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("XDG_CACHE_HOME", &cache).output().expect("kiln runs")
    };
    // A pipeline Kiln does not run is refused from its model_index.json, before any weight.
    let index = served.join("model_index.json");
    let published = std::fs::read(&index).unwrap();
    std::fs::write(&index, r#"{"_class_name": "StableCascadeDecoderPipeline"}"#).unwrap();
    let refused = run();
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("pipeline class StableCascadeDecoderPipeline is not one Kiln runs (StableDiffusionPipeline, "), "{}", stderr(&refused));
    assert!(!walk(&cache).iter().any(|p| p.to_string_lossy().ends_with(".safetensors")), "weights were fetched");
    std::fs::write(&index, published).unwrap();
    std::fs::remove_dir_all(&cache).unwrap();

    std::fs::write(served.join("unet/config.json"), "<html>busy</html>").unwrap();
    let failed = run();
    assert_eq!(failed.status.code(), Some(2));
    assert!(stderr(&failed).contains("unet/config.json: not JSON"), "{}", stderr(&failed));
    assert!(!walk(&cache).iter().any(|p| p.ends_with("unet/config.json")), "the error page was cached");

    std::fs::copy(common::fixtures().join("sd1-tiny/unet/config.json"), served.join("unet/config.json")).unwrap();

    // A weight file cut short without a length, then one that stalls: refused, named, not kept.
    let weights = "unet/diffusion_pytorch_model.safetensors";
    let fault = served.join(format!("{weights}.fault"));
    for (kind, needle) in [("truncate", "the host cut it short"), ("stall", "the host sent nothing for 1 s")] {
        std::fs::write(&fault, kind).unwrap();
        let failed = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["generate", "--model", &url, "--prompt", "x", "--steps", "1", "--out", out.to_str().unwrap()])
            .env("XDG_CACHE_HOME", &cache)
            .env("KILN_STALL_SECONDS", "1")
            .output()
            .expect("kiln runs");
        assert_eq!(failed.status.code(), Some(2), "{kind}: {}", stderr(&failed));
        assert!(stderr(&failed).contains(weights) && stderr(&failed).contains(needle), "{kind}: {}", stderr(&failed));
        assert!(!walk(&cache).iter().any(|p| p.ends_with(weights)), "{kind}: the partial weights were cached");
    }
    std::fs::remove_file(&fault).unwrap();
    assert!(run().status.success());
    let asked = requests.load(std::sync::atomic::Ordering::SeqCst);
    let again = run();
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), asked, "a cached model asked the host again");
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map_or(Vec::new(), |entries| {
        entries.flatten().flat_map(|e| if e.path().is_dir() { walk(&e.path()) } else { vec![e.path()] }).collect()
    })
}

/// `--lora FILE_OR_URL:WEIGHT` gives diffusers' fused image; the PNG's prompt records it as
/// Automatic1111 does; by URL the file is fetched once (a cut one is not kept); a prompt naming
/// a LoRA not given, and a file that is no LoRA, are refused.
#[test]
fn loras_from_a_file_and_a_url() {
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::fixtures().join("lora/cases.json")).unwrap()).unwrap();
    let case = cases.as_array().unwrap().iter().find(|c| c["name"] == "sd1-kohya-0.8").expect("the kohya case");
    let (str_of, num_of) = (|k: &str| case[k].as_str().unwrap().to_owned(), |k: &str| case[k].to_string());
    let dir = temp_dir("lora");
    let out = dir.join("lora.png");
    let lora = fixture("lora/sd1-kohya.safetensors");
    let (latents, model) = (fixture(&format!("lora/{}", str_of("latents"))), fixture(&str_of("model")));
    let (prompt, negative, scheduler, steps, guidance) = (str_of("prompt"), str_of("negative_prompt"), str_of("scheduler"), num_of("steps"), num_of("guidance"));
    let args = |lora_arg: &str, prompt: &str, out: &str, cache: &std::path::Path| {
        let args = [
            "generate",
            "--model",
            &model,
            "--prompt",
            prompt,
            "--negative-prompt",
            &negative,
            "--steps",
            &steps,
            "--guidance",
            &guidance,
            "--scheduler",
            &scheduler,
            "--latents",
            &latents,
            "--out",
            out,
            "--lora",
            lora_arg,
        ];
        Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("XDG_CACHE_HOME", cache).output().expect("kiln runs")
    };
    let result = args(&format!("{lora}:0.8"), &prompt, out.to_str().unwrap(), &dir);
    assert!(result.status.success(), "{}", stderr(&result));
    let bytes = std::fs::read(&out).unwrap();
    let theirs = common::read_png(&std::fs::read(common::fixtures().join("lora").join(str_of("image"))).unwrap()).0;
    let (max, mean) = common::pixel_diff(&common::read_png(&bytes).0, &theirs);
    assert!(max <= 3 && mean <= 0.5, "max {max}, mean {mean}");
    assert!(png_texts(&bytes)[0].1.starts_with(&format!("{prompt} <lora:sd1-kohya:0.8>\n")), "{:?}", png_texts(&bytes));

    let served = dir.join("served");
    let _ = std::fs::remove_dir_all(&served);
    std::fs::create_dir_all(&served).unwrap();
    std::fs::copy(&lora, served.join("sd1-kohya.safetensors")).unwrap();
    let (url, requests) = serve(served.clone());
    let cache = dir.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let by_url = format!("{url}/sd1-kohya.safetensors:0.8");
    std::fs::write(served.join("sd1-kohya.safetensors.fault"), "truncate").unwrap();
    let cut = args(&by_url, &prompt, dir.join("cut.png").to_str().unwrap(), &cache);
    assert_eq!(cut.status.code(), Some(2), "{}", stderr(&cut));
    assert!(stderr(&cut).contains("not a complete safetensors file"), "{}", stderr(&cut));
    std::fs::remove_file(served.join("sd1-kohya.safetensors.fault")).unwrap();
    // The tag in the prompt is the one the PNG would carry.
    let tagged = format!("{prompt} <lora:sd1-kohya:0.8>");
    for run in ["first", "second"] {
        let out = dir.join(format!("{run}.png"));
        let result = args(&by_url, &tagged, out.to_str().unwrap(), &cache);
        assert!(result.status.success(), "{}", stderr(&result));
        assert_eq!(common::read_png(&std::fs::read(&out).unwrap()).0, common::read_png(&bytes).0, "{run} run by URL");
    }
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 2, "the cut download and one whole one");

    let other = args(&format!("{lora}:0.8"), &format!("{prompt} <lora:ink:1>"), dir.join("x.png").to_str().unwrap(), &dir);
    assert_eq!(other.status.code(), Some(2));
    assert!(stderr(&other).contains("the prompt names LoRA `ink`; give its file with --lora"), "{}", stderr(&other));
    let unet = fixture("sd1-tiny/unet/diffusion_pytorch_model.safetensors");
    let not_lora = args(&unet, &prompt, dir.join("x.png").to_str().unwrap(), &dir);
    assert_eq!(not_lora.status.code(), Some(2));
    assert!(stderr(&not_lora).contains("LoRA `diffusion_pytorch_model`: `") && stderr(&not_lora).contains("` is not a LoRA weight Kiln reads"), "{}", stderr(&not_lora));
}
