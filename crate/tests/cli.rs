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

#[derive(serde::Deserialize)]
struct Case {
    model: String,
    prompt: String,
    negative_prompt: Option<String>,
    steps: usize,
    guidance: f64,
    scheduler: String,
    width: usize,
    height: usize,
    latents: String,
    image: String,
}

#[test]
fn generate_writes_diffusers_image_with_parameters() {
    let text = std::fs::read_to_string(common::fixtures().join("images/cases.json")).expect("cases.json");
    let cases: Vec<Case> = serde_json::from_str(&text).expect("cases parse");
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

    let reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().expect("PNG");
    let info = reader.info();
    let texts: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .chain(info.utf8_text.iter().map(|t| (t.keyword.clone(), t.get_text().unwrap())))
        .collect();
    let expected = format!(
        "{}\nNegative prompt: {negative}\nSteps: {steps}, Sampler: Euler, CFG scale: {guidance}, Size: {}x{}, Model: sd1-tiny",
        case.prompt, case.width, case.height
    );
    assert_eq!(texts, vec![("parameters".to_string(), expected)]);
}

#[test]
fn bad_sizes_are_refused() {
    let out = temp_dir("size").join("x.png");
    let out = out.to_str().unwrap();
    fails_with(&["generate", "--model", &fixture("sd1-tiny"), "--prompt", "x", "--width", "100", "--out", out], "width 100 is not a positive multiple of 32");
    fails_with(&["generate", "--model", &fixture("sd1-tiny"), "--prompt", "x", "--height", "72", "--out", out], "height 72");
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
