//! Stable Diffusion's components, one module each, named as diffusers names them.
pub mod attention;
pub mod autoencoder_tiny;
pub mod clip;
pub mod config;
pub mod embeddings;
pub mod nn;
pub mod normalization;
pub mod resnet;
pub mod tokenizer;
pub mod transformer_2d;
pub mod unet;
pub mod unet_blocks;
pub mod unet_k_blocks;
pub mod vae;
