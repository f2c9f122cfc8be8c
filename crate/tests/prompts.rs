//! Automatic1111's prompt syntax against the reference in scripts/make_fixtures.py
//! (tests/fixtures/prompts): the same chunks and weights from both tokenizers, and the same
//! images from its chunked, weighted text states (max ≤ 3/255, mean ≤ 0.5/255).
mod common;

use serde::Deserialize;

use kiln::files::Folder;
use kiln::model::tokenizer::{ClipTokenizer, TokenizerFiles};
use kiln::npy;
use kiln::pipeline::prompt::{self, Chunk, Piece};
use kiln::pipeline::{Request, StableDiffusion};
use kiln::schedulers::SchedulerKind;

#[derive(Deserialize)]
struct Cases {
    pieces: Vec<PieceCase>,
    chunks: Vec<ChunkCase>,
    images: Vec<ImageCase>,
}

/// A random prompt and the reference's pieces (`null` for a BREAK), or its error.
#[derive(Deserialize)]
struct PieceCase {
    prompt: String,
    pieces: Option<Vec<Option<(String, f64)>>>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct ChunkCase {
    prompt: String,
    #[serde(rename = "sd1-tiny")]
    sd1: Vec<ExpectedChunk>,
    #[serde(rename = "sd2-tiny")]
    sd2: Vec<ExpectedChunk>,
}

#[derive(Deserialize)]
struct ExpectedChunk {
    ids: Vec<u32>,
    weights: Vec<f32>,
}

#[derive(Deserialize)]
struct ImageCase {
    name: String,
    model: String,
    scheduler: String,
    prompt: String,
    negative_prompt: String,
    steps: usize,
    guidance: f64,
    latents: String,
    image: String,
    /// Chunks of the prompt and of the negative prompt.
    chunks: [usize; 2],
    /// diffusers' own image of the prompt, cut at 77 tokens.
    truncated: Option<String>,
}

fn cases() -> Cases {
    let text = std::fs::read_to_string(common::fixtures().join("prompts/cases.json")).expect("prompts/cases.json");
    serde_json::from_str(&text).expect("parses")
}

fn tokenizer(model: &str) -> ClipTokenizer {
    let files = TokenizerFiles::read(&Folder(common::fixtures().join(model)), "tokenizer").expect("tokenizer files");
    ClipTokenizer::load(&files, 77).expect("tokenizer loads")
}

#[test]
fn random_prompts_parse_as_the_reference_does() {
    let cases = cases().pieces;
    assert!(cases.len() >= 2000 && cases.iter().filter(|c| c.error.is_some()).count() >= 10);
    for case in cases {
        let ours = prompt::parse(&case.prompt);
        match (ours, case.pieces) {
            (Ok(ours), Some(theirs)) => {
                // serde_json reads some floats 1 ulp off (no `float_roundtrip`), so weights compare within 1e-12.
                let same = |a: &Piece, b: &Option<(String, f64)>| match (a, b) {
                    (Piece::Text(t, w), Some((u, v))) => t == u && (w - v).abs() < 1e-12,
                    (Piece::Break, None) => true,
                    _ => false,
                };
                assert!(ours.len() == theirs.len() && ours.iter().zip(&theirs).all(|(a, b)| same(a, b)), "{:?}: {ours:?} vs {theirs:?}", case.prompt);
            }
            (Err(e), None) => assert!(e.to_string().contains("is not a number"), "{:?}: {e} (reference: {:?})", case.prompt, case.error),
            (ours, _) => panic!("{:?}: ours {ours:?}, reference {:?}", case.prompt, case.error),
        }
    }
}

#[test]
fn chunks_equal_the_reference() {
    let cases = cases().chunks;
    assert!(cases.len() >= 10);
    let (sd1, sd2) = (tokenizer("sd1-tiny"), tokenizer("sd2-tiny"));
    for case in &cases {
        for (tokenizer, expected, model) in [(&sd1, &case.sd1, "SD 1"), (&sd2, &case.sd2, "SD 2")] {
            let ours = prompt::chunks(tokenizer, &case.prompt).expect("parses");
            let ours: Vec<_> = ours.iter().map(|c| (&c.ids, &c.weights)).collect();
            let theirs: Vec<_> = expected.iter().map(|c| (&c.ids, &c.weights)).collect();
            assert_eq!(ours, theirs, "{model}: {:?}", case.prompt);
        }
    }
}

/// Without syntax and within 75 tokens a prompt is one chunk of exactly diffusers' ids, all
/// weighted 1, so its text states are today's.
#[test]
fn plain_short_prompts_are_one_unweighted_chunk_of_diffusers_ids() {
    let sd1 = tokenizer("sd1-tiny");
    let text = std::fs::read_to_string(common::fixtures().join("tokenizer_cases.json")).expect("tokenizer_cases.json");
    let cases: serde_json::Value = serde_json::from_str(&text).expect("parses");
    let mut checked = 0;
    for prompt in cases["cases"].as_array().expect("cases").iter().filter_map(|c| c["prompt"].as_str()) {
        let diffusers = sd1.encode(prompt).expect("encodes");
        if diffusers.dropped > 0 || prompt.contains(['(', ')', '[', ']', '\\', ':']) || prompt.contains("BREAK") {
            continue;
        }
        let ours = prompt::chunks(&sd1, prompt).expect("parses");
        assert_eq!(ours, vec![Chunk { ids: diffusers.ids, weights: vec![1.0; 77] }], "{prompt:?}");
        checked += 1;
    }
    assert!(checked >= 100, "only {checked} plain prompts");
}

#[test]
fn images_equal_the_reference() {
    let device = common::wgpu();
    let mut pipes = common::Pipelines::new(&device);
    let mut parity = common::Parity::default();
    let dir = common::fixtures().join("prompts");
    for case in cases().images {
        let pipe = pipes.get(&case.model);
        let tokenizer = tokenizer(&case.model);
        let count = |text: &str| prompt::chunks(&tokenizer, text).expect("parses").len();
        assert_eq!([count(&case.prompt), count(&case.negative_prompt)], case.chunks, "{}: chunks", case.name);
        let ours = generate(pipe, &case, &dir);
        let (theirs, ..) = common::read_png(&std::fs::read(dir.join(&case.image)).expect("reference"));
        parity.check(&case.name, &ours, &theirs);
        if let Some(truncated) = &case.truncated {
            let (cut, ..) = common::read_png(&std::fs::read(dir.join(truncated)).expect("truncated reference"));
            let (max, mean) = common::pixel_diff(&ours, &cut);
            assert!(max > 30 && mean > 3.0, "{}: the whole prompt must change the image (max {max}, mean {mean:.2} from the cut one)", case.name);
        }
    }
    parity.finish();
}

fn generate(pipe: &StableDiffusion, case: &ImageCase, dir: &std::path::Path) -> Vec<u8> {
    let request = Request {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        steps: Some(case.steps),
        guidance: Some(case.guidance),
        scheduler: Some(SchedulerKind::from_name(&case.scheduler).expect("scheduler name")),
        latents: Some(npy::read(&dir.join(&case.latents)).expect("latents")),
        ..Default::default()
    };
    common::finish(pipe, pipe.start(request).expect("request is valid")).0
}
