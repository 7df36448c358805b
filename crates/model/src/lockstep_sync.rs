//! What the threads of the lock-step generation pass ([`crate::forward_lockstep`]) share: a
//! spinning barrier, f32 buffers every thread may write, and counters that hand out tasks.
//!
//! All safe code: shared floats are stored as `AtomicU32` bits with relaxed loads and stores
//! (plain moves on x86-64); the barrier's release/acquire pair orders them between operations.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// A barrier for a fixed number of threads that spins instead of sleeping: between the operations
/// of one generated token, where a wait lasts microseconds and waking a sleeping thread costs more.
/// After a while it yields, so more threads than cores still make progress.
pub(crate) struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
}

/// Spins before a waiting thread starts yielding its core.
const SPINS_BEFORE_YIELD: u32 = 1 << 8;

impl SpinBarrier {
    pub(crate) fn new(threads: usize) -> SpinBarrier {
        SpinBarrier {
            threads: threads.max(1),
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Waits until all threads have arrived. Everything a thread wrote before its call is visible
    /// to every thread after theirs. Panics if another thread panicked (see [`Self::poison_on_panic`])
    /// instead of waiting for it forever.
    pub(crate) fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            // Reset before the release: a thread that sees the new generation counts from zero.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.store(generation.wrapping_add(1), Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            if self.poisoned.load(Ordering::Relaxed) {
                panic!("another thread of the lock-step forward pass panicked");
            }
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// A guard that, if its thread unwinds, releases the threads waiting at this barrier (they
    /// panic too) so that a panic ends the pass instead of hanging it.
    pub(crate) fn poison_on_panic(&self) -> PoisonOnPanic<'_> {
        PoisonOnPanic(self)
    }
}

pub(crate) struct PoisonOnPanic<'a>(&'a SpinBarrier);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poisoned.store(true, Ordering::Relaxed);
        }
    }
}

/// An f32 buffer that every thread of the pass may read and write; each element is written by one
/// thread between two barriers.
#[derive(Default)]
pub(crate) struct SharedF32(Vec<AtomicU32>);

impl SharedF32 {
    pub(crate) fn resize(&mut self, len: usize) {
        self.0.resize_with(len, || AtomicU32::new(0));
    }

    /// `self[at .. at + src.len()] = src`.
    pub(crate) fn store(&self, at: usize, src: &[f32]) {
        for (d, &v) in self.0[at..at + src.len()].iter().zip(src) {
            d.store(v.to_bits(), Ordering::Relaxed);
        }
    }

    /// `dst = self[at .. at + dst.len()]`.
    pub(crate) fn load(&self, at: usize, dst: &mut [f32]) {
        let len = dst.len();
        for (d, s) in dst.iter_mut().zip(&self.0[at..at + len]) {
            *d = f32::from_bits(s.load(Ordering::Relaxed));
        }
    }

    /// Rows `r0 .. r0 + out.len() / n` of an `[n][rows]` matrix, from `out` laid out
    /// `[n][out.len() / n]` (a row task's results).
    pub(crate) fn store_columns(&self, rows: usize, r0: usize, n: usize, out: &[f32]) {
        let width = out.len() / n.max(1);
        for (t, part) in out.chunks_exact(width.max(1)).enumerate().take(n) {
            self.store(t * rows + r0, part);
        }
    }
}

/// Hands out the tasks `0..count` of one operation to the pass's threads: each thread owns a
/// contiguous share and takes its tasks in order from the front (so its reads of the weights form
/// one stream, which the hardware prefetchers follow); a thread done with its share takes tasks
/// from the back of another's. Every task goes to exactly one thread.
pub(crate) struct TaskShares<'a> {
    shares: &'a [Share],
    count: usize,
}

/// What has been taken of one thread's share: from the front (low half) and from the back (high
/// half), in one word so that the owner and a thief agree on who takes the last task.
#[derive(Default)]
#[repr(align(64))]
pub(crate) struct Share(AtomicU64);

const LOW: u64 = u32::MAX as u64;

