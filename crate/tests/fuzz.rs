//! Generated hostile inputs (proptest) for every parser that takes bytes from outside: a
//! weight file's safetensors header (with the file, and alone as the page reads it), the
//! tensors the page hands over one by one, a Kiln package (manifest and shards), PNGs (input
//! images and PNG info), `.npy`, the tokenizer and the prompt syntax. Inputs start from valid
//! seeds and are mutated where the format is fragile (numbers in headers, lengths, chunk fields
//! with their CRCs fixed), so most get past the first check.
//!
//! What must hold for every input: no panic, an error that says something, and no single
//! allocation above [`ALLOCATION_LIMIT`] (a header that claims gigabytes is refused before
//! anything is allocated for it). Each target runs for `KILN_FUZZ_SECONDS` (default 60) and
//! prints how many inputs it tried.
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use kiln::files::MemoryFiles;
use kiln::model::tokenizer::{ClipTokenizer, TokenizerFiles};
use kiln::pipeline::image_processor::Image8;
use kiln::pipeline::{infotext, prompt};
use kiln::quant::Format;
use kiln::weights::Uploaded;
use kiln::{npy, package};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// The largest allocation any input may cause: the pixels of the largest PNG Kiln reads (64
/// megapixels as 8-bit RGBA), with room to spare. Seeds are a few kilobytes.
const ALLOCATION_LIMIT: usize = 300 << 20;

/// Passes every request to the system allocator, noting the largest on this thread.
struct Watched;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Watched {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    // `try_with`: the slot is gone while the thread's own storage is torn down.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

#[global_allocator]
static ALLOCATOR: Watched = Watched;

/// Runs `check` on inputs drawn from `inputs` until the time is up, failing with the
/// smallest input that panics, fails `check` or allocates too much.
fn fuzz<S: Strategy>(target: &str, inputs: S, check: impl Fn(S::Value) -> Result<(), String>)
where
    S::Value: std::fmt::Debug,
{
    let seconds = std::env::var("KILN_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let batch = 64;
    let config = Config { cases: batch, failure_persistence: None, ..Config::default() };
    // A runner counts its passes towards `cases` for good, so each batch gets a fresh one,
    // seeded from this one's random stream.
    let mut seeds = TestRunner::new(config.clone());
    let mut tried = 0;
    while Instant::now() < deadline {
        let mut runner = TestRunner::new_with_rng(config.clone(), seeds.new_rng());
        let outcome = runner.run(&inputs, |input| {
            LARGEST.with(|l| l.set(0));
            check(input).map_err(TestCaseError::fail)?;
            let largest = LARGEST.with(Cell::get);
            prop_assert!(largest <= ALLOCATION_LIMIT, "allocated {largest} bytes at once");
            Ok(())
        });
        if let Err(failure) = outcome {
            panic!("{target}: {failure}");
        }
        tried += batch;
    }
    println!("fuzz {target}: {tried} inputs, no failure");
}

/// An error must say what is wrong.
fn refused(e: impl std::fmt::Display) -> Result<(), String> {
    let msg = e.to_string();
    if msg.trim().is_empty() { Err("an error without a message".into()) } else { Ok(()) }
}

/// One change to a byte string.
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Remove(usize, usize),
    Insert(usize, Vec<u8>),
    Truncate(usize),
    /// A number in the text (a length, shape, offset) replaced by a hostile one.
    Number(usize, &'static str),
    /// Eight bytes replaced by a little-endian length.
    Length(usize, u64),
}

/// Numbers that break arithmetic and allocation.
const NUMBERS: [&str; 14] = [
    "0",
    "1",
    "3",
    "-1",
    "65",
    "4096",
    "2147483648",
    "4294967296",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "100000000000",
    "1e308",
    "0.5",
];

const TOKENS: [&[u8]; 12] = [b"\"", b"[", b"]", b"{", b"}", b",", b":", b"\\", b"\0", b"\xff\xfe", b"null", b"\"F64\""];

fn edit() -> impl Strategy<Value = Edit> {
    let pos = any::<prop::sample::Index>().prop_map(|i| i.index(1 << 20));
    prop_oneof![
        (pos.clone(), any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
        (pos.clone(), 1..64usize).prop_map(|(p, n)| Edit::Remove(p, n)),
        (pos.clone(), prop::sample::select(TOKENS.to_vec())).prop_map(|(p, t)| Edit::Insert(p, t.to_vec())),
        pos.clone().prop_map(Edit::Truncate),
        (pos.clone(), prop::sample::select(NUMBERS.to_vec())).prop_map(|(p, n)| Edit::Number(p, n)),
        (pos, prop::sample::select(vec![0, 7, 1 << 20, 100 << 30, u64::MAX / 2, u64::MAX])).prop_map(|(p, n)| Edit::Length(p, n)),
    ]
}

/// Applies `edits` to `bytes`; positions wrap to the current length.
fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % len };
        match edit {
            Edit::Set(p, b) if !bytes.is_empty() => {
                let i = at(*p, bytes.len());
                bytes[i] = *b;
            }
            Edit::Remove(p, n) => {
                let i = at(*p, bytes.len());
                bytes.drain(i..(i + n).min(bytes.len()));
            }
            Edit::Insert(p, t) => {
                let i = at(*p, bytes.len() + 1);
                bytes.splice(i..i, t.iter().copied());
            }
            Edit::Truncate(p) => bytes.truncate(at(*p, bytes.len() + 1)),
            Edit::Number(p, n) => {
                let digits: Vec<(usize, usize)> = number_spans(&bytes);
                if let Some(&(start, end)) = digits.get(at(*p, digits.len().max(1))) {
                    bytes.splice(start..end, n.bytes());
                }
            }
            Edit::Length(p, n) if bytes.len() >= 8 => {
                let i = at(*p, bytes.len() - 7);
                bytes[i..i + 8].copy_from_slice(&n.to_le_bytes());
            }
            _ => {}
        }
    }
    bytes
}

