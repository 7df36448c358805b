//! Growable buffers whose storage starts on a cache line, for the activations and panels the SIMD
//! kernels read with 32- and 64-byte loads.
//!
//! Why: the allocator aligns a `Vec` to 16 bytes, so depending on where a run's buffer lands,
//! every other 32-byte load (and every 64-byte one) straddles two cache lines and costs two loads;
//! the generation kernels' speed came out bimodal between runs (two-plane Q4_0 with the data in
//! L2: 0.89 or 1.17 ns per block), and aligned activations made TinyLlama Q4_0 tg128 5% faster.

use std::fmt;
use std::ops::{Deref, DerefMut};

/// One cache line of bytes: the allocation unit (size 64, alignment 64, no padding).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; 64]);

const _: () = assert!(std::mem::size_of::<Line>() == 64 && std::mem::align_of::<Line>() == 64);

/// Element types whose every bit pattern is a value and which have no padding, so that cache
/// lines of bytes can be viewed as a slice of them.
///
/// # Safety
/// Implementors must be plain numbers: any 64-byte-aligned run of initialised bytes of the right
/// length is a valid `[Self]`, and `align_of::<Self>()` divides 64.
pub unsafe trait Plain: Copy + Default + PartialEq + fmt::Debug {}
// SAFETY: plain numbers, alignment 1 or 4.
unsafe impl Plain for i8 {}
// SAFETY: as above.
unsafe impl Plain for u32 {}

/// `len` values of `T` at the start of whole cache lines; dereferences to `[T]`.
#[derive(Clone)]
pub struct AlignedVec<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

/// The activation quants' buffer.
pub type AlignedI8 = AlignedVec<i8>;

impl<T: Plain> Default for AlignedVec<T> {
    fn default() -> Self {
        AlignedVec { lines: Vec::new(), len: 0, _t: std::marker::PhantomData }
    }
}

impl<T: Plain> AlignedVec<T> {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops the contents; keeps the storage.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// As `Vec::resize`: `n` values, the new ones (past the old length) set to `value`. Allocates
    /// only when growing past the storage.
    pub fn resize(&mut self, n: usize, value: T) {
        let bytes = n.checked_mul(std::mem::size_of::<T>()).expect("AlignedVec: length overflows");
        let lines = bytes.div_ceil(64);
        if lines > self.lines.len() {
            self.lines.resize(lines, Line([0; 64]));
        }
        let old = self.len;
        self.len = n;
        if n > old {
            self[old..n].fill(value);
        }
    }
}

impl<T: Plain> Deref for AlignedVec<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `lines` holds `64 · lines.len() >= len · size_of::<T>()` initialised bytes,
        // contiguous (a `Line` is 64 bytes with no padding, asserted above) and 64-aligned, which
        // `T: Plain` makes a valid `[T]`; borrowed for `self`'s lifetime.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Plain> DerefMut for AlignedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, borrowed mutably and uniquely through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

impl<'a, T: Plain> IntoIterator for &'a AlignedVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a, T: Plain> IntoIterator for &'a mut AlignedVec<T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

impl<T: Plain> PartialEq for AlignedVec<T> {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl<T: Plain> fmt::Debug for AlignedVec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self[..].fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_vec_and_starts_on_a_line() {
        let mut a = AlignedI8::new();
        let mut v: Vec<i8> = Vec::new();
        for (n, value) in [(5usize, 1i8), (130, -2), (64, 3), (200, 4), (0, 5), (70, 6)] {
            a.resize(n, value);
            v.resize(n, value);
            assert_eq!(&a[..], &v[..], "resize to {n}");
            assert_eq!(a.as_ptr() as usize % 64, 0);
        }
        a[3] = 9;
        v[3] = 9;
        assert_eq!(&a[..], &v[..]);
        let b = a.clone();
        assert_eq!(a, b);
        a.clear();
        assert!(a.is_empty());
        assert_ne!(a, b);
        let mut w = AlignedVec::<u32>::default();
        let mut wv: Vec<u32> = Vec::new();
        for (n, value) in [(3usize, 7u32), (40, 8), (17, 9), (33, 10)] {
            w.resize(n, value);
            wv.resize(n, value);
            assert_eq!(&w[..], &wv[..], "u32 resize to {n}");
            assert_eq!(w.as_ptr() as usize % 64, 0);
        }
    }
}
