//! One line on stderr, not a silent death, when a memory-mapped model file shrinks underneath.
//!
//! Reading a page of a shared file mapping that lies past the file's current end raises SIGBUS,
//! whose default action kills the process without a word. Two ways out were weighed:
//! - A private copy of the data (`GgufFile::copy_data_to_huge_pages`, the CLI's default): immune
//!   to truncation and to in-place rewrites, at the cost of reading the whole file at load and of
//!   private memory (pages not shared with other processes mapping the same file). A private
//!   *mapping* (`MAP_PRIVATE`) would not do: pages not yet copied on write still show the file's
//!   changes, and pages past a truncation still raise SIGBUS.
//! - The map (`--mmap`): quick to start and shared, but exposed. Rewrites are caught by
//!   `GgufFile::check_unchanged` (size, modification time, inode) before each use; a truncation
//!   that lands while a forward pass reads the weights cannot be caught there, so this handler
//!   turns its SIGBUS into `kiln: the model file PATH changed while mapped (SIGBUS): exiting` and
//!   exit status 135 (128 + SIGBUS, what a shell reports for a process killed by it).
//!
//! The handler only acts on faults inside a registered map; any other SIGBUS goes to the handler
//! that was installed before (Rust's runtime's, or the default action) exactly as without it.
//! Inside the handler only async-signal-safe calls are made: atomic loads and swaps, `write(2)`,
//! `pause(2)`, `sigaction(2)`, `raise(3)` and `_exit(2)`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Most maps registered at once (a process maps one model; tests open a few at a time). A map that
/// finds no free slot still works: a fault in it takes the previous handler's action.
const SLOTS: usize = 64;

struct Slot {
    /// Taken by a registration (which then fills in the rest and publishes `len`).
    claimed: AtomicBool,
    start: AtomicUsize,
    /// 0: free.
    len: AtomicUsize,
    path: AtomicPtr<u8>,
    path_len: AtomicUsize,
}

static TABLE: [Slot; SLOTS] = [const {
    Slot {
        claimed: AtomicBool::new(false),
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        path: AtomicPtr::new(std::ptr::null_mut()),
        path_len: AtomicUsize::new(0),
    }
}; SLOTS];

/// The action in place before ours, restored for faults that are not ours.
static PREVIOUS: OnceLock<Option<libc::sigaction>> = OnceLock::new();

/// Set by the first thread whose fault in a model map ends the process.
static EXITING: AtomicBool = AtomicBool::new(false);

/// Exit status after a fault in a registered map.
pub const EXIT_STATUS: i32 = 128 + libc::SIGBUS;

/// A registered map; dropping it removes the entry.
#[derive(Debug)]
pub struct Registration {
    slot: Option<usize>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            // The path's bytes are not freed: a handler running on another thread right now may
            // still be reading them (a few bytes per file opened, for the life of the process).
            TABLE[i].len.store(0, Ordering::Release);
            TABLE[i].claimed.store(false, Ordering::Release);
        }
    }
}

/// Registers the map `[start, start + len)` of `path`, installing the handler on first use.
pub(crate) fn register(start: usize, len: usize, path: &Path) -> Registration {
    PREVIOUS.get_or_init(install);
    let bytes: &'static mut [u8] = Box::leak(path.as_os_str().as_encoded_bytes().to_vec().into_boxed_slice());
    for (i, slot) in TABLE.iter().enumerate() {
        if slot.claimed.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            continue;
        }
        // The handler ignores the slot until `len` is set, and sees these fields once it is.
        slot.start.store(start, Ordering::Relaxed);
        slot.path.store(bytes.as_mut_ptr(), Ordering::Relaxed);
        slot.path_len.store(bytes.len(), Ordering::Relaxed);
        slot.len.store(len.max(1), Ordering::Release);
        return Registration { slot: Some(i) };
    }
    Registration { slot: None }
}

/// Installs the handler; returns the action it replaced (`None` if that could not be read).
fn install() -> Option<libc::sigaction> {
    // SAFETY: sigaction with a zeroed struct filled in as the man page requires: a handler of the
    // SA_SIGINFO signature, an empty mask; SA_ONSTACK runs it on the thread's alternate stack
    // where Rust set one up. The previous action is read into `old`.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut old) != 0 {
            return None;
        }
        Some(old)
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; si_addr is the
    // faulting address for SIGBUS.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    for slot in &TABLE {
        let len = slot.len.load(Ordering::Acquire);
        let start = slot.start.load(Ordering::Relaxed);
        if len == 0 || addr < start || addr - start >= len {
            continue;
        }
        let path = slot.path.load(Ordering::Relaxed);
        let path_len = slot.path_len.load(Ordering::Relaxed);
        // Several threads reading the lost pages fault at once: the first says so and exits, the
        // others wait for the exit (their messages would interleave with its).
        if EXITING.swap(true, Ordering::AcqRel) {
            loop {
                // SAFETY: pause(2) is async-signal-safe; the process ends at the first thread's
                // _exit.
                unsafe { libc::pause() };
            }
        }
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the path's bytes were leaked at
        // registration, so they are valid for the life of the process.
        unsafe {
            let say = |s: &[u8]| libc::write(libc::STDERR_FILENO, s.as_ptr().cast(), s.len());
            say(b"kiln: the model file ");
            libc::write(libc::STDERR_FILENO, path.cast(), path_len);
            say(b" changed while mapped (SIGBUS): exiting\n");
            libc::_exit(EXIT_STATUS);
        }
    }
    // Not a fault in a model map: the previous action takes over. For a fault, returning re-runs
    // the faulting access, which then meets that action; a signal sent by a process (si_code <= 0)
    // is raised again.
    // SAFETY: sigaction(2) and raise(3) are async-signal-safe, and reading a OnceLock is an atomic
    // load (no lock). A fault before `PREVIOUS` is set (between installing the handler and storing
    // the old action) gets the default action.
    unsafe {
        match PREVIOUS.get() {
            Some(Some(old)) => libc::sigaction(libc::SIGBUS, old, std::ptr::null_mut()),
            _ => {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut())
            }
        };
        if code <= 0 {
            libc::raise(sig);
        }
    }
}