/// Where the decimal numbers are in a text.
fn number_spans(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            spans.push((start, i));
        }
        i += 1;
    }
    spans
}

/// One of `seeds`, edited up to six times.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (prop::sample::select(seeds), prop::collection::vec(edit(), 0..6)).prop_map(|(seed, edits)| apply(seed, &edits))
}

fn cpu() -> Device {
    Device::flex()
}

/// A small weight file with every dtype the engine reads and one it skips.
fn safetensors_seed() -> Vec<u8> {
    use safetensors::{Dtype, tensor::TensorView};
    let f32s: Vec<u8> = (0..8).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
    let halves: Vec<u8> = (0..64).flat_map(|i| half::f16::from_f32(i as f32 / 8.0).to_le_bytes()).collect();
    let brains: Vec<u8> = (0..4).flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes()).collect();
    let ids: Vec<u8> = (0..4i64).flat_map(i64::to_le_bytes).collect();
    let views = vec![
        ("a.weight", TensorView::new(Dtype::F32, vec![2, 4], &f32s).unwrap()),
        ("b.weight", TensorView::new(Dtype::F16, vec![2, 32], &halves).unwrap()),
        ("c.bias", TensorView::new(Dtype::BF16, vec![4], &brains).unwrap()),
        ("position_ids", TensorView::new(Dtype::I64, vec![1, 4], &ids).unwrap()),
    ];
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn safetensors_file() {
    let seeds = vec![safetensors_seed()];
    let seed = MemoryFiles { name: "seed".into(), files: HashMap::from([("unet/x.safetensors".to_string(), seeds[0].clone())]) };
    Uploaded::from_file(&seed, "unet/x", None, &Default::default(), &cpu()).expect("the seed is a valid weight file");
    fuzz("safetensors file", (mutated(seeds), prop::sample::select(vec![None, Some(Format::F16), Some(Format::Q8), Some(Format::Q4)])), |(bytes, format)| {
        let files = MemoryFiles { name: "fuzz".into(), files: HashMap::from([("unet/x.safetensors".to_string(), bytes)]) };
        match Uploaded::from_file(&files, "unet/x", format, &Default::default(), &cpu()) {
            Ok(_) => Ok(()),
            Err(e) => refused(e),
        }
    });
}

/// LoRA files (kohya and PEFT seeds), read and merged into a weight of the shape they were made for.
#[test]
fn lora_file() {
    use kiln::lora::{LoraFile, Loras};
    use safetensors::{Dtype, tensor::TensorView};
    let f32s = |n: usize| -> Vec<u8> { (0..n).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect() };
    let (down, up, alpha) = (f32s(6), f32s(4), f32s(1));
    let kohya = safetensors::serialize(
        vec![
            ("lora_unet_proj.lora_down.weight", TensorView::new(Dtype::F32, vec![2, 3, 1, 1], &down).unwrap()),
            ("lora_unet_proj.lora_up.weight", TensorView::new(Dtype::F32, vec![2, 2, 1, 1], &up).unwrap()),
            ("lora_unet_proj.alpha", TensorView::new(Dtype::F32, vec![], &alpha).unwrap()),
        ],
        None,
    )
    .unwrap();
    let peft = safetensors::serialize(
        vec![
            ("unet.proj.lora_A.weight", TensorView::new(Dtype::F32, vec![2, 3], &down).unwrap()),
            ("unet.proj.lora_B.weight", TensorView::new(Dtype::F32, vec![2, 2], &up).unwrap()),
        ],
        None,
    )
    .unwrap();
    fuzz("LoRA file", mutated(vec![kohya, peft]), |bytes| {
        let loras = match Loras::read(&[LoraFile { name: "fuzz".into(), bytes, scale: 0.5 }]) {
            Ok(loras) => loras,
            Err(e) => return refused(e),
        };
        let merged = loras.merge("unet/diffusion_pytorch_model", "proj.weight", &[2, 3, 1, 1], &mut [0.0; 6]).and_then(|()| loras.check_all_merged());
        merged.or_else(refused)
    });
}

