//! Schedulers against diffusers: every fixture case under tests/fixtures/schedulers replays the
//! reference loop on the CPU device and compares timesteps, sigmas, init_noise_sigma, the number
//! of noise draws and the final latents; the add_noise cases start part-way through the schedule
//! as img2img and inpainting do. Plus unit tests of names, config parsing and resolution.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use kiln::schedulers::{SchedulerConfig, SchedulerError, SchedulerKind, build};
use serde_json::Value;

/// Tolerance: `|kiln - diffusers| <= RTOL * max(|diffusers|, floor)`.
///
/// Kiln repeats diffusers' float32/float64 operations in diffusers' order; replaying the fixture
/// loop in diffusers with torch's `sqrt`/`log`/`exp` swapped for correctly rounded sqrt and glibc
/// `logf`/`expf` (what Kiln computes its coefficients with) reproduces every case bit for bit.
/// What remains is the reference's own rounding: torch's CPU `sqrt`/`log`/`exp` go through MKL
/// VML, which is off by one float32 ulp for up to a fifth of inputs (a CUDA or non-MKL torch gets
/// different last bits). Those 6e-8 coefficient differences survive as a few ulps of the
/// latents' magnitude (observed: up to 1e-6 of their RMS).
const RTOL: f64 = 1e-5;
/// Floor for timesteps, sigmas and init_noise_sigma, so that a timestep of 0 compares absolutely.
const FLOOR: f64 = 1e-3;

/// The latents' floor is their RMS rather than FLOOR: each element is a sum of terms as large as
/// the typical latent, so an element near zero carries their absolute rounding error, and its own
/// relative error measures cancellation, not correctness. The check stays strict where it
/// matters: a wrong coefficient scales every element and shows at 1e-5 on the large ones.
fn latent_floor(expected: &[f64]) -> f64 {
    let rms = (expected.iter().map(|v| v * v).sum::<f64>() / expected.len() as f64).sqrt();
    rms.max(FLOOR)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/schedulers")
}

/// Reads a little-endian float32, C-order `.npy` file.
fn read_npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not a .npy file", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).expect("ASCII header");
    assert!(header.contains("'descr': '<f4'"), "{}: expected little-endian float32: {header}", path.display());
    assert!(header.contains("'fortran_order': False"), "{}: expected C order", path.display());
    let shape_at = header.find("'shape':").expect("shape") + "'shape':".len();
    let open = shape_at + header[shape_at..].find('(').expect("shape tuple");
    let close = open + header[open..].find(')').expect("shape tuple end");
    let shape: Vec<usize> = header[open + 1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("shape entry"))
        .collect();
    let data = &bytes[start + header_len..];
    let count: usize = shape.iter().product();
    assert_eq!(data.len(), count * 4, "{}: data size does not match shape {shape:?}", path.display());
    let values = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    (shape, values)
}

