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
        // The file name says the architecture: `synth-tiny-*` are Llama, `synth-ARCH-tiny-*` ARCH.
        let name = p.file_name().and_then(|s| s.to_str()).unwrap_or_default();
        let rest = name.strip_prefix("synth-").unwrap_or_else(|| panic!("unexpected synth model name {name}"));
        let arch = match rest.split_once("-tiny-") {
            _ if rest.starts_with("tiny-") => "llama",
            Some((arch, _)) => arch,
            None => panic!("unexpected synth model name {name}"),
        };
        assert_eq!(g.architecture(), Some(arch), "{}", p.display());
        assert!(g.tensor("token_embd.weight").is_some());
        n += 1;
    }
    assert_eq!(n, 23);
}

/// The copy of the data section holds every tensor's bytes exactly (read back through
/// `tensor_data`, compared with the mapped file's), on Linux; elsewhere no copy is made.
#[test]
fn huge_page_copy_holds_the_same_tensor_bytes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth");
    for name in ["synth-tiny-Q4_K.gguf", "synth-tiny-mixed.gguf", "synth-tiny-F16.gguf"] {
        let mapped = GgufFile::open(dir.join(name)).expect("open");
        let mut copied = GgufFile::open(dir.join(name)).expect("open");
        let made = copied.copy_data_to_huge_pages().expect("copy");
        assert_eq!(made, cfg!(target_os = "linux"), "{name}");
        assert_eq!(copied.tensors, mapped.tensors);
        for t in &mapped.tensors {
            assert!(copied.tensor_data(t) == mapped.tensor_data(t), "{name}: {}", t.name);
        }
        // In-memory files have no file to copy from and keep their bytes.
        let mut owned = GgufFile::from_bytes(mapped.bytes().to_vec()).expect("parse");
        assert!(!owned.copy_data_to_huge_pages().expect("no copy"));
        let t = &mapped.tensors[0];
        assert!(owned.tensor_data(t) == mapped.tensor_data(t));
    }
}