/// The page has the engine read a weight file's header from its first bytes
/// (`safetensors_header`): what it accepts must describe tensors that lie, in order, inside
/// the file it implies.
#[test]
fn safetensors_header_alone() {
    use kiln::safetensors_header::{header_length, parse};
    fuzz("safetensors header", mutated(vec![safetensors_seed()]), |bytes| {
        let n = match header_length(&bytes) {
            Ok(n) => n as usize,
            Err(e) => return refused(e),
        };
        let Some(json) = bytes.get(8..8 + n) else { return Ok(()) };
        match parse(json) {
            Ok(header) => {
                let start = 8 + n as u64;
                let ordered = header.tensors.windows(2).all(|pair| pair[0].begin <= pair[1].begin);
                let inside = header.tensors.iter().all(|t| start <= t.begin && t.begin <= t.end && t.end <= header.file_size);
                if ordered && inside { Ok(()) } else { Err(format!("accepted an inconsistent header: {header:?}")) }
            }
            Err(e) => refused(e),
        }
    });
}

/// The page hands the engine each tensor's dtype, shape and bytes (`add_tensor`), or a
/// package's stored ones (`add_stored`).
#[test]
fn tensor_upload() {
    let dims = prop_oneof![0..70usize, Just(1 << 31), Just(1 << 32), Just(usize::MAX / 3), Just(usize::MAX)];
    let tensor = (
        prop::sample::select(vec!["text_encoder/model", "unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model"]),
        prop::sample::select(vec!["a.weight", "token_embedding.weight", "encoder.conv.weight", "norm.bias"]),
        prop::sample::select(vec!["F32", "F16", "BF16", "I64", "F8_E4M3", ""]),
        prop::sample::select(Format::ALL.to_vec()),
        prop::collection::vec(dims, 0..5),
        prop::collection::vec(any::<u8>(), 0..600),
    );
    fuzz("tensor upload", tensor, |(stem, name, dtype, format, shape, bytes)| {
        let mut up = Uploaded::new(stem, "fuzz");
        let converted = up.add_safetensors(name, dtype, shape.clone(), &bytes, format, &cpu());
        let stored = up.add(name, shape, format, &bytes, &cpu());
        converted.err().map_or(Ok(()), refused)?;
        stored.err().map_or(Ok(()), refused)
    });
}

/// A package of three small weight files, as `kiln pack` writes it, in memory.
fn package_seed(format: Format) -> HashMap<String, Vec<u8>> {
    let weights = safetensors_seed();
    let mut files = HashMap::from([("model_index.json".to_string(), br#"{"_class_name": "StableDiffusionPipeline"}"#.to_vec())]);
    for stem in kiln::pipeline::family::FAMILIES[0].weight_stems() {
        files.insert(format!("{stem}.safetensors"), weights.clone());
    }
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-package-{}-{}", std::process::id(), format.name()));
    package::pack(&MemoryFiles { name: "seed".into(), files }, format, &dir).expect("pack");
    let read: HashMap<String, Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap())
        })
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();
    read
}

#[test]
fn package_manifest_and_shards() {
    let seeds: Vec<HashMap<String, Vec<u8>>> = [Format::F32, Format::Q4].map(package_seed).into();
    for seed in &seeds {
        package::load(&MemoryFiles { name: "seed".into(), files: seed.clone() }, &Default::default(), &cpu()).expect("the seeds are valid packages");
    }
    let manifests = seeds.iter().map(|s| s[package::MANIFEST].clone()).collect();
    let which = prop::sample::select(vec![0usize, 1]);
    fuzz("package", (which, mutated(manifests), prop::collection::vec(edit(), 0..2)), |(which, manifest, shard_edits)| {
        let mut files = seeds[which % seeds.len()].clone();
        files.insert(package::MANIFEST.into(), manifest);
        if let Some(shard) = files.get_mut("shard-00000.bin") {
            *shard = apply(std::mem::take(shard), &shard_edits);
        }
        match package::load(&MemoryFiles { name: "fuzz".into(), files }, &Default::default(), &cpu()) {
            Ok(_) => Ok(()),
            Err(e) => refused(e),
        }
    });
}

