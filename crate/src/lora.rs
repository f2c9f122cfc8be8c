//! LoRA files, merged into the weights they change as those load, as diffusers'
//! `load_lora_weights` + `fuse_lora(lora_scale)` does: `W += scale · alpha / rank · up · down`.
//!
//! Merging happens on f32 values before a weight is converted to its stored format, so a
//! quantized model quantizes the merged weight (a weight that arrives already quantized, from
//! a package or the browser's cache, is decoded, merged and quantized again).
//!
//! Two naming schemes are read, both keyed to the module they patch (see [`module_key`]):
//! - kohya / Automatic1111: `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight` and
//!   an optional `.alpha`; `lora_te_` (or SDXL's `lora_te1_` / `lora_te2_`) for text encoders;
//!   SDXL files name UNet modules as Stability's original code does ([`original_unet_key`]);
//! - diffusers / PEFT: `unet.<path>.lora_A.weight`, `.lora_B.weight`, `text_encoder.<path>…`;
//!   these carry no alpha, so alpha is the rank.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::weights::safetensors_values;

/// One LoRA file and the scale it is applied with (`fuse_lora`'s `lora_scale`).
pub struct LoraFile {
    /// Names the file in messages (its file name without extension, as A1111's `<lora:name>`).
    pub name: String,
    pub bytes: Vec<u8>,
    pub scale: f32,
}

/// Where an update goes: the model folder (`unet`, `text_encoder`) and the module's key.
type Target = (String, String);

/// One low-rank update: `delta = scale · up · down`.
struct Update {
    file: String,
    scale: f32,
    /// `[out, rank]`.
    up: Vec<f32>,
    /// `[rank, in · kernel]`.
    down: Vec<f32>,
    rank: usize,
}

/// The updates of every LoRA applied to a model, by the weight they change.
#[derive(Default)]
pub struct Loras {
    updates: HashMap<Target, Vec<Update>>,
    /// The targets merged so far, to find the ones the model does not have.
    merged: Mutex<HashSet<Target>>,
}

/// What one entry of a LoRA file holds.
#[derive(Clone, Copy)]
enum Part {
    Down,
    Up,
    Alpha,
}

const PARTS: [(&str, Part); 5] =
    [(".lora_down.weight", Part::Down), (".lora_up.weight", Part::Up), (".alpha", Part::Alpha), (".lora_A.weight", Part::Down), (".lora_B.weight", Part::Up)];

/// kohya's name prefixes and the model folder each patches.
const KOHYA_PREFIXES: [(&str, &str); 4] = [("lora_unet_", "unet"), ("lora_te_", "text_encoder"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")];

/// A module's key: its path with `.` as `_` (kohya's spelling), without CLIP's `text_model`
/// prefix, which some text encoder files have and others don't.
fn module_key(path: &str) -> String {
    let flat = path.replace('.', "_");
    flat.strip_prefix("text_model_").map(str::to_owned).unwrap_or(flat)
}

/// The target and part of a LoRA file's entry `name`; `None` for an entry that is neither scheme's.
fn parse_name(name: &str) -> Option<(Target, Part)> {
    let (module, part) = PARTS.iter().find_map(|&(suffix, part)| name.strip_suffix(suffix).map(|m| (m, part)))?;
    let kohya = KOHYA_PREFIXES.iter().find_map(|&(prefix, folder)| module.strip_prefix(prefix).map(|path| (folder, path)));
    let (folder, path) = kohya.or_else(|| module.split_once('.'))?;
    let key = module_key(path);
    let key = if folder == "unet" { original_unet_key(&key).unwrap_or(key) } else { key };
    Some(((folder.to_owned(), key), part))
}

/// The diffusers key of a UNet module that kohya's SDXL files name as Stability's original
/// code does (`input_blocks_4_1_…`, `middle_block_…`, `output_blocks_…`); `None` for keys
/// already in diffusers' names. Every level has 2 resnets down and 3 up, as in SD and SDXL.
fn original_unet_key(key: &str) -> Option<String> {
    const RESNET: [(&str, &str); 6] = [
        ("in_layers_0", "norm1"),
        ("in_layers_2", "conv1"),
        ("emb_layers_1", "time_emb_proj"),
        ("out_layers_0", "norm2"),
        ("out_layers_3", "conv2"),
        ("skip_connection", "conv_shortcut"),
    ];
    const WHOLE: [(&str, &str); 6] = [
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
        ("out_0", "conv_norm_out"),
        ("out_2", "conv_out"),
    ];
    if let Some((_, new)) = WHOLE.iter().find(|(old, _)| *old == key) {
        return Some(new.to_string());
    }
    let resnet = |block: String, index: usize, rest: &str| {
        let layer = RESNET.iter().find(|(old, _)| *old == rest).map_or(rest, |(_, new)| new);
        format!("{block}_resnets_{index}_{layer}")
    };
    // `<prefix>_<n>_<m>_<rest>` with numbers n and m.
    let numbered = |prefix: &str| -> Option<(usize, usize, String)> {
        let mut parts = key.strip_prefix(prefix)?.splitn(3, '_');
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next().unwrap_or("").to_owned()))
    };
    if let Some((n, m, rest)) = numbered("input_blocks_") {
        if n == 0 {
            return Some("conv_in".into());
        }
        let (block, within) = ((n - 1) / 3, (n - 1) % 3);
        return Some(match (within, m) {
            (2, _) => format!("down_blocks_{block}_downsamplers_0_conv"),
            (_, 0) => resnet(format!("down_blocks_{block}"), within, &rest),
            _ => format!("down_blocks_{block}_attentions_{within}_{rest}"),
        });
    }
    if let Some(rest) = key.strip_prefix("middle_block_") {
        let (m, rest) = rest.split_once('_')?;
        return Some(match m {
            "1" => format!("mid_block_attentions_0_{rest}"),
            "0" => resnet("mid_block".into(), 0, rest),
            _ => resnet("mid_block".into(), 1, rest),
        });
    }
    let (n, m, rest) = numbered("output_blocks_")?;
    let (block, within) = (n / 3, n % 3);
    Some(match m {
        0 => resnet(format!("up_blocks_{block}"), within, &rest),
        _ if rest.starts_with("conv") => format!("up_blocks_{block}_upsamplers_0_conv"),
        _ => format!("up_blocks_{block}_attentions_{within}_{rest}"),
    })
}

