//! Token ids equal transformers' `CLIPTokenizer` (as diffusers calls it) on the prompts in
//! tests/fixtures/tokenizer_cases.json, for SD 1.x (pads with the end token) and SD 2.x (pads with "!").
mod common;

use serde::Deserialize;

use kiln::files::Folder;
use kiln::model::tokenizer::{ClipTokenizer, TokenizerFiles};

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    sd1: Vec<u32>,
    sd2: Vec<u32>,
    untruncated_len: usize,
    /// SD 2.x's pad "!" is a special token, so its count can differ.
    sd2_untruncated_len: Option<usize>,
}

fn tokenizer(model: &str) -> ClipTokenizer {
    let files = TokenizerFiles::read(&Folder(common::fixtures().join(model)), "tokenizer").expect("tokenizer files");
    ClipTokenizer::load(&files, 77).expect("tokenizer loads")
}

#[test]
fn ids_equal_transformers() {
    let text = std::fs::read_to_string(common::fixtures().join("tokenizer_cases.json")).expect("tokenizer_cases.json");
    let cases: Cases = serde_json::from_str(&text).expect("parses");
    assert!(cases.cases.len() >= 200, "at least 200 prompts");
    let (sd1, sd2) = (tokenizer("sd1-tiny"), tokenizer("sd2-tiny"));
    let mut failures = Vec::new();
    for case in &cases.cases {
        let ours1 = sd1.encode(&case.prompt).expect("encodes");
        let ours2 = sd2.encode(&case.prompt).expect("encodes");
        if ours1.ids != case.sd1 || ours2.ids != case.sd2 {
            failures.push(format!("{:?}\n  ours   {:?} / {:?}\n  theirs {:?} / {:?}", case.prompt, ours1.ids, ours2.ids, case.sd1, case.sd2));
        }
        // Untruncated: start + body + end; whatever exceeds 77 was dropped.
        assert_eq!(ours1.dropped, case.untruncated_len.saturating_sub(77), "SD 1 dropped count for {:?}", case.prompt);
        let sd2_len = case.sd2_untruncated_len.unwrap_or(case.untruncated_len);
        assert_eq!(ours2.dropped, sd2_len.saturating_sub(77), "SD 2 dropped count for {:?}", case.prompt);
    }
    assert!(failures.is_empty(), "{} of {} prompts differ:\n{}", failures.len(), cases.cases.len(), failures.join("\n"));
}

#[test]
fn pads_as_each_family_does() {
    let one = tokenizer("sd1-tiny").encode("a cat").expect("encodes").ids;
    let two = tokenizer("sd2-tiny").encode("a cat").expect("encodes").ids;
    assert_eq!(&one[..4], &[49406, 320, 2368, 49407]);
    assert_eq!(&one[4..], &[49407; 73]);
    assert_eq!(&two[..4], &[49406, 320, 2368, 49407]);
    assert_eq!(&two[4..], &[0; 73]);
}
