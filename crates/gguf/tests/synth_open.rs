use kiln_gguf::GgufFile;

#[test]
fn every_synth_model_opens() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("shared/models/synth") {
        let p = e.unwrap().path();
        if p.extension().and_then(|s| s.to_str()) != Some("gguf") {
            continue;
        }
        let g = GgufFile::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(g.architecture(), Some("llama"), "{}", p.display());
        assert!(g.tensor("token_embd.weight").is_some());
        n += 1;
    }
    assert_eq!(n, 17);
}
