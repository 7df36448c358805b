//! Parsing and validating a GGUF file. Tensor data is borrowed from the memory map, never copied.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{GgufError, Result};
use crate::ggml_type::GgmlType;
use crate::value::{Array, Value, ValueType};

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const MAX_DIMS: u32 = 4;
/// Deeper nesting than this is refused: no real file nests arrays, and unbounded recursion
/// on hostile input would overflow the stack.
pub const MAX_ARRAY_NESTING: usize = 8;

/// The bytes of a GGUF file: a read-only memory map, or an owned buffer (tests, fuzzing).
pub enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// One tensor's entry in the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (contiguous), `dims[1]` the number of rows, …
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Elements per row (`dims[0]`).
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }
    /// Number of rows (product of all dims but the first).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }
    pub fn row_bytes(&self) -> usize {
        self.row_len() / self.ggml_type.block_size() * self.ggml_type.type_size()
    }
}

/// The data section copied into anonymous memory: `map[start..start + len]`
/// ([`GgufFile::copy_data_to_huge_pages`]).
struct ResidentData {
    map: memmap2::MmapMut,
    start: usize,
    len: usize,
}

/// A parsed GGUF file.
pub struct GgufFile {
    pub path: Option<PathBuf>,
    /// The mapping's entry in the SIGBUS handler's table (dropped before the map it describes).
    #[cfg(target_os = "linux")]
    _sigbus: Option<crate::sigbus::Registration>,
    /// The open file behind the map and what it was when parsed, for [`Self::check_unchanged`].
    source: Option<(File, FileIdentity)>,
    bytes: Bytes,
    /// Where tensor data is read from once copied out of the map.
    resident: Option<ResidentData>,
    pub version: u32,
    /// Key/value pairs in file order.
    pub metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Empties every metadata array of more than `max_len` elements (keeping its key and element
    /// type) and returns how many it emptied. For a process that has already built what it needs
    /// from them (the tokenizer's vocabulary and merges: ~100k small strings, several MB of heap
    /// that would otherwise stay resident for the whole run).
    pub fn release_arrays_longer_than(&mut self, max_len: usize) -> usize {
        let mut released = 0;
        for (_, v) in self.metadata.iter_mut() {
            if let Value::Array(a) = v {
                if a.items.len() > max_len {
                    a.items = Vec::new();
                    released += 1;
                }
            }
        }
        released
    }

    /// Hands the mapped pages of the header (metadata and tensor table: everything before the
    /// data section, ~1.8 MB for SmolLM2's vocabulary and merges) back to the OS. Parsing copied
    /// all of it, so from here on only the weights are read from the map; the pages stay in the
    /// page cache, and reading them again would fault them back in. Best effort: an error only
    /// leaves them resident.
    pub fn release_header_pages(&self) {
        #[cfg(unix)]
        if let Bytes::Mapped(m) = &self.bytes {
            // Whole 4 KiB pages only: the data section's first page stays mapped.
            let len = (self.data_offset as usize).min(m.len()) & !(4096 - 1);
            if len > 0 {
                // SAFETY: the map is a read-only shared mapping of the file and nothing borrows
                // the header's bytes (parsing copied them). MADV_DONTNEED only drops the pages
                // from this process: a later read faults the same bytes back in from the file.
                let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, len) };
            }
        }
    }

    /// Copies the data section (the tensors) out of the file's memory map into anonymous memory
    /// that starts on a 2 MiB boundary and asks the kernel to back it with 2 MiB pages
    /// (`MADV_HUGEPAGE`); [`Self::tensor_data`] reads from the copy from then on. Why: generation
    /// streams every weight once per token, and through the page cache's 4 KiB pages that is a
    /// TLB miss every 4 KiB; on 2 MiB pages, one per 2 MiB. The cost is one read of the data at
    /// load (from the page cache when the file is warm) and private rather than shared pages.
    /// Only whole 2 MiB pages are advised, so the copy's resident size is the data's own (the map's
    /// pages are never touched, the header's stay released). Returns whether a copy was made (not
    /// for in-memory files, or off Linux); without transparent huge pages the copy still works on
    /// 4 KiB pages. Must run before tensor data is borrowed (it takes `&mut self`).
    pub fn copy_data_to_huge_pages(&mut self) -> Result<bool> {
        #[cfg(target_os = "linux")]
        {
            const HUGE: usize = 2 << 20;
            use std::os::unix::fs::FileExt;
            let (Bytes::Mapped(m), Some(path), Some((file, _))) = (&self.bytes, self.path.clone(), &self.source) else {
                return Ok(false);
            };
            let io = |err| GgufError::Io { op: "read", path: path.clone(), err };
            let offset = self.data_offset as usize;
            let len = m.len().saturating_sub(offset);
            if len == 0 {
                return Ok(false);
            }
            let mut map = memmap2::MmapMut::map_anon(len + HUGE).map_err(|err| GgufError::Io {
                op: "allocate a copy of",
                path: path.clone(),
                err,
            })?;
            let start = (HUGE - map.as_ptr() as usize % HUGE) % HUGE;
            let whole = len / HUGE * HUGE;
            if whole > 0 {
                // Best effort: refused, the copy lives on 4 KiB pages.
                let _ = map.advise_range(memmap2::Advice::HugePage, start, whole);
            }
            // The descriptor that was mapped, not the path again: the copy is of the file parsed.
            file.read_exact_at(&mut map[start..start + len], self.data_offset).map_err(io)?;
            self.resident = Some(ResidentData { map, start, len });
            Ok(true)
        }
        #[cfg(not(target_os = "linux"))]
        Ok(false)
    }

    /// Memory-maps and validates `path`, which must be a regular file (anything else is refused
    /// before it is read: a FIFO would block the first read until a writer comes).
    ///
    /// The map is shared with the page cache, so it shows whatever happens to the file afterwards:
    /// a truncation turns reads of the lost pages into SIGBUS (on Linux kiln then exits with one
    /// line naming the file, see [`crate::sigbus`]), an in-place rewrite changes the weights under
    /// the running model. [`Self::copy_data_to_huge_pages`] (the CLI's default) makes the weights
    /// a private copy immune to both, at the cost of one read of the file and private memory;
    /// mapped readers call [`Self::check_unchanged`] between uses to notice a change.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = open_regular_file(path)?;
        let meta = file.metadata().map_err(|err| GgufError::Io { op: "read", path: path.to_path_buf(), err })?;
        let identity = FileIdentity::of(&meta);
        let bytes = if meta.len() == 0 {
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and only ever read as bytes (any bit pattern is
            // valid). Another process can still rewrite or truncate the file: kiln cannot prevent
            // that, so it detects it (check_unchanged between uses; the SIGBUS handler for a read
            // past a truncation), where llama.cpp's mmap loader assumes it does not happen.
            Bytes::Mapped(unsafe { memmap2::Mmap::map(&file) }.map_err(|err| GgufError::Io {
                op: "map",
                path: path.to_path_buf(),
                err,
            })?)
        };
        #[cfg(target_os = "linux")]
        let registration = match &bytes {
            Bytes::Mapped(m) => Some(crate::sigbus::register(m.as_ptr() as usize, m.len(), path)),
            Bytes::Owned(_) => None,
        };
        let mut g = GgufFile::parse(bytes)?;
        g.path = Some(path.to_path_buf());
        g.source = Some((file, identity));
        #[cfg(target_os = "linux")]
        {
            g._sigbus = registration;
        }
        Ok(g)
    }

    /// Whether the file is still the one parsed, when tensor data is read from its map: an error
    /// naming what changed if it was truncated, resized or modified in place (its size or
    /// modification time differ), or if the path now names another file or none. Always `Ok` for
    /// in-memory files and once the data lives in a private copy (the file is not read again).
    /// A server calls it before each request: a change is caught before it feeds garbage weights
    /// (or, for a truncation, the SIGBUS) to a forward pass, though one that lands during a
    /// request can still be met there.
    pub fn check_unchanged(&self) -> Result<()> {
        let (Some((file, was)), Some(path), None) = (&self.source, &self.path, &self.resident) else { return Ok(()) };
        let changed = |what: String| Err(GgufError::FileChanged { path: path.clone(), what });
        // The open descriptor is the mapped file itself, whatever the path names now.
        let now = match file.metadata() {
            Ok(m) => FileIdentity::of(&m),
            Err(e) => return changed(format!("cannot stat it: {e}")),
        };
        if now.len < was.len {
            return changed(format!("truncated from {} to {} bytes", was.len, now.len));
        }
        if now.len != was.len {
            return changed(format!("its size went from {} to {} bytes", was.len, now.len));
        }
        if now.modified != was.modified {
            return changed("modified in place".into());
        }
        match std::fs::metadata(path) {
            Ok(m) if FileIdentity::of(&m).same_file(was) => Ok(()),
            Ok(_) => changed("the path now names another file".into()),
            Err(e) => changed(format!("the path is gone: {e}")),
        }
    }

    /// Parses and validates an in-memory file.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::parse(Bytes::Owned(bytes))
    }

    fn parse(bytes: Bytes) -> Result<GgufFile> {
        let mut c = Cursor { buf: &bytes, pos: 0 };
        let magic = c.take(4, "magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic.to_vec() });
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;

        let mut metadata = Vec::with_capacity(bounded_capacity(n_kv, 8 + 4 + 1, c.remaining()));
        let mut key_index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let at = c.pos as u64;
            let tid = c.u32(&format!("type of metadata key {key:?}"))?;
            let ty = ValueType::from_id(tid).ok_or_else(|| GgufError::UnknownValueType {
                key: key.clone(),
                offset: at,
                id: tid,
            })?;
            let value = c.value(ty, &key, 0)?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.get(key_index.get("general.alignment").copied().unwrap_or(usize::MAX)) {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) => *a as u64,
            Some((k, v)) => return Err(GgufError::wrong_type(k, "u32", v.value_type())),
        };
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(GgufError::BadAlignment(alignment));
        }

        let mut tensors = Vec::with_capacity(bounded_capacity(n_tensors, 8 + 4 + 4 + 8, c.remaining()));
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"))?;
            let n_dims = c.u32(&format!("tensor {name:?} dimension count"))?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::TooManyDims { name, n_dims });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64(&format!("tensor {name:?} dimension {d}"))?);
            }
            let tid = c.u32(&format!("tensor {name:?} type"))?;
            let offset = c.u64(&format!("tensor {name:?} offset"))?;
            let ggml_type =
                GgmlType::from_id(tid).ok_or_else(|| GgufError::UnknownTensorType { name: name.clone(), id: tid })?;
            let (n_elements, n_bytes) = tensor_size(&name, &dims, ggml_type)?;
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor(name));
            }
            tensors.push(TensorInfo { name, dims, ggml_type, offset, n_elements, n_bytes });
        }

        let data_offset = align_up(c.pos as u64, alignment);
        let file_len = bytes.len() as u64;
        let data_len = file_len.saturating_sub(data_offset);
        if !tensors.is_empty() && data_offset > file_len {
            return Err(GgufError::Truncated {
                what: "padding before the data section".into(),
                offset: c.pos as u64,
                needed: data_offset - c.pos as u64,
                available: file_len - c.pos as u64,
            });
        }
        for t in &tensors {
            if t.offset % alignment != 0 {
                return Err(GgufError::MisalignedTensor { name: t.name.clone(), offset: t.offset, alignment });
            }
            let end = t.offset.checked_add(t.n_bytes);
            match end {
                Some(end) if end <= data_len => {}
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        name: t.name.clone(),
                        start: t.offset,
                        end: end.unwrap_or(u64::MAX),
                        data_len,
                    })
                }
            }
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| tensors[i].offset);
        for w in order.windows(2) {
            let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
            if a.n_bytes > 0 && b.n_bytes > 0 && a.offset + a.n_bytes > b.offset {
                return Err(GgufError::OverlappingTensors { a: a.name.clone(), b: b.name.clone() });
            }
        }

        let g = GgufFile {
            path: None,
            #[cfg(target_os = "linux")]
            _sigbus: None,
            source: None,
            bytes,
            resident: None,
            version,
            metadata,
            key_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        };
        crate::known_keys::check_known_keys(&g)?;
        Ok(g)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor, borrowed from the file (validated to lie inside it at open) or from
    /// the copy of its data section.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let (at, len) = (t.offset as usize, t.n_bytes as usize);
        match &self.resident {
            Some(r) => &r.map[r.start..r.start + r.len][at..at + len],
            None => {
                let start = self.data_offset as usize + at;
                &self.bytes[start..start + len]
            }
        }
    }

    /// The bytes of tensor `name` in the private copy of the data section, to rearrange in place
    /// before anything borrows them: `None` without a copy ([`Self::copy_data_to_huge_pages`]), for
    /// an unknown name, or where the tensor's bytes overlap another tensor's (a change would reach
    /// that one too).
    pub fn tensor_data_mut(&mut self, name: &str) -> Option<&mut [u8]> {
        let t = self.tensor(name)?;
        let range = t.offset..t.offset + t.n_bytes;
        let overlaps = self
            .tensors
            .iter()
            .filter(|o| o.name != t.name && o.n_bytes > 0)
            .any(|o| o.offset < range.end && range.start < o.offset + o.n_bytes);
        if overlaps || range.is_empty() {
            return None;
        }
        let (at, len) = (range.start as usize, range.end as usize - range.start as usize);
        let r = self.resident.as_mut()?;
        Some(&mut r.map[r.start..r.start + r.len][at..at + len])
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// `general.architecture`, if present.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    // Typed accessors used by model loading: a missing key is `Ok(None)`, a wrong type an error.

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().map(Some).ok_or_else(|| GgufError::wrong_type(key, "unsigned integer", v.value_type()))
            }
        }
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| GgufError::wrong_type(key, "number", v.value_type())),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| GgufError::wrong_type(key, "bool", v.value_type())),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| GgufError::wrong_type(key, "string", v.value_type())),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&Array>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(Some).ok_or_else(|| GgufError::wrong_type(key, "array", v.value_type())),
        }
    }
}

