//! Pieces every scheduler shares: config resolution, the training noise schedule, timestep
//! spacing, the sigma helpers of the Euler/DPM family, and the forward noising (`add_noise`).
//!
//! diffusers builds its tables with torch float32 (betas, `alphas_cumprod`, sigmas) and places
//! timesteps with numpy float64; the helpers here reproduce both bit for bit where practical,
//! because a one-ulp difference in a table entry can move a rounded timestep.

use std::borrow::Cow;

use burn::tensor::Tensor;
use serde_json::{Map, Value};

use super::{SchedulerError, SchedulerKind};

type Result<T> = std::result::Result<T, SchedulerError>;

// ---------------------------------------------------------------------------------------------
// Config values
// ---------------------------------------------------------------------------------------------

/// Python's `json.dumps` writes non-finite floats as bare `NaN`, `Infinity` and `-Infinity`, which
/// strict JSON rejects; this turns them (outside string literals) into strings that
/// [`Params::f64`] understands.
pub(super) fn quote_non_finite(text: &str) -> Cow<'_, str> {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    if !text.contains("Infinity") && !text.contains("NaN") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string && let Some(token) = TOKENS.into_iter().find(|t| rest.starts_with(t)) {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Cow::Owned(out)
}

pub(super) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[derive(Clone, Copy)]
enum Type {
    Int,
    Float,
    Bool,
    Str,
    FloatList,
}

/// Every parameter the supported classes read, with its JSON type. `null` is accepted for all of
/// them here (diffusers' constructors accept `None`); whether it is usable is decided on use.
const KNOWN_KEYS: &[(&str, Type)] = &[
    ("num_train_timesteps", Type::Int),
    ("beta_start", Type::Float),
    ("beta_end", Type::Float),
    ("beta_schedule", Type::Str),
    ("trained_betas", Type::FloatList),
    ("rescale_betas_zero_snr", Type::Bool),
    ("prediction_type", Type::Str),
    ("timestep_spacing", Type::Str),
    ("steps_offset", Type::Int),
    ("clip_sample", Type::Bool),
    ("clip_sample_range", Type::Float),
    ("set_alpha_to_one", Type::Bool),
    ("thresholding", Type::Bool),
    ("skip_prk_steps", Type::Bool),
    ("interpolation_type", Type::Str),
    ("use_karras_sigmas", Type::Bool),
    ("use_exponential_sigmas", Type::Bool),
    ("use_beta_sigmas", Type::Bool),
    ("use_lu_lambdas", Type::Bool),
    ("use_flow_sigmas", Type::Bool),
    ("sigma_min", Type::Float),
    ("sigma_max", Type::Float),
    ("timestep_type", Type::Str),
    ("final_sigmas_type", Type::Str),
    ("algorithm_type", Type::Str),
    ("solver_order", Type::Int),
    ("solver_type", Type::Str),
    ("lower_order_final", Type::Bool),
    ("euler_at_final", Type::Bool),
    ("lambda_min_clipped", Type::Float),
    ("variance_type", Type::Str),
    ("original_inference_steps", Type::Int),
    ("timestep_scaling", Type::Float),
];

/// Rejects values of the wrong JSON type up front, so a broken config fails when it is loaded.
pub(super) fn check_types(map: &Map<String, Value>) -> Result<()> {
    for &(key, ty) in KNOWN_KEYS {
        let Some(value) = map.get(key) else { continue };
        match ty {
            Type::Int => as_int(key, value).map(drop)?,
            Type::Float => as_f64(key, value).map(drop)?,
            Type::Bool => as_bool(key, value).map(drop)?,
            Type::Str => as_str(key, value).map(drop)?,
            Type::FloatList => as_f64_list(key, value).map(drop)?,
        }
    }
    Ok(())
}

fn invalid(key: &str, expected: &'static str, value: &Value) -> SchedulerError {
    let mut found = value.to_string();
    if found.len() > 60 {
        found.truncate(57);
        found.push_str("...");
    }
    SchedulerError::InvalidValue { key: key.to_string(), expected, found }
}

fn as_f64(key: &str, value: &Value) -> Result<Option<f64>> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => n.as_f64().map(Some).ok_or_else(|| invalid(key, "a number", value)),
        Value::String(s) if s == "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
        Value::String(s) if s == "Infinity" => Ok(Some(f64::INFINITY)),
        Value::String(s) if s == "NaN" => Ok(Some(f64::NAN)),
        _ => Err(invalid(key, "a number", value)),
    }
}

