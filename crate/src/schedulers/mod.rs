//! Noise schedulers, numerically matched to Hugging Face diffusers.
//!
//! Each scheduler reproduces its diffusers counterpart's arithmetic: schedule tables and per-step
//! coefficients use float32 where diffusers computes them with torch, float64 where it uses numpy,
//! and the latent updates are applied on the device in the same operation order as diffusers.
//! Configs are resolved the way `Target.from_config(Source.from_pretrained(folder).config, **extra)`
//! resolves them (see [`build`]).

mod common;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod lcm;
mod pndm;

use std::fmt;

use burn::tensor::Tensor;
use serde_json::{Map, Value};

pub use common::Prediction;
use common::{Owner, Params};

/// Kiln's scheduler names, as the CLI takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
    Lcm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 7] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::Lcm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp-2m-karras",
            SchedulerKind::Lcm => "lcm",
        }
    }

    pub fn from_name(s: &str) -> Result<Self, SchedulerError> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| SchedulerError::UnknownName { name: s.to_string(), valid: valid_names() })
    }

    /// Automatic1111 sampler label, for PNG metadata.
    pub fn a1111_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Pndm => "PLMS",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::DpmPp2m => "DPM++ 2M",
            SchedulerKind::DpmPp2mKarras => "DPM++ 2M Karras",
            SchedulerKind::Lcm => "LCM",
        }
    }

    /// The kind Automatic1111 names `sampler` with the schedule type `schedule` (a field since
    /// A1111 1.9; before, "Karras" was part of the sampler's name). `None`: Kiln has no such one.
    pub fn from_a1111(sampler: &str, schedule: Option<&str>) -> Option<Self> {
        let plain = Self::ALL.into_iter().find(|k| k.a1111_name() == sampler);
        let karras = Self::ALL.into_iter().find(|k| k.a1111_name() == format!("{sampler} Karras"));
        match schedule {
            None | Some("Uniform" | "Normal") => plain,
            // A1111's automatic schedule for DPM++ 2M is Karras.
            Some("Automatic") => karras.or(plain),
            Some("Karras") => karras,
            Some(_) => None,
        }
    }

    /// The diffusers class this kind is built as.
    fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => "DPMSolverMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
        }
    }

    /// The constructor arguments Kiln passes on top of the folder's config, as diffusers'
    /// `from_config(config, **extra)` does: they override the JSON.
    fn extra(self) -> Vec<(&'static str, Value)> {
        let dpm = |karras: bool| {
            vec![
                ("algorithm_type", Value::from("dpmsolver++")),
                ("solver_order", Value::from(2)),
                ("use_karras_sigmas", Value::from(karras)),
            ]
        };
        match self {
            SchedulerKind::DpmPp2m => dpm(false),
            SchedulerKind::DpmPp2mKarras => dpm(true),
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn valid_names() -> String {
    SchedulerKind::ALL.map(SchedulerKind::name).join(", ")
}

/// Errors from parsing a scheduler config or building a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("unknown scheduler `{name}`; valid names are: {valid}")]
    UnknownName { name: String, valid: String },
    #[error("scheduler_config.json is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("scheduler_config.json must be a JSON object, but it is {found}")]
    NotAnObject { found: &'static str },
    #[error("scheduler_config.json: `{key}` must be {expected}, but it is {found}")]
    InvalidValue { key: String, expected: &'static str, found: String },
    #[error("the model's scheduler class `{class}` is not supported; choose one with --scheduler ({valid})")]
    UnsupportedClass { class: String, valid: String },
    #[error(
        "scheduler {kind} (diffusers {cls}): {key} = {value} is not supported (supported: {supported}); \
         pick another --scheduler or fix scheduler_config.json",
        cls = .kind.class_name()
    )]
    UnsupportedOption { kind: SchedulerKind, key: &'static str, value: String, supported: String },
    #[error("scheduler {kind}: {steps} inference steps is not possible: {reason}")]
    InvalidSteps { kind: SchedulerKind, steps: usize, reason: String },
    #[error("low_res_scheduler/scheduler_config.json: {key} = {value} is not supported (supported: {supported})")]
    UnsupportedLowRes { key: &'static str, value: String, supported: String },
}

/// scheduler/scheduler_config.json as published (raw JSON object; `_class_name` names the source class).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    map: Map<String, Value>,
    class_name: String,
}

impl SchedulerConfig {
    /// Parses and type-checks the config. Python's `json` writes `-Infinity`/`Infinity`/`NaN`
    /// (DPM-Solver configs carry `"lambda_min_clipped": -Infinity`), so those are accepted too.
    pub fn from_json(text: &str) -> Result<Self, SchedulerError> {
        let value: Value = serde_json::from_str(&common::quote_non_finite(text))?;
        let Value::Object(map) = value else {
            return Err(SchedulerError::NotAnObject { found: common::json_kind(&value) });
        };
        common::check_types(&map)?;
        let class_name = match map.get("_class_name") {
            Some(Value::String(s)) => s.clone(),
            other => {
                return Err(SchedulerError::InvalidValue {
                    key: "_class_name".into(),
                    expected: "a diffusers scheduler class name",
                    found: other.map_or("missing".into(), |v| v.to_string()),
                });
            }
        };
        Ok(Self { map, class_name })
    }

    pub fn class_name(&self) -> &str {
        &self.class_name
    }

    /// The Kiln scheduler the folder itself asks for (DPMSolverMultistepScheduler +
    /// use_karras_sigmas → DpmPp2mKarras).
    pub fn default_kind(&self) -> Result<SchedulerKind, SchedulerError> {
        let karras = matches!(self.map.get("use_karras_sigmas"), Some(Value::Bool(true)));
        if karras && self.class_name == SchedulerKind::DpmPp2mKarras.class_name() {
            return Ok(SchedulerKind::DpmPp2mKarras);
        }
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.class_name() == self.class_name)
            .ok_or_else(|| SchedulerError::UnsupportedClass { class: self.class_name.clone(), valid: valid_names() })
    }
}

/// A configured scheduler, stepped by call index `0, 1, 2, ...` in order.
pub trait Scheduler {
    /// Timesteps handed to the UNet, one per denoising call, in order (PNDM: steps+1 entries).
    fn timesteps(&self) -> &[f64];
    /// What the UNet's output means (the config's `prediction_type`).
    fn prediction(&self) -> Prediction;
    /// Sigmas if the scheduler has them (Euler family, DPM), for tests.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
    /// How far the initial noise is scaled; 1 except for the sigma-based schedulers.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers' scale_model_input for call `index`; only sigma-based schedulers rescale.
    fn scale_model_input(&self, sample: Tensor<4>, _index: usize) -> Tensor<4> {
        sample
    }
    /// `(a, b)`: at call `index` the scheduler's latents are `a * clean + b * noise` (the Euler
    /// kinds carry sigma-scaled noise, `(1, sigma)`; the others a variance-preserving mix).
    fn noise_scales(&self, index: usize) -> (f32, f32);
    /// diffusers' `add_noise` at call `index`: clean latents `original` noised to the level the
    /// scheduler expects at that call (after `set_begin_index`, as img2img and inpainting use it).
    fn add_noise(&self, original: Tensor<4>, noise: Tensor<4>, index: usize) -> Tensor<4> {
        common::mix(self.noise_scales(index), original, noise)
    }
    /// One denoising update for call `index`; `noise` is invoked only when the scheduler draws
    /// fresh noise (euler-a every step, lcm between steps), returning standard-normal noise shaped
    /// like `sample`. Calls may start at any index (img2img's `set_begin_index`) and then go up
    /// by one.
    fn step(
        &mut self,
        model_output: Tensor<4>,
        index: usize,
        sample: Tensor<4>,
        noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Tensor<4>;
}

/// Builds `kind` from a folder's config the way diffusers'
/// `Target.from_config(Source.from_pretrained(folder).config, **extra)` does.
///
/// Each target parameter comes from `extra` (Kiln's fixed arguments for the DPM kinds), else from
/// the JSON if the published file has the key, else from the TARGET class's default. Parameters the
/// source class only filled with its own defaults do not carry over: diffusers records them in
/// `_use_default_values` and `extract_init_dict` drops them (so SD 1.5's PNDM config gives
/// DPM-Solver its own `timestep_spacing="linspace"`, while the JSON's `steps_offset=1` carries).
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    if steps == 0 {
        return Err(SchedulerError::InvalidSteps { kind, steps, reason: "at least 1 step is needed".into() });
    }
    let extra = kind.extra();
    let params = Params::new(Owner::Scheduler(kind), &config.map, &extra);
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(&params, steps)?),
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(&params, steps)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(&params, steps)?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::new(&params, steps)?),
        SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => Box::new(dpm_solver::DpmSolver::new(&params, steps)?),
        SchedulerKind::Lcm => Box::new(lcm::Lcm::new(&params, steps)?),
    })
}

/// The forward process alone, as diffusers' `DDPMScheduler.add_noise`: the x4 upscaler noises its
/// low-resolution input with it (`low_res_scheduler`) at the requested `noise_level`.
pub struct ForwardNoise {
    alphas_cumprod: Vec<f32>,
}

impl ForwardNoise {
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let p = Params::new(Owner::LowRes, &config.map, &[]);
        let train = p.train_steps(1)?;
        let zero_snr = p.bool("rescale_betas_zero_snr", false)?;
        Ok(Self { alphas_cumprod: common::alphas_cumprod(&p, train, common::DDPM_BETAS, zero_snr)? })
    }

    /// Timesteps (noise levels) the schedule defines: `0..num_train_timesteps`.
    pub fn levels(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `original` noised to training timestep `level` (below [`ForwardNoise::levels`]).
    pub fn add_noise(&self, original: Tensor<4>, noise: Tensor<4>, level: usize) -> Tensor<4> {
        common::mix(common::ddpm_scales(&self.alphas_cumprod, level), original, noise)
    }
}
