//! Mutation fuzzing of the reader: random byte flips, integer writes (mostly inside the header,
//! metadata and tensor table), truncations, insertions and deletions of valid files must give
//! `Ok` or `Err`, never a panic, a hang or a huge allocation.
//!
//! `KILN_FUZZ_CASES=100000 cargo test -p kiln-gguf --test fuzz --release` runs more cases
//! (default 2000).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use kiln_gguf::writer::array;
use kiln_gguf::{inspect, GgmlType, GgufBuilder, GgufFile, Value, ValueType};
use proptest::prelude::*;

struct Seed {
    bytes: Vec<u8>,
    /// End of the tensor table: mutations aim mostly before it.
    header_len: usize,
}

/// synth-tiny-Q4_0 with its full metadata (1024-token vocab, chat template…) and tensor table,
/// but each tensor cut to a couple of rows so a case parses fast.
fn synth_seed() -> Seed {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth/synth-tiny-Q4_0.gguf");
    let g = GgufFile::open(&p).unwrap();
    let mut b = GgufBuilder::from_file(&g);
    b.data_len = None;
    for (t, info) in b.tensors.iter_mut().zip(&g.tensors) {
        let ty = info.ggml_type;
        let row = ty.block_size() as u64;
        t.dims = if info.dims.len() == 1 { vec![row * 2] } else { vec![row, 2] };
        t.data.truncate(2 * ty.type_size());
        t.offset = None;
    }
    let bytes = b.to_bytes();
    GgufFile::from_bytes(bytes.clone()).expect("shrunken seed is valid");
    Seed { header_len: b.header_len() as usize, bytes }
}

/// Every value type, nested arrays, a non-default alignment and a few tensor types.
fn crafted_seed() -> Seed {
    let mut b = GgufBuilder::new();
    b.alignment(64)
        .add_str("general.architecture", "llama")
        .add_u32("llama.block_count", 1)
        .add_f32("llama.rope.freq_base", 10000.0)
        .add_kv("u8", Value::U8(1))
        .add_kv("i8", Value::I8(-1))
        .add_kv("u16", Value::U16(2))
        .add_kv("i16", Value::I16(-2))
        .add_kv("i32", Value::I32(-3))
        .add_kv("u64", Value::U64(4))
        .add_kv("i64", Value::I64(-4))
        .add_kv("f64", Value::F64(0.5))
        .add_bool("tokenizer.ggml.add_bos_token", true)
        .add_str_array("tokenizer.ggml.tokens", ["a", "b", "c", "d"])
        .add_f32_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0])
        .add_kv(
            "nested",
            array(
                ValueType::Array,
                vec![
                    array(ValueType::U32, vec![Value::U32(1), Value::U32(2)]),
                    array(ValueType::Array, vec![array(ValueType::String, vec![Value::String("x".into())])]),
                ],
            ),
        )
        .add_f32_tensor("norm", &[4], &[1.0; 4])
        .add_tensor("q", &[32, 2], GgmlType::Q4_0, vec![1u8; 36])
        .add_tensor("k", &[256], GgmlType::Q4_K, vec![2u8; 144])
        .add_tensor("e", &[1, 2, 2, 1], GgmlType::F16, vec![3u8; 8]);
    let bytes = b.to_bytes();
    GgufFile::from_bytes(bytes.clone()).expect("crafted seed is valid");
    Seed { header_len: b.header_len() as usize, bytes }
}

fn seeds() -> &'static [Seed; 2] {
    static SEEDS: OnceLock<[Seed; 2]> = OnceLock::new();
    SEEDS.get_or_init(|| [synth_seed(), crafted_seed()])
}

/// Where a mutation lands: inside the header region (most of the time) or anywhere.
#[derive(Debug, Clone, Copy)]
struct Pos {
    in_header: bool,
    raw: u32,
}