impl TaskShares<'_> {
    /// Thread `t`'s share of the tasks.
    fn range(&self, t: usize) -> (u64, u64) {
        let threads = self.shares.len();
        ((t * self.count / threads) as u64, ((t + 1) * self.count / threads) as u64)
    }

    /// The next task of thread `me`: its own share's front, else another share's back.
    pub(crate) fn next(&self, me: usize) -> Option<usize> {
        let threads = self.shares.len();
        if threads == 0 {
            return None;
        }
        let me = me % threads;
        let (lo, hi) = self.range(me);
        // Taking from the front is one add; past the end (or the thieves' part) it takes nothing.
        let word = self.shares[me].0.fetch_add(1, Ordering::Relaxed);
        let (front, back) = (word & LOW, word >> 32);
        if lo + front < hi - back {
            return Some((lo + front) as usize);
        }
        for k in 1..threads {
            let t = (me + k) % threads;
            let (lo, hi) = self.range(t);
            let share = &self.shares[t].0;
            let mut word = share.load(Ordering::Relaxed);
            loop {
                let (front, back) = (word & LOW, word >> 32);
                if lo + front >= hi - back {
                    break;
                }
                match share.compare_exchange_weak(word, word + (1 << 32), Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => return Some((hi - back - 1) as usize),
                    Err(now) => word = now,
                }
            }
        }
        None
    }
}

/// The shares of every operation of a pass (zeroed before it, one set per operation, so no share
/// is reused while a thread may still read it).
#[derive(Default)]
pub(crate) struct PassShares {
    shares: Vec<Share>,
    threads: usize,
}

impl PassShares {
    /// Room for `operations` operations of `threads` threads, nothing taken.
    pub(crate) fn reset(&mut self, operations: usize, threads: usize) {
        self.threads = threads.max(1);
        self.shares.resize_with(operations * self.threads, Share::default);
        for s in &mut self.shares {
            *s.0.get_mut() = 0;
        }
    }

    /// Operation `op`, whose `count` tasks are split evenly between the threads (every thread
    /// must give the same count).
    pub(crate) fn operation(&self, op: usize, count: usize) -> TaskShares<'_> {
        let shares = &self.shares[op * self.threads..(op + 1) * self.threads];
        TaskShares { shares, count: count.min(LOW as usize) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes made before the barrier are seen by every thread after it, round after round.
    #[test]
    fn barrier_orders_writes_between_rounds() {
        let threads = 3;
        let rounds = 200;
        let barrier = SpinBarrier::new(threads);
        let mut cells = SharedF32::default();
        cells.resize(threads);
        let (barrier, cells) = (&barrier, &cells);
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || {
                    for round in 0..rounds {
                        cells.store(t, &[(round * threads + t) as f32]);
                        barrier.wait();
                        let mut all = vec![0f32; threads];
                        cells.load(0, &mut all);
                        for (u, &v) in all.iter().enumerate() {
                            assert_eq!(v, (round * threads + u) as f32, "round {round}, thread {t} reading {u}");
                        }
                        barrier.wait();
                    }
                });
            }
        });
    }

    /// A thread that panics releases the others from the barrier (they panic instead of hanging).
    #[test]
    fn a_panic_poisons_the_barrier() {
        let barrier = SpinBarrier::new(2);
        let barrier = &barrier;
        let results: Vec<bool> = std::thread::scope(|s| {
            let a = s.spawn(move || {
                let _guard = barrier.poison_on_panic();
                panic!("deliberate");
            });
            let b = s.spawn(move || {
                let _guard = barrier.poison_on_panic();
                barrier.wait();
            });
            vec![a.join().is_err(), b.join().is_err()]
        });
        assert_eq!(results, vec![true, true]);
    }

    /// Every task goes to exactly one thread, whether the threads keep to their shares or steal,
    /// for task counts below, at and above the thread count.
    #[test]
    fn shares_hand_out_each_task_once() {
        for threads in [1usize, 2, 3] {
            for count in [0usize, 1, 2, 5, 64, 1000] {
                let mut pass = PassShares::default();
                pass.reset(2, threads);
                let op = pass.operation(1, count);
                let op = &op;
                let taken: Vec<Vec<usize>> = std::thread::scope(|s| {
                    let hs: Vec<_> = (0..threads)
                        .map(|t| {
                            s.spawn(move || {
                                let mut mine = Vec::new();
                                while let Some(i) = op.next(t) {
                                    mine.push(i);
                                    // Thread 0 is slow: the others finish and steal from it.
                                    if t == 0 {
                                        std::thread::yield_now();
                                    }
                                }
                                mine
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().expect("no panic")).collect()
                });
                let mut all: Vec<usize> = taken.iter().flatten().copied().collect();
                all.sort_unstable();
                assert_eq!(all, (0..count).collect::<Vec<_>>(), "threads {threads}, count {count}");
                // An owner takes its own tasks in order from its share's front.
                for (t, mine) in taken.iter().enumerate() {
                    let own: Vec<usize> = mine
                        .iter()
                        .copied()
                        .filter(|&i| op.range(t).0 as usize <= i && (i as u64) < op.range(t).1)
                        .collect();
                    assert!(own.windows(2).all(|w| w[0] < w[1]), "thread {t} takes its share in order");
                }
            }
        }
    }
}