fn as_int(key: &str, value: &Value) -> Result<Option<i64>> {
    match value {
        Value::Null => Ok(None),
        _ => value.as_i64().map(Some).ok_or_else(|| invalid(key, "an integer", value)),
    }
}

fn as_bool(key: &str, value: &Value) -> Result<Option<bool>> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        _ => Err(invalid(key, "true or false", value)),
    }
}

fn as_str<'v>(key: &str, value: &'v Value) -> Result<Option<&'v str>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        _ => Err(invalid(key, "a string", value)),
    }
}

fn as_f64_list(key: &str, value: &Value) -> Result<Option<Vec<f64>>> {
    match value {
        Value::Null => Ok(None),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_f64().ok_or_else(|| invalid(key, "a list of numbers", value)))
            .collect::<Result<Vec<_>>>()
            .map(Some),
        _ => Err(invalid(key, "a list of numbers", value)),
    }
}

/// One target class's view of a folder config, resolved as diffusers' `from_config` does:
/// Kiln's `extra` arguments, else the published JSON's key, else the default the caller passes
/// (the target class's own). Keys a class does not take are simply never asked for.
pub(super) struct Params<'a> {
    owner: Owner,
    json: &'a Map<String, Value>,
    extra: &'a [(&'static str, Value)],
}

/// Who reads a config, for error messages.
#[derive(Clone, Copy)]
pub(super) enum Owner {
    Scheduler(SchedulerKind),
    /// The x4 upscaler's `low_res_scheduler` (a DDPMScheduler used only for its `add_noise`).
    LowRes,
}

impl<'a> Params<'a> {
    pub fn new(owner: Owner, json: &'a Map<String, Value>, extra: &'a [(&'static str, Value)]) -> Self {
        Self { owner, json, extra }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        let extra = self.extra.iter().find(|(k, _)| *k == key).map(|(_, v)| v);
        extra.or_else(|| self.json.get(key))
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => as_f64(key, v)?.ok_or_else(|| invalid(key, "a number", &Value::Null)),
        }
    }

    /// Optional numbers (diffusers' `float | None` parameters).
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map_or(Ok(None), |v| as_f64(key, v))
    }

    pub fn f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        self.get(key).map_or(Ok(None), |v| as_f64_list(key, v))
    }

    pub fn int(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => as_int(key, v)?.ok_or_else(|| invalid(key, "an integer", &Value::Null)),
        }
    }

    /// Booleans; `null` counts as false, as Python's truthiness does.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => Ok(as_bool(key, v)?.unwrap_or(false)),
        }
    }

    pub fn string(&self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => as_str(key, v)?.ok_or_else(|| invalid(key, "a string", &Value::Null)),
        }
    }

    /// Optional strings (diffusers' `str | None` parameters).
    pub fn opt_string(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key).map_or(Ok(None), |v| as_str(key, v))
    }

    /// A string option restricted to the values Kiln implements for this class.
    pub fn choice<T: Copy>(&self, key: &'static str, default: &'a str, options: &[(&str, T)]) -> Result<T> {
        let value = self.string(key, default)?;
        match options.iter().find(|(name, _)| *name == value) {
            Some(&(_, t)) => Ok(t),
            None => Err(self.unsupported(key, format!("\"{value}\""), names(options))),
        }
    }

    /// A diffusers switch Kiln does not implement: it must be off (absent, false or null).
    pub fn off(&self, key: &'static str) -> Result<()> {
        if self.bool(key, false)? {
            return Err(self.unsupported(key, "true".into(), "false".into()));
        }
        Ok(())
    }

    pub fn unsupported(&self, key: &'static str, value: String, supported: String) -> SchedulerError {
        match self.owner {
            Owner::Scheduler(kind) => SchedulerError::UnsupportedOption { kind, key, value, supported },
            Owner::LowRes => SchedulerError::UnsupportedLowRes { key, value, supported },
        }
    }

    pub fn invalid_steps(&self, steps: usize, reason: String) -> SchedulerError {
        match self.owner {
            Owner::Scheduler(kind) => SchedulerError::InvalidSteps { kind, steps, reason },
            Owner::LowRes => SchedulerError::UnsupportedLowRes { key: "num_train_timesteps", value: steps.to_string(), supported: reason },
        }
    }

    /// `num_train_timesteps`, checked against the requested step count (diffusers' DDIM and LCM
    /// refuse more inference steps than training steps; the others would repeat timesteps).
    pub fn train_steps(&self, steps: usize) -> Result<usize> {
        let train = self.int("num_train_timesteps", 1000)?;
        if train < 2 {
            return Err(self.unsupported("num_train_timesteps", train.to_string(), "2 or more".into()));
        }
        let train = train as usize;
        if steps > train {
            return Err(self.invalid_steps(steps, format!("the model was trained with only {train} timesteps")));
        }
        Ok(train)
    }

    pub fn prediction(&self, options: &[(&str, Prediction)]) -> Result<Prediction> {
        self.choice("prediction_type", "epsilon", options)
    }

    pub fn spacing(&self, default: &'a str) -> Result<Spacing> {
        self.choice(
            "timestep_spacing",
            default,
            &[("leading", Spacing::Leading), ("trailing", Spacing::Trailing), ("linspace", Spacing::Linspace)],
        )
    }
}

