//! Kiln: Stable Diffusion on burn + wgpu, the same engine natively and in the browser.
//!
//! `model` holds the networks, `schedulers` the samplers, `pipeline` ties them together
//! as diffusers' pipelines do. Nothing here knows about the browser or the command line.
pub mod bench;
pub mod device;
pub mod error;
pub mod files;
pub mod kernels;
pub mod layout;
pub mod lora;
pub mod messages;
pub mod model;
pub mod npy;
pub mod package;
pub mod pipeline;
pub mod quant;
pub mod safetensors_header;
pub mod schedulers;
pub mod weights;

pub use error::{Error, Result};

#[cfg(target_arch = "wasm32")]
pub mod web;
