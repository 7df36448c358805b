//! Bookkeeping of the paged KV cache: which blocks are free, which are in use and by how many
//! sequences, and which hold a known run of prompt tokens that a later prompt may share.
//!
//! A block is `block` consecutive positions of one sequence. A block whose keys and values were
//! computed for a known token prefix can be *registered*: its key is (the registered block before
//! it, its own tokens), so a chain of keys names a whole prefix without hashing it again, and
//! looking up a prompt walks the chain block by block. Every registration gets a fresh content
//! id, never reused, and keys name the parent by that id: when a block is evicted and reused for
//! other content, the keys of blocks that followed it can no longer match anything.
//!
//! Registered blocks nobody uses stay cached (least recently released evicted first) until their
//! room is needed. Admission reserves every block a sequence may need up front, so a running
//! sequence never runs out of blocks: a request that does not fit waits instead.

use std::collections::{BTreeMap, HashMap};

/// A change of what the pool's prefix cache holds (told to a router in front of several
/// workers: kiln-engine's `kv_events`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolEvent {
    /// A block was registered: content id `id`, following the block of content id `parent`
    /// (`None`: a sequence's first block), holding `tokens`.
    Registered { id: u64, parent: Option<u64>, tokens: Vec<u32> },
    /// The block of content id `id` was evicted (its content forgotten).
    Evicted { id: u64 },
}

/// Content id meaning "no block before": the key of a sequence's first block.
const ROOT: u64 = 0;

#[derive(Debug)]
pub struct BlockPool {
    /// Positions per block.
    pub block: usize,
    refs: Vec<u32>,
    /// Blocks holding nothing worth keeping.
    free: Vec<u32>,
    /// Registered blocks with no user, by release time (oldest first: evicted first).
    cached: BTreeMap<u64, u32>,
    /// When each cached block was released (its key in `cached`).
    released_at: Vec<u64>,
    tick: u64,
    /// Registered blocks: content id and key.
    cid: Vec<u64>,
    key: Vec<Option<(u64, Vec<u32>)>>,
    index: HashMap<(u64, Vec<u32>), u32>,
    next_cid: u64,
    /// Blocks promised to admitted sequences and not yet taken.
    reserved: usize,
    /// Registrations and evictions since [`BlockPool::take_events`].
    events: Vec<PoolEvent>,
}

impl BlockPool {
    pub fn new(n_blocks: usize, block: usize) -> BlockPool {
        BlockPool {
            block: block.max(1),
            refs: vec![0; n_blocks],
            free: (0..n_blocks as u32).rev().collect(),
            cached: BTreeMap::new(),
            released_at: vec![0; n_blocks],
            tick: 0,
            cid: vec![ROOT; n_blocks],
            key: vec![None; n_blocks],
            index: HashMap::new(),
            next_cid: ROOT + 1,
            reserved: 0,
            events: Vec::new(),
        }
    }

    pub fn n_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks used by at least one sequence.
    pub fn in_use(&self) -> usize {
        self.n_blocks() - self.free.len() - self.cached.len()
    }

    /// Registered blocks kept for later prompts, used by nobody now.
    pub fn cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks that can still be promised (free or evictable, minus reservations).
    pub fn available(&self) -> usize {
        (self.free.len() + self.cached.len()).saturating_sub(self.reserved)
    }

    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// The registered blocks holding the leading whole blocks of `tokens`, in order (at most
    /// `max_blocks`).
    pub fn lookup(&self, tokens: &[u32], max_blocks: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut parent = ROOT;
        for chunk in tokens.chunks_exact(self.block).take(max_blocks) {
            match self.index.get(&(parent, chunk.to_vec())) {
                Some(&b) => {
                    out.push(b);
                    parent = self.cid[b as usize];
                }
                None => break,
            }
        }
        out
    }