impl Pos {
    fn resolve(self, len: usize, header_len: usize) -> usize {
        let span = if self.in_header { header_len.min(len) } else { len };
        if span == 0 {
            0
        } else {
            self.raw as usize % span
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Pos, u8),
    SetByte(Pos, u8),
    WriteU32(Pos, u32),
    WriteU64(Pos, u64),
    Truncate(Pos),
    Insert(Pos, Vec<u8>),
    Delete(Pos, u8),
}

fn pos() -> impl Strategy<Value = Pos> {
    (prop::bool::weighted(0.85), any::<u32>()).prop_map(|(in_header, raw)| Pos { in_header, raw })
}

/// Integers that hit edge cases more often than uniform ones would.
fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 31),
        Just(u32::MAX as u64),
        Just(i64::MAX as u64),
        Just(1 << 32),
        0u64..64,
        0u64..100_000,
        any::<u64>(),
    ]
}

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(u32::MAX), 0u32..16, 0u32..64, any::<u32>()]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (pos(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        2 => (pos(), any::<u8>()).prop_map(|(p, b)| Mutation::SetByte(p, b)),
        2 => (pos(), interesting_u32()).prop_map(|(p, v)| Mutation::WriteU32(p, v)),
        3 => (pos(), interesting_u64()).prop_map(|(p, v)| Mutation::WriteU64(p, v)),
        1 => pos().prop_map(Mutation::Truncate),
        1 => (pos(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, b)| Mutation::Insert(p, b)),
        1 => (pos(), 1u8..32).prop_map(|(p, n)| Mutation::Delete(p, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, header_len: usize, m: &Mutation) {
    let len = bytes.len();
    let write = |bytes: &mut Vec<u8>, at: usize, v: &[u8]| {
        let n = v.len().min(bytes.len().saturating_sub(at));
        bytes[at..at + n].copy_from_slice(&v[..n]);
    };
    match m {
        Mutation::FlipBit(p, bit) if len > 0 => bytes[p.resolve(len, header_len)] ^= 1 << bit,
        Mutation::SetByte(p, b) if len > 0 => bytes[p.resolve(len, header_len)] = *b,
        Mutation::WriteU32(p, v) if len > 0 => write(bytes, p.resolve(len, header_len), &v.to_le_bytes()),
        Mutation::WriteU64(p, v) if len > 0 => write(bytes, p.resolve(len, header_len), &v.to_le_bytes()),
        Mutation::Truncate(p) => bytes.truncate(p.resolve(len, header_len)),
        Mutation::Insert(p, b) => {
            let at = p.resolve(len, header_len);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Delete(p, n) if len > 0 => {
            let at = p.resolve(len, header_len);
            bytes.drain(at..(at + *n as usize).min(len));
        }
        _ => {}
    }
}

/// Everything a caller may do with a file that opened must work too.
fn exercise(g: &GgufFile) {
    for t in &g.tensors {
        assert_eq!(g.tensor_data(t).len() as u64, t.n_bytes);
        assert_eq!(g.tensor(&t.name).map(|x| x.offset), Some(t.offset));
    }
    for (k, _) in &g.metadata {
        let _ = (g.get_u64(k), g.get_f64(k), g.get_str(k), g.get_bool(k), g.get_array(k));
    }
    let s = inspect::Summary::new(g);
    serde_json::to_string_pretty(&s).unwrap();
    inspect::render_text(&s);
    // What the reader accepts, the writer reproduces and the reader accepts again.
    let bytes = GgufBuilder::from_file(g).to_bytes();
    let again = GgufFile::from_bytes(bytes.clone()).expect("rewritten file opens");
    assert_eq!(GgufBuilder::from_file(&again).to_bytes(), bytes);
}

fn cases() -> u32 {
    std::env::var("KILN_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)
}

proptest! {
    // Failures print the shrunk mutation list; the seeds are deterministic, so that reproduces it.
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_files_never_panic(
        seed in 0usize..2,
        muts in prop::collection::vec(mutation(), 1..6),
    ) {
        let s = &seeds()[seed];
        let mut bytes = s.bytes.clone();
        for m in &muts {
            apply(&mut bytes, s.header_len, m);
        }
        if let Ok(g) = GgufFile::from_bytes(bytes) {
            exercise(&g);
        }
    }
}

#[test]
fn seeds_open_and_round_trip() {
    for s in seeds() {
        let g = GgufFile::from_bytes(s.bytes.clone()).unwrap();
        exercise(&g);
        assert_eq!(GgufBuilder::from_file(&g).to_bytes(), s.bytes);
    }
}

/// Records the largest single allocation made by a thread while it has tracking on.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if TRACK.with(Cell::get) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if TRACK.with(Cell::get) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Largest single allocation while parsing `bytes` (the buffer itself is made before).
fn largest_allocation_parsing(bytes: Vec<u8>) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    TRACK.with(|t| t.set(true));
    let r = GgufFile::from_bytes(bytes);
    TRACK.with(|t| t.set(false));
    drop(r);
    LARGEST.load(Ordering::Relaxed)
}

#[test]
fn no_allocation_sized_by_untrusted_counts() {
    // Counts claiming as many items as the remaining bytes could hold, in a file with 16 MiB of
    // zeros after the header (as a real model has gigabytes of tensor data there). Reserving by
    // such counts would take many times the file's size; the reader must grow as it reads.
    const PAD: usize = 16 << 20;
    const LIMIT: usize = 8 << 20;
    let header = |n_tensors: u64, n_kv: u64| {
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&n_tensors.to_le_bytes());
        v.extend_from_slice(&n_kv.to_le_bytes());
        v
    };
    let kv_array = |elem: ValueType, count: u64| {
        let mut v = header(0, 1);
        v.extend_from_slice(&1u64.to_le_bytes());
        v.push(b'k');
        v.extend_from_slice(&ValueType::Array.id().to_le_bytes());
        v.extend_from_slice(&elem.id().to_le_bytes());
        v.extend_from_slice(&count.to_le_bytes());
        v
    };
    // The padding byte makes the first item past the header invalid (or a duplicate), so each
    // parse fails at once: whatever it allocated was sized by the claimed count alone.
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        ("metadata count", header(0, u64::MAX), 0),
        ("tensor count", header(u64::MAX, 0), 0),
        ("bool array count", kv_array(ValueType::Bool, PAD as u64), 2),
        ("string array count", kv_array(ValueType::String, (PAD / 8) as u64), 0xff),
        ("nested array count", kv_array(ValueType::Array, (PAD / 12) as u64), 0xff),
    ];
    for (what, mut bytes, fill) in cases {
        bytes.resize(bytes.len() + PAD, fill);
        assert!(GgufFile::from_bytes(bytes.clone()).is_err(), "{what}");
        let largest = largest_allocation_parsing(bytes);
        assert!(largest <= LIMIT, "{what}: one allocation of {largest} bytes parsing a {PAD}-byte file");
    }
}