/// A LoRA weight as a matrix: `[rows, the rest]`, dropping a 1×1 kernel's trailing ones.
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    (shape.first().copied().unwrap_or(1), shape.iter().skip(1).product())
}

impl Loras {
    /// Reads `files` (see [`Self::add`]).
    pub fn read(files: &[LoraFile]) -> Result<Self> {
        let mut loras = Self::default();
        for file in files {
            loras.add(file)?;
        }
        Ok(loras)
    }

    /// Adds the updates of `file`, checking that every entry is a LoRA weight and every module
    /// has both halves; several files' updates of one weight add up.
    pub fn add(&mut self, file: &LoraFile) -> Result<()> {
        for (target, update) in read_file(file)? {
            self.updates.entry(target).or_default().push(update);
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }

    /// Whether the tensor `name` of the weight file `stem` (`unet/diffusion_pytorch_model`) changes.
    pub fn touches(&self, stem: &str, name: &str) -> bool {
        self.updates_of(stem, name).is_some()
    }

    fn target(stem: &str, name: &str) -> Option<Target> {
        let folder = stem.split('/').next()?;
        Some((folder.to_owned(), module_key(name.strip_suffix(".weight")?)))
    }

    fn updates_of(&self, stem: &str, name: &str) -> Option<(Target, &Vec<Update>)> {
        let target = Self::target(stem, name)?;
        self.updates.get(&target).map(|u| (target, u))
    }

    /// Adds every update of the tensor `name` of `stem` to its `values` (shape `shape`).
    pub fn merge(&self, stem: &str, name: &str, shape: &[usize], values: &mut [f32]) -> Result<()> {
        let Some((target, updates)) = self.updates_of(stem, name) else {
            return Ok(());
        };
        let (rows, cols) = rows_cols(shape);
        for u in updates {
            if u.up.len() != rows * u.rank || u.down.len() != u.rank * cols {
                return Err(Error::Invalid(format!(
                    "LoRA `{}`: its update of `{name}` is [{}, {}], the model's weight is {shape:?}: the LoRA was made for another model",
                    u.file,
                    u.up.len() / u.rank,
                    u.down.len() / u.rank
                )));
            }
            for (row, out) in values.chunks_exact_mut(cols.max(1)).enumerate() {
                for (k, down) in u.down.chunks_exact(cols.max(1)).enumerate() {
                    let a = u.scale * u.up[row * u.rank + k];
                    out.iter_mut().zip(down).for_each(|(o, d)| *o += a * d);
                }
            }
        }
        self.merged.lock().expect("no panic while merging").insert(target);
        Ok(())
    }

    /// Fails when a LoRA patches layers the model does not have: it was made for another model.
    pub fn check_all_merged(&self) -> Result<()> {
        let merged = self.merged.lock().expect("no panic while merging");
        let mut missing: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (target, updates) in self.updates.iter().filter(|(t, _)| !merged.contains(*t)) {
            for u in updates {
                missing.entry(&u.file).or_default().push(format!("{}: {}", target.0, target.1));
            }
        }
        match missing.into_iter().next() {
            None => Ok(()),
            Some((file, mut layers)) => {
                layers.sort();
                Err(Error::Invalid(format!("LoRA `{file}`: {} of its layers are not in this model (such as {}); it was made for another kind of model", layers.len(), layers[0])))
            }
        }
    }
}

/// The halves of one module's update as a file holds them.
#[derive(Default)]
struct Halves {
    down: Option<(Vec<usize>, Vec<f32>)>,
    up: Option<(Vec<usize>, Vec<f32>)>,
    alpha: Option<f32>,
}

fn read_file(file: &LoraFile) -> Result<Vec<(Target, Update)>> {
    let label = Path::new(&file.name);
    let bad = |msg: String| Error::Invalid(format!("LoRA `{}`: {msg}", file.name));
    let st = SafeTensors::deserialize(&file.bytes).map_err(|e| Error::Safetensors { path: label.to_owned(), msg: e.to_string() })?;
    let mut modules: BTreeMap<Target, Halves> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let Some((target, part)) = parse_name(&name) else {
            return Err(bad(format!(
                "`{name}` is not a LoRA weight Kiln reads (kohya's lora_down/lora_up/alpha or PEFT's lora_A/lora_B; LoHa, LoKr and DoRA files are not supported)"
            )));
        };
        let values = safetensors_values(label, &name, &format!("{:?}", view.dtype()), view.shape(), view.data())?;
        let halves = modules.entry(target).or_default();
        match part {
            Part::Down => halves.down = Some((view.shape().to_vec(), values)),
            Part::Up => halves.up = Some((view.shape().to_vec(), values)),
            Part::Alpha if values.len() == 1 => halves.alpha = Some(values[0]),
            Part::Alpha => {
                return Err(bad(format!("`{name}` holds {} values, not one", values.len())));
            }
        }
    }
    if modules.is_empty() {
        return Err(bad("the file holds no LoRA weights".into()));
    }
    modules
        .into_iter()
        .map(|(target, halves)| {
            let module = format!("{}: {}", target.0, target.1);
            let (Some((down_shape, down)), Some((up_shape, up))) = (halves.down, halves.up) else {
                return Err(bad(format!("{module} lacks its down or its up matrix")));
            };
            let (rank, _) = rows_cols(&down_shape);
            let (_, up_rank) = rows_cols(&up_shape);
            if rank == 0 || up_rank != rank {
                return Err(bad(format!("{module}: down {down_shape:?} and up {up_shape:?} do not share a rank")));
            }
            let alpha = halves.alpha.unwrap_or(rank as f32);
            let scale = file.scale * alpha / rank as f32;
            Ok((target, Update { file: file.name.clone(), scale, up, down, rank }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;

    fn file(name: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)], scale: f32) -> LoraFile {
        let raw: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views = tensors.iter().zip(&raw).map(|((n, s, _), b)| (*n, TensorView::new(Dtype::F32, s.clone(), b).unwrap()));
        LoraFile { name: name.into(), bytes: safetensors::serialize(views, None).unwrap(), scale }
    }

    #[test]
    fn original_unet_names_map_to_diffusers_ones() {
        let pairs = [
            ("input_blocks_4_1_transformer_blocks_0_attn1_to_q", "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
            ("input_blocks_8_1_proj_in", "down_blocks_2_attentions_1_proj_in"),
            ("input_blocks_2_0_in_layers_2", "down_blocks_0_resnets_1_conv1"),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            ("input_blocks_4_0_skip_connection", "down_blocks_1_resnets_0_conv_shortcut"),
            ("middle_block_1_transformer_blocks_9_ff_net_0_proj", "mid_block_attentions_0_transformer_blocks_9_ff_net_0_proj"),
            ("middle_block_2_emb_layers_1", "mid_block_resnets_1_time_emb_proj"),
            ("output_blocks_0_1_transformer_blocks_0_attn2_to_k", "up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            ("output_blocks_5_1_conv", "up_blocks_1_upsamplers_0_conv"),
            ("output_blocks_8_0_out_layers_3", "up_blocks_2_resnets_2_conv2"),
            ("label_emb_0_0", "add_embedding_linear_1"),
        ];
        for (original, diffusers) in pairs {
            assert_eq!(original_unet_key(original).as_deref(), Some(diffusers), "{original}");
        }
        assert_eq!(original_unet_key("down_blocks_1_attentions_0_proj_in"), None);
        let ((folder, key), _) = parse_name("lora_unet_input_blocks_4_1_proj_out.lora_up.weight").unwrap();
        assert_eq!((folder.as_str(), key.as_str()), ("unet", "down_blocks_1_attentions_0_proj_out"));
    }

    #[test]
    fn kohya_and_peft_names_reach_the_same_module() {
        let kohya = parse_name("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight").unwrap();
        let peft = parse_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight").unwrap();
        assert_eq!(kohya.0, peft.0);
        assert_eq!(Loras::target("unet/diffusion_pytorch_model", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"), Some(kohya.0));
        // Text encoders with and without CLIP's `text_model` prefix.
        let te = parse_name("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").unwrap().0;
        assert_eq!(te, parse_name("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight").unwrap().0);
        assert_eq!(Loras::target("text_encoder/model", "encoder.layers.0.self_attn.q_proj.weight"), Some(te.clone()));
        assert_eq!(Loras::target("text_encoder/model", "text_model.encoder.layers.0.self_attn.q_proj.weight"), Some(te));
        assert_eq!(parse_name("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight").unwrap().0.0, "text_encoder_2");
        assert!(parse_name("lora_unet_x.hada_w1_a").is_none());
    }

    #[test]
    fn merges_scale_times_alpha_over_rank_times_up_down() {
        // rank 2, a [2, 3] weight; alpha 1 → scale 0.5 · 1/2.
        let lora = file(
            "a",
            &[
                ("lora_unet_proj.lora_down.weight", vec![2, 3, 1, 1], vec![1.0, 0.0, 2.0, 0.0, 1.0, 0.0]),
                ("lora_unet_proj.lora_up.weight", vec![2, 2, 1, 1], vec![1.0, 1.0, 0.0, 4.0]),
                ("lora_unet_proj.alpha", vec![], vec![1.0]),
            ],
            0.5,
        );
        let loras = Loras::read(&[lora]).unwrap();
        assert!(loras.check_all_merged().is_err());
        let mut w = vec![0.0; 6];
        loras.merge("unet/diffusion_pytorch_model", "proj.weight", &[2, 3, 1, 1], &mut w).unwrap();
        // up · down = [[1, 1, 2], [0, 4, 0]], times 0.25.
        assert_eq!(w, vec![0.25, 0.25, 0.5, 0.0, 1.0, 0.0]);
        loras.check_all_merged().unwrap();
        let err = loras.merge("unet/diffusion_pytorch_model", "proj.weight", &[3, 2], &mut [0.0; 6]).unwrap_err().to_string();
        assert!(err.contains("made for another model"), "{err}");
    }

    #[test]
    fn peft_without_alpha_uses_the_rank_and_several_files_add() {
        let peft = |scale| file("p", &[("unet.l.lora_A.weight", vec![1, 2], vec![1.0, 2.0]), ("unet.l.lora_B.weight", vec![1, 1], vec![3.0])], scale);
        let loras = Loras::read(&[peft(1.0), peft(-0.5)]).unwrap();
        let mut w = vec![1.0, 1.0];
        loras.merge("unet/x", "l.weight", &[1, 2], &mut w).unwrap();
        assert_eq!(w, vec![1.0 + 1.5, 1.0 + 3.0]);
    }

    #[test]
    fn other_files_are_refused_with_the_reason() {
        let err = |f: LoraFile| Loras::read(&[f]).err().unwrap().to_string();
        assert!(err(file("h", &[("lora_unet_x.hada_w1_a", vec![1], vec![1.0])], 1.0)).contains("LoHa"));
        assert!(err(file("d", &[("lora_unet_x.lora_down.weight", vec![1, 1], vec![1.0])], 1.0)).contains("lacks its down or its up"));
        let mismatched = file("m", &[("unet.x.lora_A.weight", vec![2, 1], vec![1.0; 2]), ("unet.x.lora_B.weight", vec![1, 3], vec![1.0; 3])], 1.0);
        assert!(err(mismatched).contains("do not share a rank"));
        let junk = LoraFile { name: "j".into(), bytes: b"not safetensors".to_vec(), scale: 1.0 };
        assert!(err(junk).contains("not a valid safetensors file"));
    }
}