/// Opens `path` for reading if it is a regular file. On Unix the open does not block (a FIFO
/// without a writer would wait forever) and the type is read from the open descriptor, so a file
/// swapped in between a check and the open cannot slip through.
fn open_regular_file(path: &Path) -> Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Regular files ignore O_NONBLOCK: reads and maps behave as without it.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|err| GgufError::Io { op: "open", path: path.to_path_buf(), err })?;
    let ty = file.metadata().map_err(|err| GgufError::Io { op: "read", path: path.to_path_buf(), err })?.file_type();
    if ty.is_file() {
        return Ok(file);
    }
    Err(GgufError::NotRegularFile { path: path.to_path_buf(), kind: file_kind(ty) })
}

fn file_kind(ty: std::fs::FileType) -> &'static str {
    if ty.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ty.is_fifo() {
            return "a FIFO";
        }
        if ty.is_char_device() {
            return "a character device";
        }
        if ty.is_block_device() {
            return "a block device";
        }
        if ty.is_socket() {
            return "a socket";
        }
    }
    "not a plain file"
}

/// What identifies a file's contents cheaply: which file (device and inode on Unix), its size and
/// its modification time (nanoseconds where the file system keeps them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    file: (u64, u64),
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileIdentity {
    fn of(m: &std::fs::Metadata) -> FileIdentity {
        #[cfg(unix)]
        let file = {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        };
        #[cfg(not(unix))]
        let file = (0, 0);
        FileIdentity { file, len: m.len(), modified: m.modified().ok() }
    }

    fn same_file(&self, other: &FileIdentity) -> bool {
        self.file == other.file
    }
}

