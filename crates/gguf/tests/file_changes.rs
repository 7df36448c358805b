//! A memory-mapped file changed after it was parsed: `check_unchanged` names what changed, and a
//! private copy of the data is immune.

use std::path::PathBuf;

use kiln_gguf::{GgmlType, GgufBuilder, GgufError, GgufFile};

fn model_file(dir: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-gguf-changes-{dir}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("model.gguf");
    let mut b = GgufBuilder::new();
    b.add_str("general.architecture", "llama").add_f32_tensor("output_norm.weight", &[8], &[1.0; 8]).add_tensor(
        "token_embd.weight",
        &[32, 512],
        GgmlType::Q8_0,
        vec![0u8; 512 * 34],
    );
    b.write(&p).unwrap();
    p
}

fn changed(g: &GgufFile) -> String {
    match g.check_unchanged() {
        Err(e @ GgufError::FileChanged { .. }) => e.to_string(),
        other => panic!("expected a change, got {other:?}"),
    }
}

#[test]
fn unchanged_file_passes() {
    let p = model_file("same");
    let g = GgufFile::open(&p).unwrap();
    g.check_unchanged().unwrap();
    // Reading it (not writing) changes nothing.
    let _ = std::fs::read(&p).unwrap();
    g.check_unchanged().unwrap();
    std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
}

#[test]
fn truncation_is_detected() {
    let p = model_file("truncated");
    let g = GgufFile::open(&p).unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(100).unwrap();
    let msg = changed(&g);
    assert!(msg.contains(&format!("truncated from {len} to 100 bytes")), "{msg}");
    assert!(msg.contains(&p.display().to_string()), "{msg}");
    std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
}

#[test]
fn in_place_rewrite_is_detected() {
    let p = model_file("rewritten");
    let g = GgufFile::open(&p).unwrap();
    let before = std::fs::metadata(&p).unwrap().modified().unwrap();
    // Rewrite the same bytes' positions until the modification time moves (file systems with a
    // coarse clock need a moment).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.seek(std::io::SeekFrom::End(-16)).unwrap();
        f.write_all(&[0x55; 16]).unwrap();
        drop(f);
        if std::fs::metadata(&p).unwrap().modified().unwrap() != before {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the modification time never changed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(changed(&g).contains("modified in place"), "{}", changed(&g));
    std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
}

#[test]
fn replaced_or_removed_path_is_detected() {
    let p = model_file("replaced");
    let g = GgufFile::open(&p).unwrap();
    let other = p.with_extension("new");
    std::fs::copy(&p, &other).unwrap();
    std::fs::rename(&other, &p).unwrap();
    assert!(changed(&g).contains("the path now names another file"), "{}", changed(&g));
    std::fs::remove_file(&p).unwrap();
    assert!(changed(&g).contains("the path is gone"), "{}", changed(&g));
    std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
}

/// Once the data is a private copy the file is not read again: changes to it do not matter.
#[cfg(target_os = "linux")]
#[test]
fn private_copy_ignores_changes() {
    let p = model_file("copied");
    let mut g = GgufFile::open(&p).unwrap();
    assert!(g.copy_data_to_huge_pages().unwrap());
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(100).unwrap();
    g.check_unchanged().unwrap();
    let t = g.tensor("output_norm.weight").unwrap().clone();
    assert_eq!(&g.tensor_data(&t)[..4], &1f32.to_le_bytes());
    std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
}

/// In-memory files have no file to change.
#[test]
fn in_memory_files_always_pass() {
    let mut b = GgufBuilder::new();
    b.add_str("general.architecture", "llama");
    GgufFile::from_bytes(b.to_bytes()).unwrap().check_unchanged().unwrap();
}

/// The child half of `sigbus_in_a_truncated_map_exits_with_one_line`: does nothing unless that test
/// started it.
#[test]
fn sigbus_child() {
    let Some(p) = std::env::var_os("KILN_SIGBUS_CHILD") else { return };
    let g = GgufFile::open(&p).unwrap();
    let t = g.tensor("token_embd.weight").unwrap().clone();
    // Truncate to the header: every page of tensor data is past the end of the file now.
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(g.data_offset).unwrap();
    let sum: u64 = std::hint::black_box(g.tensor_data(&t)).iter().map(|&b| b as u64).sum();
    println!("read {sum} without a fault");
}

/// Reading the map of a truncated file raises SIGBUS; kiln's handler names the file on one line
/// and exits with status 135 (128 + SIGBUS) instead of dying without a word.
#[cfg(target_os = "linux")]
#[test]
fn sigbus_in_a_truncated_map_exits_with_one_line() {
    let p = model_file("sigbus");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sigbus_child", "--nocapture", "--test-threads", "1"])
        .env("KILN_SIGBUS_CHILD", &p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(kiln_gguf::sigbus::EXIT_STATUS), "stderr: {err}");
    assert_eq!(kiln_gguf::sigbus::EXIT_STATUS, 135);
    assert!(
        err.contains(&format!("kiln: the model file {} changed while mapped (SIGBUS): exiting\n", p.display())),
        "stderr: {err}"
    );
    std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
}
