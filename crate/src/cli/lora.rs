//! `--lora FILE_OR_URL:WEIGHT`: LoRA files for the engine, and the prompt's record of them.
use kiln::lora::LoraFile;
use kiln::pipeline::prompt::lora_tags;
use kiln::{Error, Result};

use super::download;

/// Splits `FILE_OR_URL:WEIGHT` at its last colon (URLs hold colons); without a numeric weight
/// after it the whole argument is the file, at weight 1.
fn split(arg: &str) -> (&str, f32) {
    match arg.rsplit_once(':').and_then(|(file, weight)| Some((file, weight.parse::<f32>().ok()?))) {
        Some((file, weight)) if !file.is_empty() => (file, weight),
        _ => (arg, 1.0),
    }
}

/// The LoRA a `--lora` argument names, fetched once into the cache when it is a URL; its name
/// is the file name without extension, as Automatic1111's `<lora:name>`.
pub fn read(arg: &str) -> Result<LoraFile> {
    let (source, scale) = split(arg);
    let path = if source.starts_with("http://") || source.starts_with("https://") { download::file(source)? } else { source.into() };
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| source.to_owned());
    Ok(LoraFile { name, bytes, scale })
}

/// The prompt as the PNG records it: with a `<lora:name:weight>` tag for each LoRA, as
/// Automatic1111 writes it. A tag already there must name a `--lora` and give its weight.
pub fn tagged_prompt(prompt: &str, loras: &[LoraFile]) -> Result<String> {
    let (_, tags) = lora_tags(prompt)?;
    for tag in &tags {
        match loras.iter().find(|l| l.name == tag.name) {
            None => {
                return Err(Error::Invalid(format!("the prompt names LoRA `{}`; give its file with --lora FILE_OR_URL:WEIGHT", tag.name)));
            }
            Some(l) if l.scale != tag.weight => {
                return Err(Error::Invalid(format!("the prompt gives LoRA `{}` weight {} and --lora gives {}", tag.name, tag.weight, l.scale)));
            }
            Some(_) => {}
        }
    }
    let untagged = loras.iter().filter(|l| !tags.iter().any(|t| t.name == l.name));
    Ok(untagged.fold(prompt.to_owned(), |p, l| format!("{p} <lora:{}:{}>", l.name, l.scale)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weight_follows_the_last_colon() {
        assert_eq!(split("style.safetensors:0.8"), ("style.safetensors", 0.8));
        assert_eq!(split("https://host/x.safetensors:-1"), ("https://host/x.safetensors", -1.0));
        assert_eq!(split("https://host/x.safetensors"), ("https://host/x.safetensors", 1.0));
        assert_eq!(split("C:\\loras\\x.safetensors"), ("C:\\loras\\x.safetensors", 1.0));
    }

    #[test]
    fn the_prompt_records_every_lora_once() {
        let lora = |name: &str, scale| LoraFile { name: name.into(), bytes: vec![], scale };
        let loras = [lora("a", 0.8), lora("b", 1.0)];
        assert_eq!(tagged_prompt("cat <lora:b:1>", &loras).unwrap(), "cat <lora:b:1> <lora:a:0.8>");
        assert!(tagged_prompt("cat <lora:c:1>", &loras).unwrap_err().to_string().contains("give its file with --lora"));
        assert!(tagged_prompt("cat <lora:a:0.5>", &loras).unwrap_err().to_string().contains("weight 0.5 and --lora gives 0.8"));
    }
}