fn names<T>(options: &[(&str, T)]) -> String {
    options.iter().map(|(name, _)| format!("\"{name}\"")).collect::<Vec<_>>().join(", ")
}

/// What the UNet's output means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    Sample,
    VPrediction,
}

pub(super) const EPSILON: (&str, Prediction) = ("epsilon", Prediction::Epsilon);
pub(super) const SAMPLE: (&str, Prediction) = ("sample", Prediction::Sample);
pub(super) const V_PREDICTION: (&str, Prediction) = ("v_prediction", Prediction::VPrediction);

// ---------------------------------------------------------------------------------------------
// Training noise schedule
// ---------------------------------------------------------------------------------------------

/// A class's default beta range (LCM's differ from the DDPM ones).
pub(super) struct BetaDefaults {
    pub start: f64,
    pub end: f64,
    pub schedule: &'static str,
}

pub(super) const DDPM_BETAS: BetaDefaults = BetaDefaults { start: 0.0001, end: 0.02, schedule: "linear" };
pub(super) const LCM_BETAS: BetaDefaults = BetaDefaults { start: 0.00085, end: 0.012, schedule: "scaled_linear" };

#[derive(Clone, Copy)]
enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCos,
}

/// `alphas_cumprod` as diffusers computes it in torch float32 (`zero_snr`: the class's
/// `rescale_betas_zero_snr`, for the classes that have it).
pub(super) fn alphas_cumprod(p: &Params, train: usize, defaults: BetaDefaults, zero_snr: bool) -> Result<Vec<f32>> {
    let betas: Vec<f32> = match p.f64_list("trained_betas")? {
        Some(betas) if betas.len() != train => {
            return Err(p.unsupported(
                "trained_betas",
                format!("a list of {} values", betas.len()),
                format!("one value per training timestep ({train})"),
            ));
        }
        Some(betas) => betas.iter().map(|&b| b as f32).collect(),
        None => {
            let start = p.f64("beta_start", defaults.start)?;
            let end = p.f64("beta_end", defaults.end)?;
            let schedule = p.choice(
                "beta_schedule",
                defaults.schedule,
                &[
                    ("linear", BetaSchedule::Linear),
                    ("scaled_linear", BetaSchedule::ScaledLinear),
                    ("squaredcos_cap_v2", BetaSchedule::SquaredCos),
                ],
            )?;
            match schedule {
                BetaSchedule::Linear => torch_linspace(start, end, train),
                BetaSchedule::ScaledLinear => {
                    torch_linspace(start.powf(0.5), end.powf(0.5), train).into_iter().map(|b| b * b).collect()
                }
                BetaSchedule::SquaredCos => squaredcos_cap_v2(train),
            }
        }
    };
    let betas = if zero_snr { rescale_zero_terminal_snr(&betas) } else { betas };
    Ok(cumprod(betas.iter().map(|&b| 1.0 - b)))
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: the first half counts up from
/// `start`, the second down from `end`, each a fused multiply-add in float32.
fn torch_linspace(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
        .collect()
}

/// `torch.cumprod` on a float32 CPU tensor: accumulates in float64, stores float32.
fn cumprod(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .map(|v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (Python float64, then float32).
fn squaredcos_cap_v2(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr` (Lin et al. 2023, algorithm 1) in float32: shifts and scales
/// sqrt(alphas_cumprod) so the last timestep carries no signal.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut sqrt_ac: Vec<f32> = cumprod(betas.iter().map(|&b| 1.0 - b)).into_iter().map(f32::sqrt).collect();
    let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
    let scale = first / (first - last);
    for s in &mut sqrt_ac {
        *s = (*s - last) * scale;
    }
    let ac: Vec<f32> = sqrt_ac.iter().map(|s| s * s).collect();
    let alphas = std::iter::once(ac[0]).chain(ac.windows(2).map(|w| w[1] / w[0]));
    alphas.map(|a| 1.0 - a).collect()
}

/// `alphas_cumprod` and the training sigmas of the Euler and DPM classes, which pin a zero-SNR
/// schedule's terminal alpha product to 2^-24 so that its sigma stays finite.
pub(super) fn sigma_schedule(p: &Params, train: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let zero_snr = p.bool("rescale_betas_zero_snr", false)?;
    let mut alphas_cumprod = alphas_cumprod(p, train, DDPM_BETAS, zero_snr)?;
    if zero_snr && let Some(last) = alphas_cumprod.last_mut() {
        *last = 2f32.powi(-24);
    }
    let sigmas = train_sigmas(&alphas_cumprod);
    Ok((alphas_cumprod, sigmas))
}

// ---------------------------------------------------------------------------------------------
// Timestep spacing (numpy float64 arithmetic)
// ---------------------------------------------------------------------------------------------

/// diffusers' `timestep_spacing` (table 2 of "Common Diffusion Noise Schedules and Sample Steps
/// are Flawed").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// `np.linspace(start, stop, num, endpoint)`: `i * step + start` in float64, the endpoint exact.
pub(super) fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut out: Vec<f64> = if div == 0 {
        (0..num).map(|i| i as f64 * delta + start).collect()
    } else {
        let step = delta / div as f64;
        (0..num).map(|i| i as f64 * step + start).collect()
    };
    if endpoint && num > 1 {
        out[num - 1] = stop;
    }
    out
}

/// `np.arange(start, stop, step)` for floats: `ceil((stop - start) / step)` entries, the second
/// computed as `start + step` and the rest as `start + i * (second - start)`.
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// "leading": `np.arange(0, n) * (train // n) + steps_offset`, descending.
pub(super) fn leading(train: usize, n: usize, offset: i64) -> Vec<i64> {
    let ratio = (train / n) as i64;
    (0..n as i64).rev().map(|i| i * ratio + offset).collect()
}

/// "trailing": `np.round(np.arange(train, 0, -train / n)) - 1`, descending. numpy's float
/// `arange` yields one entry too many for some `n` (61, 103, ... of 1000), which makes diffusers
/// step at timestep -1; such step counts are refused rather than imitated.
pub(super) fn trailing(p: &Params, train: usize, n: usize) -> Result<Vec<i64>> {
    let values = np_arange(train as f64, 0.0, -(train as f64 / n as f64));
    if values.len() != n {
        return Err(p.invalid_steps(
            n,
            "with timestep_spacing \"trailing\" diffusers' numpy arange produces an extra timestep -1 \
             for this count; use one step more or less"
                .into(),
        ));
    }
    Ok(values.into_iter().map(|t| t.round_ties_even() as i64 - 1).collect())
}

/// "linspace": `np.linspace(0, train - 1, n)`, descending, unrounded.
pub(super) fn linspace(train: usize, n: usize) -> Vec<f64> {
    let mut values = np_linspace(0.0, (train - 1) as f64, n, true);
    values.reverse();
    values
}

/// Integer timesteps, descending, as DDIM and PNDM place them ("linspace" rounded half to even).
pub(super) fn integer_timesteps(p: &Params, spacing: Spacing, train: usize, steps: usize) -> Result<Vec<i64>> {
    Ok(match spacing {
        Spacing::Linspace => linspace(train, steps).into_iter().map(|t| t.round_ties_even() as i64).collect(),
        Spacing::Leading => leading(train, steps, p.int("steps_offset", 0)?),
        Spacing::Trailing => trailing(p, train, steps)?,
    })
}

/// The Euler schedulers' timesteps, descending: numpy float32, "linspace" left fractional.
pub(super) fn euler_timesteps(p: &Params, spacing: Spacing, train: usize, steps: usize) -> Result<Vec<f64>> {
    Ok(match spacing {
        Spacing::Linspace => linspace(train, steps).into_iter().map(|t| t as f32 as f64).collect(),
        Spacing::Leading | Spacing::Trailing => {
            integer_timesteps(p, spacing, train, steps)?.into_iter().map(|t| t as f64).collect()
        }
    })
}

/// Timesteps diffusers uses to index `alphas_cumprod` must lie in the training range; leading
/// spacing plus `steps_offset` overruns it when `steps == num_train_timesteps`.
pub(super) fn check_in_range(p: &Params, steps: usize, train: usize, timesteps: &[i64]) -> Result<()> {
    match timesteps.iter().find(|&&t| t < 0 || t >= train as i64) {
        Some(t) => Err(p.invalid_steps(
            steps,
            format!("this config's spacing puts timestep {t} outside the training range 0..{train}"),
        )),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Sigmas (Euler family, DPM-Solver)
// ---------------------------------------------------------------------------------------------

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, indexed by training timestep.
pub(super) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.interp(t, np.arange(len(sigmas)), sigmas)`: float64 interpolation on the unit grid,
/// clamped to the end values.
pub(super) fn interp(t: f64, sigmas: &[f32]) -> f64 {
    let last = sigmas.len() - 1;
    if t.is_nan() {
        return f64::NAN;
    }
    if t <= 0.0 {
        return sigmas[0] as f64;
    }
    if t >= last as f64 {
        return sigmas[last] as f64;
    }
    let j = t.floor() as usize;
    let (lo, hi) = (sigmas[j] as f64, sigmas[j + 1] as f64);
    if t == j as f64 { lo } else { (hi - lo) * (t - j as f64) + lo }
}

/// Karras et al. (2022) sigmas, rho = 7, in float64 as diffusers' `_convert_to_karras`.
/// `sigma_min`/`sigma_max` come from the config when set (diffusers reads them as config
/// attributes, which a DPM-Solver built from a config that has them also sees).
pub(super) fn karras(p: &Params, lowest: f64, highest: f64, n: usize) -> Result<Vec<f64>> {
    let sigma_min = p.opt_f64("sigma_min")?.unwrap_or(lowest);
    let sigma_max = p.opt_f64("sigma_max")?.unwrap_or(highest);
    let rho = 7.0f64;
    let (min_inv_rho, max_inv_rho) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    Ok(np_linspace(0.0, 1.0, n, true)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect())
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma `sigma` falls on,
/// interpolating `log_sigmas` (numpy float32; the bracket difference stays float32 too).
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let last_at_or_below = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0);
    let low = last_at_or_below.unwrap_or(0).min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The sigma appended after the last step (`final_sigmas_type`): `None` for "zero", else the
/// smallest training sigma.
pub(super) fn final_sigma(p: &Params, alphas_cumprod: &[f32]) -> Result<Option<f32>> {
    let sigma_min = p.choice("final_sigmas_type", "zero", &[("zero", false), ("sigma_min", true)])?;
    Ok(sigma_min.then(|| train_sigmas(&alphas_cumprod[..1])[0]))
}

/// Widens float32 values for the [`Scheduler`](super::Scheduler) accessors.
pub(super) fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

// ---------------------------------------------------------------------------------------------
// Forward noising (img2img, inpainting, the upscaler's low-res image)
// ---------------------------------------------------------------------------------------------

/// `(sqrt(alphas_cumprod[t]), sqrt(1 - alphas_cumprod[t]))`: the noise scales of the classes
/// that index the training schedule by timestep (DDPM, DDIM, PNDM, LCM), in float32 as torch
/// computes them.
pub(super) fn ddpm_scales(alphas_cumprod: &[f32], t: usize) -> (f32, f32) {
    let alpha = alphas_cumprod[t];
    (alpha.sqrt(), (1.0 - alpha).sqrt())
}

/// `a * original + b * noise`.
pub(super) fn mix((a, b): (f32, f32), original: Tensor<4>, noise: Tensor<4>) -> Tensor<4> {
    original.mul_scalar(a) + noise.mul_scalar(b)
}
