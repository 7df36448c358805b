//! Per-layer key and value cache, f32, laid out `[position][kv_head * head_dim]`, and the checked
//! arithmetic of its size: every context length a flag or a request asks for goes through
//! [`kv_cache_bytes`] / [`check_kv_memory`] before memory is taken for it.

use crate::forward::Workspace;
use crate::{ModelConfig, ModelError};

pub struct KvCache {
    pub n_ctx: usize,
    pub kv_dim: usize,
    /// `keys[layer][pos * kv_dim ..]`
    pub keys: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    /// Positions filled so far.
    pub len: usize,
    /// The forward pass's work buffers for this sequence, reused from call to call.
    pub(crate) buffers: Workspace,
}

impl KvCache {
    /// [`Self::try_new`] for sizes already checked ([`check_kv_memory`]); panics with the reason
    /// where `try_new` would fail.
    pub fn new(cfg: &ModelConfig, n_ctx: usize) -> KvCache {
        KvCache::try_new(cfg, n_ctx).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A cache for `n_ctx` positions, zero-initialised, so the OS only commits pages as positions
    /// are filled. Fails, instead of overflowing or aborting the process, when the size does not
    /// fit the address space or the allocator refuses it.
    pub fn try_new(cfg: &ModelConfig, n_ctx: usize) -> Result<KvCache, ModelError> {
        let kv_dim = cfg.kv_dim();
        let per_layer = layer_bytes(cfg, n_ctx)
            .filter(|&b| b <= isize::MAX as u64)
            .ok_or_else(|| ModelError::Memory(overflow_message(cfg, n_ctx, 1)))?;
        let refused = || {
            ModelError::Memory(format!(
                "the allocator refused the KV cache of {n_ctx} positions ({} per layer and tensor)",
                human_bytes(per_layer)
            ))
        };
        let len = n_ctx * kv_dim; // per_layer = len × 4 fits in isize: no overflow
        let mut keys = Vec::with_capacity(cfg.n_layer);
        let mut values = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            keys.push(zeroed(len).ok_or_else(refused)?);
            values.push(zeroed(len).ok_or_else(refused)?);
        }
        Ok(KvCache { n_ctx, kv_dim, keys, values, len: 0, buffers: Workspace::default() })
    }

    /// Forgets positions from `len` on (they are overwritten by the next forward).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Makes every page of the cache resident now (writes a zero into each), as llama.cpp's
    /// server does by clearing its KV buffer at start: a server's memory is then taken once, when
    /// it starts (and checked against what is available: [`check_kv_memory`]), instead of growing
    /// under load as long prompts reach positions no request reached before.
    pub fn commit(&mut self) {
        // Four KiB pages hold 1024 f32s; a write to each is enough (larger pages are touched too).
        const PER_PAGE: usize = 4096 / std::mem::size_of::<f32>();
        for v in self.keys.iter_mut().chain(self.values.iter_mut()) {
            for i in (0..v.len()).step_by(PER_PAGE) {
                // An opaque value: the compiler may not drop the store as writing what calloc'd
                // memory already holds.
                v[i] = std::hint::black_box(0.0);
            }
        }
    }

    /// Bytes held when full.
    pub fn capacity_bytes(&self) -> usize {
        2 * self.keys.len() * self.n_ctx * self.kv_dim * std::mem::size_of::<f32>()
    }
}

/// `len` zeroed f32s, or `None` where the allocator refuses (where `vec![0.0; len]` would abort the
/// process). Zeroed memory comes from `calloc`/fresh pages: nothing is written, nothing committed.
fn zeroed(len: usize) -> Option<Vec<f32>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(len).ok()?;
    // SAFETY: `layout` has a non-zero size (len > 0). A non-null result is an allocation of the
    // global allocator with f32's alignment and room for exactly `len` f32s, all bits zero, which
    // is 0.0: a valid Vec<f32> buffer of length and capacity `len` (what `vec![0.0; len]` builds).
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<f32>();
        if p.is_null() {
            None
        } else {
            Some(Vec::from_raw_parts(p, len, len))
        }
    }
}

/// Bytes of one layer's keys (or values) for `n_ctx` positions.
fn layer_bytes(cfg: &ModelConfig, n_ctx: usize) -> Option<u64> {
    (n_ctx as u64).checked_mul(cfg.kv_dim() as u64)?.checked_mul(std::mem::size_of::<f32>() as u64)
}

/// Bytes of keys and values for `n_ctx` positions in every layer (`2 × n_layer × n_ctx × kv_dim ×
/// 4`), or `None` when that overflows a u64.
pub fn kv_cache_bytes(cfg: &ModelConfig, n_ctx: usize) -> Option<u64> {
    layer_bytes(cfg, n_ctx)?.checked_mul(2)?.checked_mul(cfg.n_layer as u64)
}

/// Checks that `n_slots` caches of `n_ctx` positions have a size (no overflow, each layer's buffer
/// addressable) and fit in the memory available now ([`available_memory`]; where that is unknown,
/// only the size is checked). Returns their total bytes. The error is one line naming the size
/// and how it was reckoned; callers put the flags that chose it in front (`--ctx N: …`).
pub fn check_kv_memory(cfg: &ModelConfig, n_ctx: usize, n_slots: usize) -> Result<u64, ModelError> {
    let total = layer_bytes(cfg, n_ctx)
        .filter(|&b| b <= isize::MAX as u64)
        .and_then(|_| kv_cache_bytes(cfg, n_ctx))
        .and_then(|b| b.checked_mul(n_slots as u64))
        .ok_or_else(|| ModelError::Memory(overflow_message(cfg, n_ctx, n_slots)))?;
    if let Some(available) = available_memory() {
        if total > available {
            return Err(ModelError::Memory(format!(
                "{} {} {} of KV cache ({}); {} of memory are available",
                what(n_ctx, n_slots),
                if n_slots == 1 { "needs" } else { "need" },
                human_bytes(total),
                reckoning(cfg, n_ctx, n_slots),
                human_bytes(available)
            )));
        }
    }
    Ok(total)
}

fn what(n_ctx: usize, n_slots: usize) -> String {
    match n_slots {
        1 => format!("a context of {n_ctx} positions"),
        n => format!("{n} slots of {n_ctx} positions"),
    }
}

fn reckoning(cfg: &ModelConfig, n_ctx: usize, n_slots: usize) -> String {
    let slots = if n_slots == 1 { String::new() } else { format!("{n_slots} slots × ") };
    format!(
        "{slots}{} layers × {n_ctx} positions × {} values × 2 (keys and values) × 4 bytes",
        cfg.n_layer,
        cfg.kv_dim()
    )
}

fn overflow_message(cfg: &ModelConfig, n_ctx: usize, n_slots: usize) -> String {
    format!(
        "{} is too large: its KV cache ({}) overflows the address space",
        what(n_ctx, n_slots),
        reckoning(cfg, n_ctx, n_slots)
    )
}

/// Memory the OS says new allocations can take without swapping (Linux: `MemAvailable` in
/// /proc/meminfo); `None` where unknown.
pub fn available_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        parse_mem_available(&text)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// The `MemAvailable:  N kB` line of /proc/meminfo, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut parts = line.split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// `12.3 GiB`, `512.0 MiB`, `900 bytes`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       24542336 kB\nMemFree:        19030016 kB\nMemAvailable:   22812416 kB\n";
        assert_eq!(parse_mem_available(text), Some(22812416 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: 18446744073709551615 kB\n"), None);
        #[cfg(target_os = "linux")]
        assert!(available_memory().is_some_and(|b| b > 0));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(900), "900 bytes");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12 << 30), "12.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }
}