fn config(name: &str) -> SchedulerConfig {
    let path = fixtures().join("configs").join(name).join("scheduler_config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    SchedulerConfig::from_json(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `count` arrays of the per-step shape stacked along the first axis of an `.npy` file.
fn stacked(name: &str, device: &Device) -> Vec<Tensor<4>> {
    let (shape, values) = read_npy_f32(&fixtures().join(name));
    let step_shape = [shape[1], shape[2], shape[3], shape[4]];
    let len: usize = step_shape.iter().product();
    values
        .chunks_exact(len)
        .map(|chunk| Tensor::<4>::from_data(TensorData::new(chunk.to_vec(), step_shape), device))
        .collect()
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn floats(value: &Value) -> Option<Vec<f64>> {
    value.as_array().map(|a| a.iter().map(|v| v.as_f64().expect("number")).collect())
}

/// Compares two sequences elementwise at `RTOL` relative to `max(|expected|, floor)`, returning
/// the largest such relative error or a description of the first mismatch.
fn compare(what: &str, actual: &[f64], expected: &[f64], floor: f64) -> Result<f64, String> {
    if actual.len() != expected.len() {
        return Err(format!("{what}: {} values, expected {}", actual.len(), expected.len()));
    }
    let mut worst = 0.0f64;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs() / e.abs().max(floor);
        if !(err <= RTOL) {
            return Err(format!("{what}[{i}] = {a}, expected {e} (relative error {err:.2e})"));
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

struct Inputs {
    sample: Tensor<4>,
    model_outputs: Vec<Tensor<4>>,
    noise: Vec<Tensor<4>>,
}

/// Replays diffusers' reference loop for one fixture case; returns the worst final-latent error.
fn run_case(case: &Value, inputs: &Inputs) -> Result<f64, String> {
    let kind = SchedulerKind::from_name(case["scheduler"].as_str().unwrap()).map_err(|e| e.to_string())?;
    let steps = case["steps"].as_u64().unwrap() as usize;
    let mut scheduler = build(kind, &config(case["config"].as_str().unwrap()), steps).map_err(|e| e.to_string())?;

    let mut worst = compare("timesteps", scheduler.timesteps(), &floats(&case["timesteps"]).unwrap(), FLOOR)?;
    match (scheduler.sigmas(), floats(&case["sigmas"])) {
        (Some(actual), Some(expected)) => worst = worst.max(compare("sigmas", actual, &expected, FLOOR)?),
        (None, None) => {}
        (actual, _) => return Err(format!("sigmas: Kiln has {actual:?}, fixture has {}", case["sigmas"])),
    }
    let init_noise_sigma = scheduler.init_noise_sigma();
    let expected = case["init_noise_sigma"].as_f64().unwrap();
    worst = worst.max(compare("init_noise_sigma", &[init_noise_sigma], &[expected], FLOOR)?);

    let mut draws = 0usize;
    let mut x = inputs.sample.clone().mul_scalar(init_noise_sigma);
    for i in 0..scheduler.timesteps().len() {
        let input = scheduler.scale_model_input(x.clone(), i);
        let model_output = inputs.model_outputs[i].clone() + input.mul_scalar(0.1);
        let mut noise = || {
            draws += 1;
            inputs.noise.get(draws - 1).cloned().expect("more noise draws than the fixture holds")
        };
        x = scheduler.step(model_output, i, x, &mut noise);
    }
    let expected_draws = case["noise_draws"].as_u64().unwrap() as usize;
    if draws != expected_draws {
        return Err(format!("{draws} noise draws, expected {expected_draws}"));
    }
    let actual: Vec<f64> = values(x).into_iter().map(f64::from).collect();
    let expected = floats(&case["final"]).unwrap();
    Ok(worst.max(compare("final", &actual, &expected, latent_floor(&expected))?))
}

#[test]
fn fixtures_match_diffusers() {
    let device = Device::flex();
    let dir = fixtures();
    let (_, sample) = read_npy_f32(&dir.join("sample.npy"));
    let inputs = Inputs {
        sample: Tensor::<4>::from_data(TensorData::new(sample, [1, 4, 8, 8]), &device),
        model_outputs: stacked("model_outputs.npy", &device),
        noise: stacked("noise.npy", &device),
    };
    let index: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let cases = index["cases"].as_array().expect("index.json lists cases");
    let skipped = index["skipped"].as_array().map_or(0, Vec::len);

    let (mut passed, mut worst) = (0, 0.0f64);
    let mut failures = Vec::new();
    for entry in cases {
        let file = entry["file"].as_str().expect("case file");
        let case: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        match run_case(&case, &inputs) {
            Ok(err) => {
                passed += 1;
                worst = worst.max(err);
            }
            Err(msg) => failures.push(format!("{file}: {msg}")),
        }
    }
    println!("{passed} cases passed ({skipped} skipped by the fixture generator), max relative error {worst:.2e}");
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert!(passed > 0, "no fixture cases listed in {}", dir.join("index.json").display());
}

/// img2img/inpainting starts (tests/fixtures/schedulers/add_noise.json): `add_noise` at the
/// begin index of `get_timesteps`, then the steps from there with the 4-channel inpainting blend
/// (left half reset to the sample noised to the next timestep), against diffusers.
#[test]
fn add_noise_from_a_begin_index_matches_diffusers() {
    let device = Device::flex();
    let dir = fixtures();
    let tensor = |values: Vec<f32>| Tensor::<4>::from_data(TensorData::new(values, [1, 4, 8, 8]), &device);
    let sample = tensor(read_npy_f32(&dir.join("sample.npy")).1);
    let model_outputs = stacked("model_outputs.npy", &device);
    let noise = stacked("noise.npy", &device);
    let (shape, expected) = read_npy_f32(&dir.join("add_noise.npy"));
    assert_eq!(shape[1..], [2, 1, 4, 8, 8]);
    let expected: Vec<&[f32]> = expected.chunks_exact(256).collect();
    let keep = tensor((0..256).map(|i| if i % 8 < 4 { 1.0 } else { 0.0 }).collect());
    let index: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("add_noise.json")).unwrap()).unwrap();
    let cases = index["cases"].as_array().expect("add_noise.json lists cases");

    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for (n, case) in cases.iter().enumerate() {
        let label = format!("{}-{}-{}-{}", case["scheduler"], case["config"], case["steps"], case["strength"]);
        let result = (|| -> Result<f64, String> {
            let kind = SchedulerKind::from_name(case["scheduler"].as_str().unwrap()).map_err(|e| e.to_string())?;
            let steps = case["steps"].as_u64().unwrap() as usize;
            let begin = case["begin"].as_u64().unwrap() as usize;
            let mut scheduler = build(kind, &config(case["config"].as_str().unwrap()), steps).map_err(|e| e.to_string())?;
            let len = scheduler.timesteps().len();
            if len - begin != case["calls"].as_u64().unwrap() as usize {
                return Err(format!("{} calls from index {begin}, expected {}", len - begin, case["calls"]));
            }
            let widen = |t: Tensor<4>| values(t).into_iter().map(f64::from).collect::<Vec<_>>();
            let compare_latents = |what: &str, actual: Tensor<4>, expected: &[f32]| {
                let expected: Vec<f64> = expected.iter().map(|&v| f64::from(v)).collect();
                compare(what, &widen(actual), &expected, latent_floor(&expected))
            };
            let mut x = scheduler.add_noise(sample.clone(), noise[0].clone(), begin);
            let mut worst = compare_latents("noisy start", x.clone(), expected[2 * n])?;
            let mut draws = 0usize;
            for i in begin..len {
                let model_output = model_outputs[i - begin].clone() + scheduler.scale_model_input(x.clone(), i).mul_scalar(0.1);
                let mut draw = || {
                    draws += 1;
                    noise.get(draws).cloned().expect("more noise draws than the fixture holds")
                };
                x = scheduler.step(model_output, i, x, &mut draw);
                let kept = if i + 1 < len { scheduler.add_noise(sample.clone(), noise[0].clone(), i + 1) } else { sample.clone() };
                x = keep.clone() * kept + keep.clone().neg().add_scalar(1.0) * x;
            }
            if draws != case["noise_draws"].as_u64().unwrap() as usize {
                return Err(format!("{draws} noise draws, expected {}", case["noise_draws"]));
            }
            worst = worst.max(compare_latents("final", x, expected[2 * n + 1])?);
            Ok(worst)
        })();
        match result {
            Ok(err) => worst = worst.max(err),
            Err(msg) => failures.push(format!("{label}: {msg}")),
        }
    }
    println!("{} add_noise cases, max relative error {worst:.2e}", cases.len());
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert!(!cases.is_empty(), "add_noise.json lists no cases");
}

#[test]
fn names_round_trip_and_unknown_names_list_the_valid_ones() {
    for kind in SchedulerKind::ALL {
        assert_eq!(SchedulerKind::from_name(kind.name()).unwrap(), kind);
    }
    let labels = SchedulerKind::ALL.map(SchedulerKind::a1111_name);
    assert_eq!(labels, ["DDIM", "PLMS", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "LCM"]);
    let err = SchedulerKind::from_name("dpm++").unwrap_err();
    assert!(matches!(err, SchedulerError::UnknownName { .. }));
    let msg = err.to_string();
    for kind in SchedulerKind::ALL {
        assert!(msg.contains(kind.name()), "{msg}");
    }
}

/// The SD 1.5 config as published: PNDM with steps_offset and set_alpha_to_one, no spacing.
const SD15: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;

fn with(base: &str, key: &str, value: Value) -> SchedulerConfig {
    let mut map: serde_json::Map<String, Value> = serde_json::from_str(base).unwrap();
    map.insert(key.into(), value);
    SchedulerConfig::from_json(&Value::Object(map).to_string()).unwrap()
}

fn timesteps(kind: SchedulerKind, config: &SchedulerConfig, steps: usize) -> Vec<f64> {
    build(kind, config, steps).unwrap().timesteps().to_vec()
}

#[test]
fn config_resolution_follows_diffusers_from_config() {
    let sd15 = SchedulerConfig::from_json(SD15).unwrap();
    assert_eq!(sd15.class_name(), "PNDMScheduler");
    assert_eq!(sd15.default_kind().unwrap(), SchedulerKind::Pndm);

    // Keys in the JSON carry over: DDIM uses leading spacing (its default) plus steps_offset=1.
    assert_eq!(timesteps(SchedulerKind::Ddim, &sd15, 4), [751.0, 501.0, 251.0, 1.0]);
    // Defaults the source class merely filled in do not (diffusers drops `_use_default_values`):
    // DPM-Solver gets its own "linspace", not PNDM's "leading".
    assert_eq!(timesteps(SchedulerKind::DpmPp2m, &sd15, 4), [999.0, 749.0, 500.0, 250.0]);
    // A spacing written in the JSON wins over the target's default...
    let leading = with(SD15, "timestep_spacing", "leading".into());
    assert_eq!(timesteps(SchedulerKind::DpmPp2m, &leading, 4), [801.0, 601.0, 401.0, 201.0]);
    // ...and Kiln's extra arguments win over the JSON.
    let karras_json = with(SD15, "use_karras_sigmas", true.into());
    let plain = build(SchedulerKind::DpmPp2m, &karras_json, 4).unwrap();
    let karras = build(SchedulerKind::DpmPp2mKarras, &sd15, 4).unwrap();
    assert_eq!(plain.timesteps(), timesteps(SchedulerKind::DpmPp2m, &sd15, 4));
    assert_ne!(plain.sigmas(), karras.sigmas());
    // A folder's own DPM-Solver config names the Karras variant through use_karras_sigmas.
    let dpm = SD15.replace("PNDMScheduler", "DPMSolverMultistepScheduler");
    assert_eq!(with(&dpm, "use_karras_sigmas", true.into()).default_kind().unwrap(), SchedulerKind::DpmPp2mKarras);
    assert_eq!(with(&dpm, "use_karras_sigmas", false.into()).default_kind().unwrap(), SchedulerKind::DpmPp2m);
    // solver_order is an extra too, so a third-order folder still builds as 2M.
    assert!(build(SchedulerKind::DpmPp2m, &with(SD15, "solver_order", 3.into()), 10).is_ok());
}

#[test]
fn config_errors_are_actionable() {
    let sd15 = SchedulerConfig::from_json(SD15).unwrap();
    let err = |r: Result<Box<dyn kiln::schedulers::Scheduler>, SchedulerError>| r.err().expect("an error").to_string();

    assert!(matches!(SchedulerConfig::from_json("{ not json"), Err(SchedulerError::Json(_))));
    assert!(matches!(SchedulerConfig::from_json("[1, 2]"), Err(SchedulerError::NotAnObject { .. })));
    let msg = SchedulerConfig::from_json(&SD15.replace("1000,", "\"1000\",")).unwrap_err().to_string();
    assert!(msg.contains("num_train_timesteps") && msg.contains("integer"), "{msg}");
    let msg = SchedulerConfig::from_json(&SD15.replace("1000,", "1000.5,")).unwrap_err().to_string();
    assert!(msg.contains("num_train_timesteps"), "{msg}");

    // Python's json writes -Infinity for DPM-Solver's lambda_min_clipped.
    let dpm = SchedulerConfig::from_json(&SD15.replace("\"trained_betas\": null", "\"lambda_min_clipped\": -Infinity"))
        .unwrap();
    assert!(build(SchedulerKind::DpmPp2m, &dpm, 10).is_ok());

    let msg = err(build(SchedulerKind::Ddim, &sd15, 0));
    assert!(msg.contains("0 inference steps"), "{msg}");
    let msg = err(build(SchedulerKind::Ddim, &sd15, 1001));
    assert!(msg.contains("1000"), "{msg}");
    let msg = err(build(SchedulerKind::Pndm, &with(SD15, "skip_prk_steps", false.into()), 20));
    assert!(msg.contains("skip_prk_steps") && msg.contains("true"), "{msg}");
    let msg = err(build(SchedulerKind::Euler, &with(SD15, "beta_schedule", "sigmoid".into()), 20));
    assert!(msg.contains("sigmoid") && msg.contains("scaled_linear") && msg.contains("squaredcos_cap_v2"), "{msg}");
    let msg = err(build(SchedulerKind::Ddim, &with(SD15, "timestep_spacing", "uniform".into()), 20));
    assert!(msg.contains("leading") && msg.contains("trailing") && msg.contains("linspace"), "{msg}");
    let msg = err(build(SchedulerKind::Ddim, &with(SD15, "thresholding", true.into()), 20));
    assert!(msg.contains("thresholding"), "{msg}");
    let msg = err(build(SchedulerKind::EulerAncestral, &with(SD15, "prediction_type", "sample".into()), 20));
    assert!(msg.contains("epsilon") && msg.contains("v_prediction"), "{msg}");
    let msg = err(build(SchedulerKind::Lcm, &sd15, 51));
    assert!(msg.contains("original_inference_steps"), "{msg}");
    let msg = err(build(SchedulerKind::Ddim, &with(SD15, "timestep_spacing", "trailing".into()), 61));
    assert!(msg.contains("trailing"), "{msg}");

    let unsupported = with(SD15, "_class_name", "UniPCMultistepScheduler".into());
    let msg = unsupported.default_kind().unwrap_err().to_string();
    assert!(msg.contains("UniPCMultistepScheduler") && msg.contains("dpmpp-2m-karras"), "{msg}");
}