    /// Whether `shared` (from [`BlockPool::lookup`]) plus `more` new blocks can be had now.
    pub fn can_admit(&self, shared: &[u32], more: usize) -> bool {
        // Sharing a cached block takes it out of the evictable ones.
        let revived = shared.iter().filter(|&&b| self.refs[b as usize] == 0).count();
        self.available() >= more + revived
    }

    /// Takes `shared` for one more sequence and reserves `more` blocks for it. Check
    /// [`BlockPool::can_admit`] first; returns false (nothing changed) when it does not hold.
    pub fn admit(&mut self, shared: &[u32], more: usize) -> bool {
        if !self.can_admit(shared, more) {
            return false;
        }
        for &b in shared {
            let r = &mut self.refs[b as usize];
            if *r == 0 {
                self.cached.remove(&self.released_at[b as usize]);
            }
            *r += 1;
        }
        self.reserved += more;
        true
    }

    /// One block out of a reservation: a free one, else the least recently released cached one
    /// (forgetting its content). `None` only when nothing was reserved.
    pub fn take(&mut self) -> Option<u32> {
        if self.reserved == 0 {
            return None;
        }
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.cached.pop_first()?;
                self.forget(b);
                b
            }
        };
        self.reserved -= 1;
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// A sequence gives back `blocks` and the `unused` blocks of its reservation.
    pub fn release(&mut self, blocks: &[u32], unused: usize) {
        self.reserved = self.reserved.saturating_sub(unused);
        for &b in blocks {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "block {b} released twice");
            *r = r.saturating_sub(1);
            if *r == 0 {
                if self.key[b as usize].is_some() {
                    self.tick += 1;
                    self.released_at[b as usize] = self.tick;
                    self.cached.insert(self.tick, b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// Records that `block` holds the keys and values of `tokens` (one whole block) following
    /// `parent` (None: the sequence's first block), so later prompts can share it. Nothing happens
    /// when the parent is not registered, or when another block already holds this content.
    pub fn register(&mut self, block: u32, parent: Option<u32>, tokens: &[u32]) {
        if tokens.len() != self.block || self.key[block as usize].is_some() {
            return;
        }
        let parent_cid = match parent {
            None => ROOT,
            Some(p) if self.key[p as usize].is_some() => self.cid[p as usize],
            Some(_) => return,
        };
        let key = (parent_cid, tokens.to_vec());
        if self.index.contains_key(&key) {
            return;
        }
        self.index.insert(key.clone(), block);
        self.key[block as usize] = Some(key);
        self.cid[block as usize] = self.next_cid;
        let parent = (parent_cid != ROOT).then_some(parent_cid);
        self.events.push(PoolEvent::Registered { id: self.next_cid, parent, tokens: tokens.to_vec() });
        self.next_cid += 1;
    }

    /// Whether `block` is registered.
    pub fn is_registered(&self, block: u32) -> bool {
        self.key[block as usize].is_some()
    }

    /// The registrations and evictions since the last call.
    pub fn take_events(&mut self) -> Vec<PoolEvent> {
        std::mem::take(&mut self.events)
    }

    fn forget(&mut self, b: u32) {
        if let Some(k) = self.key[b as usize].take() {
            self.index.remove(&k);
            self.events.push(PoolEvent::Evicted { id: self.cid[b as usize] });
        }
        self.cid[b as usize] = ROOT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + seed).collect()
    }

    /// A sequence of `n` tokens admitted with nothing shared, its blocks taken and registered.
    fn fill(p: &mut BlockPool, t: &[u32]) -> Vec<u32> {
        let n = t.len().div_ceil(p.block);
        assert!(p.admit(&[], n));
        let blocks: Vec<u32> = (0..n).map(|_| p.take().unwrap()).collect();
        for (i, c) in t.chunks_exact(p.block).enumerate() {
            p.register(blocks[i], i.checked_sub(1).map(|j| blocks[j]), c);
        }
        blocks
    }

    #[test]
    fn shared_prefix_is_found_block_by_block() {
        let mut p = BlockPool::new(16, 4);
        let a = toks(10, 1);
        let ba = fill(&mut p, &a);
        assert_eq!(p.in_use(), 3);
        // Only whole blocks are registered: 2 of the 3.
        let mut b = a[..8].to_vec();
        b.extend([99, 98, 97, 96, 95]);
        assert_eq!(p.lookup(&b, usize::MAX), ba[..2].to_vec());
        assert_eq!(p.lookup(&b, 1), ba[..1].to_vec());
        // A different first block shares nothing, even with the same second block.
        let mut c = a.clone();
        c[0] = 1000;
        assert!(p.lookup(&c, usize::MAX).is_empty());
        // Sharing takes no new block.
        let shared = p.lookup(&b, usize::MAX);
        assert!(p.admit(&shared, 2));
        assert_eq!(p.in_use(), 3);
    }

    #[test]
    fn released_registered_blocks_stay_cached_until_needed() {
        let mut p = BlockPool::new(4, 2);
        let a = toks(4, 3);
        let ba = fill(&mut p, &a);
        p.release(&ba, 0);
        assert_eq!((p.in_use(), p.cached(), p.available()), (0, 2, 4));
        assert_eq!(p.lookup(&a, usize::MAX), ba);
        // Needing every block evicts the cached ones, oldest first; their content is forgotten.
        assert!(p.admit(&[], 4));
        let taken: Vec<u32> = (0..4).map(|_| p.take().unwrap()).collect();
        assert_eq!(p.take(), None, "nothing beyond the reservation");
        assert!(p.lookup(&a, usize::MAX).is_empty());
        // Registrations and evictions are told (a router's view of the prefix cache).
        let ev = p.take_events();
        let ids: Vec<u64> = ev
            .iter()
            .filter_map(|e| match e {
                PoolEvent::Registered { id, .. } => Some(*id),
                PoolEvent::Evicted { .. } => None,
            })
            .collect();
        assert_eq!(ev.len(), 4, "{ev:?}");
        assert_eq!(ev[0], PoolEvent::Registered { id: ids[0], parent: None, tokens: a[..2].to_vec() });
        assert_eq!(ev[1], PoolEvent::Registered { id: ids[1], parent: Some(ids[0]), tokens: a[2..].to_vec() });
        assert_eq!(ev[2..], [PoolEvent::Evicted { id: ids[0] }, PoolEvent::Evicted { id: ids[1] }]);
        // Reusing the evicted parent for other content does not revive the old child's key.
        let x = [50, 51];
        p.register(taken[3], None, &x);
        let mut y = x.to_vec();
        y.extend_from_slice(&a[2..4]);
        assert_eq!(p.lookup(&y, usize::MAX).len(), 1);
    }

    #[test]
    fn admission_counts_reservations_and_revived_blocks() {
        let mut p = BlockPool::new(6, 2);
        let a = toks(4, 5);
        let ba = fill(&mut p, &a);
        p.release(&ba, 0);
        assert!(p.admit(&[], 3));
        // 6 blocks: 3 reserved, 2 cached (evictable), 1 free → 3 more can be promised, but
        // reviving the 2 cached ones uses 2 of those.
        assert_eq!(p.available(), 3);
        assert!(!p.can_admit(&ba, 2));
        assert!(p.can_admit(&ba, 1));
        assert!(!p.admit(&[], 4));
        p.release(&[], 3);
        assert_eq!(p.available(), 6);
    }

    #[test]
    fn a_block_used_twice_is_freed_after_its_last_user() {
        let mut p = BlockPool::new(4, 2);
        let a = toks(2, 9);
        let ba = fill(&mut p, &a);
        let shared = p.lookup(&a, usize::MAX);
        assert!(p.admit(&shared, 0));
        p.release(&ba, 0);
        assert_eq!(p.in_use(), 1);
        p.release(&shared, 0);
        assert_eq!((p.in_use(), p.cached()), (0, 1));
    }
}