pub(crate) fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Most items reserved up front for a list whose length comes from the file; longer lists grow as
/// they are read, so memory follows the bytes actually parsed, not a claimed count.
const MAX_PREALLOC: u64 = 1 << 12;

/// Capacity to reserve for `count` items of at least `min_size` bytes each: never more than the
/// remaining bytes could hold, nor more than `MAX_PREALLOC`, so a hostile count cannot force a
/// huge allocation (the in-memory items are several times larger than their encoding, and
/// `remaining` includes all the tensor data).
fn bounded_capacity(count: u64, min_size: usize, remaining: usize) -> usize {
    count.min((remaining / min_size.max(1)) as u64).min(MAX_PREALLOC) as usize
}

fn tensor_size(name: &str, dims: &[u64], ty: GgmlType) -> Result<(u64, u64)> {
    let bad = |why: &str| GgufError::BadShape { name: name.to_string(), shape: dims.to_vec(), why: why.to_string() };
    let mut n: u64 = 1;
    for &d in dims {
        if d == 0 {
            return Err(bad("zero-sized dimension"));
        }
        n = n.checked_mul(d).ok_or_else(|| bad("element count overflows"))?;
    }
    if n > i64::MAX as u64 {
        return Err(bad("element count overflows"));
    }
    let row_len = dims.first().copied().unwrap_or(1);
    if row_len % ty.block_size() as u64 != 0 {
        return Err(GgufError::NotBlockMultiple {
            name: name.to_string(),
            ty: ty.name().to_string(),
            row_len,
            block: ty.block_size(),
        });
    }
    let bytes = ty.bytes_for(n).ok_or_else(|| bad("byte size overflows"))?;
    Ok((n, bytes))
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n as u64,
                available: self.remaining() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos as u64;
        let len = self.u64(&format!("{what} (string length)"))?;
        if len > self.remaining() as u64 {
            return Err(GgufError::LengthBeyondFile {
                what: format!("{what} (string)"),
                offset: at,
                len,
                file_len: self.buf.len() as u64,
            });
        }
        let s = self.take(len as usize, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| GgufError::InvalidUtf8 { what: what.to_string(), offset: at })
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value> {
        let what = || format!("value of metadata key {key:?}");
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(&what())?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(&what())?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what())?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what())?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(&what())?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what())?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what())?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(&what())?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what())?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what())?)),
            ValueType::Bool => {
                let at = self.pos as u64;
                match self.array::<1>(&what())?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(GgufError::Invalid(format!(
                            "metadata key {key:?} at byte {at}: bool byte is {b}, expected 0 or 1"
                        )))
                    }
                }
            }
            ValueType::String => Value::String(self.string(&what())?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(GgufError::NestingTooDeep { key: key.to_string(), max: MAX_ARRAY_NESTING });
                }
                let at = self.pos as u64;
                let tid = self.u32(&format!("array element type of {key:?}"))?;
                let elem_type = ValueType::from_id(tid).ok_or(GgufError::UnknownValueType {
                    key: key.to_string(),
                    offset: at,
                    id: tid,
                })?;
                let count_at = self.pos as u64;
                let count = self.u64(&format!("array length of {key:?}"))?;
                let min = elem_type.min_encoded_size() as u64;
                if count.saturating_mul(min) > self.remaining() as u64 {
                    return Err(GgufError::LengthBeyondFile {
                        what: format!("array of metadata key {key:?}"),
                        offset: count_at,
                        len: count,
                        file_len: self.buf.len() as u64,
                    });
                }
                let cap = bounded_capacity(count, min as usize, self.remaining());
                let mut items = Vec::with_capacity(cap);
                for _ in 0..count {
                    items.push(self.value(elem_type, key, depth + 1)?);
                }
                Value::Array(Array { elem_type, items })
            }
        })
    }
}