/// A PNG as Kiln writes it (RGB with a `parameters` text), and one as diffusers saves it.
fn png_seeds() -> Vec<Vec<u8>> {
    let rgb: Vec<u8> = (0..8 * 8 * 3).map(|i| (i * 7) as u8).collect();
    let text = "a cat, (best:1.2)\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 8x8";
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images");
    vec![kiln::pipeline::png::encode(&rgb, 8, 8, text).unwrap(), std::fs::read(dir.join("sd1-ddim-neg.png")).unwrap()]
}

/// Recomputes every chunk's CRC, so that edits inside chunks reach the parser.
fn fix_crcs(mut bytes: Vec<u8>) -> Vec<u8> {
    let mut at = 8;
    while at + 12 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&end| end + 4 <= bytes.len()) else { break };
        let crc = crc32fast::hash(&bytes[at + 4..end]);
        bytes[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
    bytes
}

#[test]
fn png_image_and_info() {
    let seeds = png_seeds();
    for seed in &seeds {
        Image8::decode_png(seed).expect("the seeds are valid PNGs");
    }
    assert!(infotext::read_png(&seeds[0]).expect("readable").is_some(), "Kiln's seed carries parameters");
    let inputs = (mutated(seeds), any::<bool>()).prop_map(|(bytes, fix)| if fix { fix_crcs(bytes) } else { bytes });
    fuzz("png", inputs, |bytes| {
        if let Err(e) = Image8::decode_png(&bytes) {
            refused(e)?;
        }
        match infotext::read_png(&bytes) {
            Ok(text) => {
                infotext::Infotext::parse(text.as_deref().unwrap_or_default()).settings();
                Ok(())
            }
            Err(e) => refused(e),
        }
    });
}

#[test]
fn infotext() {
    let line = "[a-zA-Z ]{0,12}(: ?[-0-9.x\"\\\\, ]{0,12})?";
    let text = prop_oneof![any::<String>(), prop::collection::vec(line, 0..12).prop_map(|fields| fields.join(", ")), "(\\PC|\n){0,300}"];
    fuzz("infotext", text, |text| {
        infotext::Infotext::parse(&text).settings();
        Ok(())
    });
}

fn npy_seeds() -> Vec<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-npy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("seed.npy");
    npy::write(&path, &npy::Array { shape: vec![1, 2, 3], values: vec![0.5; 6] }).unwrap();
    let written = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images/sd1-ddim-neg.latents.npy");
    vec![written, std::fs::read(fixture).unwrap()]
}

#[test]
fn npy_arrays() {
    for seed in npy_seeds() {
        npy::parse(&seed).expect("the seeds are valid arrays");
    }
    fuzz("npy", mutated(npy_seeds()), |bytes| match npy::parse(&bytes) {
        Ok(array) if array.values.len() != array.shape.iter().product::<usize>() => Err(format!("{} values for shape {:?}", array.values.len(), array.shape)),
        Ok(_) => Ok(()),
        Err(e) => refused(e),
    });
}

fn tokenizer() -> ClipTokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd1-tiny");
    ClipTokenizer::load(&TokenizerFiles::read(&kiln::files::Folder(dir), "tokenizer").unwrap(), 77).unwrap()
}

/// Text made of the prompt syntax's pieces, and any text at all.
fn prompts() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec!["(", ")", "[", "]", ":", "\\", "BREAK", " BREAK ", ",", "1.5", "-2", "1e400", "1.2.3", "cat", " ", "\u{1F600}", "é", "\n", "</w>", "<|endoftext|>"]);
    prop_oneof![any::<String>(), prop::collection::vec(piece, 0..200).prop_map(|p| p.concat())]
}

#[test]
fn tokenizer_input() {
    let tokenizer = tokenizer();
    let bound = tokenizer.id_bound() as u32;
    fuzz("tokenizer", any::<String>(), |text| match tokenizer.tokenize(&text) {
        Ok(ids) if ids.iter().any(|&id| id >= bound) => Err(format!("token id beyond the vocabulary in {ids:?}")),
        Ok(_) => Ok(()),
        Err(e) => refused(e),
    });
}

#[test]
fn prompt_syntax() {
    let tokenizer = tokenizer();
    fuzz("prompt", prompts(), |text| {
        if let Err(e) = prompt::parse(&text) {
            return refused(e);
        }
        match prompt::chunks(&tokenizer, &text) {
            Ok(chunks) if chunks.iter().any(|c| c.ids.len() != 77 || c.weights.len() != 77) => Err("a chunk that is not 77 tokens".into()),
            Ok(chunks) if chunks.iter().flat_map(|c| &c.weights).any(|w| !w.is_finite()) => Err("a weight that is not finite".into()),
            Ok(_) => Ok(()),
            Err(e) => refused(e),
        }
    });
}
