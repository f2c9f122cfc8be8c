//! The one path from a request to a PNG, which the CLI and the browser both translate into:
//! a [`Job`] says what to run, a [`Run`] steps it, reports progress and finishes into the
//! PNG with its `parameters` text. Cancelling is dropping the run.
use burn::tensor::Tensor;

use super::img2img::Img2Img;
use super::inpaint::Inpaint;
use super::png::{self, GenerationParams};
use super::preview::{Preview, Previewer, Rendered};
use super::upscale::Upscale;
use super::{Denoising, Request, StableDiffusion};
use crate::error::{Error, Result};

/// Which pipeline runs, with the inputs it adds to the [`Request`].
#[derive(Clone)]
pub enum Mode {
    TextToImage,
    ImageToImage(Img2Img),
    Inpaint(Inpaint),
    Upscale(Upscale),
}

/// What to run.
pub struct Job {
    pub request: Request,
    pub mode: Mode,
}

/// A job in progress: [`Run::step`] until [`Run::finished`], then [`Run::decode`] and, once
/// the caller has the pixels on the host, [`Run::png`].
pub struct Run {
    denoising: Denoising,
    params: GenerationParams,
    /// The mode's own settings for the PNG (A1111's `Denoising strength` and the like).
    extra: Vec<(&'static str, String)>,
    /// The text states' sum, taken once: they do not change while the run steps.
    context_sum: Tensor<1>,
}

impl StableDiffusion {
    /// Validates the job, encodes its prompt (and images) and prepares the noise.
    pub fn run(&self, job: Job) -> Result<Run> {
        let Job { request, mode } = job;
        let (prompt, negative_prompt, seed) = (request.prompt.clone(), request.negative_prompt.clone(), request.seed);
        let (denoising, extra) = match mode {
            Mode::TextToImage => (self.start(request)?, Vec::new()),
            Mode::ImageToImage(input) => {
                let extra = input.parameters();
                (self.start_img2img(request, input)?, extra)
            }
            Mode::Inpaint(input) => {
                let extra = input.parameters();
                (self.start_inpaint(request, input)?, extra)
            }
            Mode::Upscale(input) => {
                let extra = self.upscale_parameters(&input);
                (self.start_upscale(request, input)?, extra)
            }
        };
        let params = GenerationParams {
            prompt,
            negative_prompt,
            steps: denoising.steps,
            sampler: denoising.kind.a1111_name().to_string(),
            cfg_scale: denoising.guidance(),
            seed,
            width: denoising.width,
            height: denoising.height,
            model: self.name.clone(),
        };
        let context_sum = denoising.text.sum();
        Ok(Run { denoising, params, extra, context_sum })
    }
}

impl Run {
    /// Runs one UNet call and scheduler update (none once finished); nothing is read back.
    pub fn step(&mut self, pipe: &StableDiffusion) -> Result<()> {
        self.denoising.step(pipe)
    }

    /// UNet calls made so far.
    pub fn done(&self) -> usize {
        self.denoising.done()
    }

    /// UNet calls in total (PNDM makes one more than the step count).
    pub fn total(&self) -> usize {
        self.denoising.total()
    }

    pub fn finished(&self) -> bool {
        self.denoising.finished()
    }

    /// Messages for the user (a resized input image, steps raised to run at all).
    pub fn warnings(&self) -> &[String] {
        &self.denoising.warnings
    }

    /// The image's width and height.
    pub fn size(&self) -> (usize, usize) {
        (self.params.width, self.params.height)
    }

    /// The sums of the latents and of the text states, to read back after a step: waiting for
    /// these 8 bytes makes progress real and lets a cancel land within a step, and any NaN or
    /// Inf in either makes its sum non-finite ([`Probe::check`]). With a `preview`, followed by
    /// the preview of the denoised latents, for [`Probe::preview`].
    pub fn probe(&self, preview: Option<Previewer>) -> Probe {
        let sums = vec![self.denoising.latents.clone().sum(), self.context_sum.clone()];
        let rendered = preview.zip(self.denoising.denoised()).map(|(previewer, denoised)| previewer.render(denoised));
        let preview = rendered.as_ref().map(|(_, form)| *form);
        let tensor = Tensor::cat(sums.into_iter().chain(rendered.map(|(values, _)| values)).collect(), 0);
        Probe { tensor, done: self.done(), total: self.total(), preview }
    }

    /// The final latents, before the VAE's scaling (what diffusers gives for `output_type="latent"`).
    pub fn latents(&self) -> Tensor<4> {
        self.denoising.latents()
    }

    /// Decodes the latents into `[3·H·W]` values mapped to [0, 1] (unclamped), still on the
    /// device; read them back and give them to [`Run::png`].
    pub fn decode(&self, pipe: &StableDiffusion) -> Tensor<1> {
        self.denoising.decode(pipe).flatten::<1>(0, 3)
    }

    /// The PNG of the decoded `values`, its `parameters` text saying how it was made.
    pub fn png(&self, values: &[f32]) -> Result<Vec<u8>> {
        if values.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite("in the VAE's decoded image".into()));
        }
        let (width, height) = self.size();
        let rgb = png::to_rgb8(values, width, height);
        png::encode(&rgb, width, height, &self.params.a1111_text(&self.extra))
    }
}

/// What [`Run::probe`] gives: a tensor to read back, and the step it follows.
pub struct Probe {
    pub tensor: Tensor<1>,
    done: usize,
    total: usize,
    /// What follows the sums, if anything.
    preview: Option<Rendered>,
}

impl Probe {
    /// Fails when the `values` read back from [`Probe::tensor`] are not finite, naming where.
    pub fn check(&self, values: &[f32]) -> Result<()> {
        match values {
            [_, context, ..] if !context.is_finite() => Err(Error::NonFinite("in the text encoder's output".into())),
            [latents, ..] if !latents.is_finite() => Err(Error::NonFinite(format!("in the latents after UNet step {}/{}", self.done, self.total))),
            _ => Ok(()),
        }
    }

    /// The image as it forms, from the `values` read back (when asked for, and drawn by the
    /// approximation only where the latent space has RGB factors).
    pub fn preview(&self, values: &[f32]) -> Option<Preview> {
        self.preview?.rgba(values.get(2..)?)
    }
}
