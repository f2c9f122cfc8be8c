//! SDXL's pieces that must fit together, refused at load when they do not. Its images are
//! checked against diffusers with the other cases (tests/fixtures/sdxl: `pipeline.rs`,
//! `editing.rs`, `packages.rs`); there `sdxl-dpmpp-2m-wide` (96×64) also shows the time ids'
//! order: with the time ids of a 64×64 image diffusers' image moves by a mean of 19.1/255.
mod common;

use std::collections::HashMap;

use burn::tensor::Device;

use kiln::files::MemoryFiles;
use kiln::pipeline::StableDiffusion;
use kiln::weights::weight_file_names;

/// sdxl-tiny's files as the engine reads them, by path.
fn sdxl_files() -> HashMap<String, Vec<u8>> {
    let dir = common::fixtures().join("sdxl-tiny");
    let weights = kiln::layout::weight_stems().into_iter().flat_map(|stem| weight_file_names(&stem));
    let paths = kiln::layout::text_files().chain(weights);
    paths.filter_map(|path| Some((path.clone(), std::fs::read(dir.join(&path)).ok()?))).collect()
}

fn edit_json(files: &mut HashMap<String, Vec<u8>>, path: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value = serde_json::from_slice(&files[path]).unwrap();
    edit(&mut value);
    files.insert(path.to_owned(), value.to_string().into_bytes());
}

#[test]
fn sdxl_parts_that_do_not_fit_are_refused() {
    let device = Device::flex();
    let files = sdxl_files();
    assert!(files.contains_key("text_encoder_2/model.fp16.safetensors") && files.contains_key("tokenizer_2/tokenizer.json"), "{:?}", files.keys());
    let load = |files: HashMap<String, Vec<u8>>| StableDiffusion::load(&MemoryFiles { name: "sdxl-tiny".into(), files }, None, &Default::default(), &device).map(|_| ());
    load(files.clone()).expect("the fixture loads");

    let mut cases: Vec<(&str, HashMap<String, Vec<u8>>)> = Vec::new();
    let mut sd_class = files.clone();
    edit_json(&mut sd_class, "model_index.json", |v| v["_class_name"] = "StableDiffusionPipeline".into());
    cases.push(("the UNet adds a text_time embedding, which this pipeline class does not give it", sd_class));
    let mut refiner = files.clone();
    edit_json(&mut refiner, "model_index.json", |v| v["requires_aesthetics_score"] = true.into());
    cases.push(("an SDXL refiner", refiner));
    let mut plain_unet = files.clone();
    edit_json(&mut plain_unet, "unet/config.json", |v| v["addition_embed_type"] = serde_json::Value::Null);
    cases.push(("an SDXL pipeline needs a UNet with addition_embed_type \"text_time\"", plain_unet));
    // SD 1's text encoder (a CLIPTextModel of the same size) as the second: no projection.
    let mut unprojected = files.clone();
    unprojected.remove("text_encoder_2/model.fp16.safetensors");
    unprojected.insert("text_encoder_2/model.safetensors".into(), files["text_encoder/model.safetensors"].clone());
    cases.push(("text_encoder_2 has no text_projection", unprojected));

    for (expected, files) in cases {
        let err = load(files).err().expect("refused").to_string();
        assert!(err.contains(expected), "expected {expected:?}: {err}");
    }
}
