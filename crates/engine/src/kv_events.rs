//! What the scheduler's KV caches hold, told as events about whole blocks of tokens, so that a
//! router in front of several workers can send a request to the one that already holds its
//! prefix (NVIDIA Dynamo's KV-aware routing; vLLM's KV events are the same shape).
//!
//! A block is [`KV_EVENT_BLOCK`] consecutive positions starting at a multiple of it; only full
//! blocks are told, each with its tokens and the id of the block before it. Ids are unique
//! within a worker: on the CPU a chained hash of the block's tokens and every token before it
//! ([`block_id`]); on the GPU the prefix cache's content ids (fresh for every registration). A block is stored when the first cache
//! comes to hold it and removed when the last one stops holding it (a slot overwritten by another
//! prompt, a generation cut back, a failed sequence forgotten; on the GPU, a cached block evicted).

use std::collections::HashMap;
use std::hash::Hasher;

/// Positions per block; the GPU's paged cache uses the same blocks.
pub const KV_EVENT_BLOCK: usize = crate::backend::KV_BLOCK_POSITIONS;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlock {
    /// The block's id: a hash of its tokens and of its parent's id.
    pub id: u64,
    pub tokens: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks now held, in order: each follows the one before it; the first follows `parent`
    /// (`None`: it starts the sequence).
    Stored { parent: Option<u64>, blocks: Vec<StoredBlock> },
    /// Blocks no longer held.
    Removed { ids: Vec<u64> },
    /// Nothing is held any more (sent once at the start, so a router forgets what an earlier
    /// process of the same worker held).
    Cleared,
}

/// Where the scheduler sends its KV events, after each step that changed what is held.
pub trait KvEventSink: Send {
    fn publish(&mut self, events: Vec<KvEvent>);
}

/// The id of a block of `tokens` that follows the block `parent` (FNV-1a over the parent's id
/// and the tokens' little-endian bytes: stable across processes and builds, so a restarted
/// worker names its blocks as before).
pub fn block_id(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = Fnv64::default();
    h.write_u64(parent.unwrap_or(0));
    for &t in tokens {
        h.write(&t.to_le_bytes());
    }
    h.finish()
}

struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Fnv64 {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv64 {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The blocks held by a set of per-slot caches (the CPU scheduler's), counted across slots: two
/// slots with the same prefix hold its blocks once.
#[derive(Default)]
pub struct BlockTracker {
    /// Per slot: the ids of its full blocks, in order.
    slots: Vec<Vec<u64>>,
    /// Id → how many slots hold it.
    held: HashMap<u64, usize>,
    events: Vec<KvEvent>,
}

impl BlockTracker {
    pub fn new(n_slots: usize) -> BlockTracker {
        BlockTracker { slots: vec![Vec::new(); n_slots], held: HashMap::new(), events: vec![KvEvent::Cleared] }
    }

    /// Slot `slot` now holds `tokens`; its first `unchanged` tokens are the ones it held at the
    /// previous call (positions from there on may have been replaced).
    pub fn sync(&mut self, slot: usize, tokens: &[u32], unchanged: usize) {
        let ids = &mut self.slots[slot];
        let keep = (unchanged.min(tokens.len()) / KV_EVENT_BLOCK).min(ids.len());
        let gone: Vec<u64> = ids.drain(keep..).collect();
        let mut removed = Vec::new();
        for id in gone {
            if let Some(n) = self.held.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(&id);
                    removed.push(id);
                }
            }
        }
        if !removed.is_empty() {
            self.events.push(KvEvent::Removed { ids: removed });
        }
        let mut run: Option<(Option<u64>, Vec<StoredBlock>)> = None;
        for b in keep..tokens.len() / KV_EVENT_BLOCK {
            let parent = ids.last().copied();
            let chunk = &tokens[b * KV_EVENT_BLOCK..(b + 1) * KV_EVENT_BLOCK];
            let id = block_id(parent, chunk);
            ids.push(id);
            let n = self.held.entry(id).or_insert(0);
            *n += 1;
            if *n == 1 {
                run.get_or_insert_with(|| (parent, Vec::new())).1.push(StoredBlock { id, tokens: chunk.to_vec() });
            } else if let Some((parent, blocks)) = run.take() {
                // Held already by another slot: the run of new blocks ends here.
                self.events.push(KvEvent::Stored { parent, blocks });
            }
        }
        if let Some((parent, blocks)) = run {
            self.events.push(KvEvent::Stored { parent, blocks });
        }
    }

    /// The events since the last call.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// Ids held now, by any slot.
    pub fn n_held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn full_blocks_are_stored_once_across_slots_and_removed_with_the_last_holder() {
        let mut t = BlockTracker::new(2);
        assert_eq!(t.take_events(), vec![KvEvent::Cleared]);
        let a = toks(40, 1); // 2 full blocks + 8 positions
        t.sync(0, &a, 0);
        let ev = t.take_events();
        let [KvEvent::Stored { parent: None, blocks }] = &ev[..] else { panic!("{ev:?}") };
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].tokens, a[..16]);
        assert_eq!(blocks[1].id, block_id(Some(blocks[0].id), &a[16..32]));
        // The same prefix in the other slot, then 2 more blocks of its own.
        let mut b = a[..32].to_vec();
        b.extend(toks(32, 99));
        t.sync(1, &b, 0);
        let ev = t.take_events();
        let [KvEvent::Stored { parent: Some(p), blocks: nb }] = &ev[..] else { panic!("{ev:?}") };
        assert_eq!(*p, blocks[1].id);
        assert_eq!(nb.len(), 2);
        assert_eq!(t.n_held(), 4);
        // Slot 0 is overwritten from position 10: its 2 blocks stay held by slot 1.
        let c: Vec<u32> = a[..10].iter().copied().chain(toks(30, 5)).collect();
        t.sync(0, &c, 10);
        let ev = t.take_events();
        assert!(!ev.iter().any(|e| matches!(e, KvEvent::Removed { .. })), "{ev:?}");
        assert_eq!(ev.len(), 1);
        // Slot 1 cut back to 20 positions: its last 3 blocks go (the second one no longer held
        // by slot 0 either), the first stays.
        t.sync(1, &b[..20], 20);
        let ev = t.take_events();
        let gone = [blocks[1].id, nb[0].id, nb[1].id];
        assert_eq!(ev, vec![KvEvent::Removed { ids: gone.to_vec() }]);
        assert_eq!(t.n_held(), 3);
        // A partial block that fills up is stored when full.
        let mut d = b[..20].to_vec();
        d.extend(toks(12, 3));
        t.sync(1, &d, 20);
        let ev = t.take_events();
        let [KvEvent::Stored { parent: Some(p), blocks }] = &ev[..] else { panic!("{ev:?}") };
        assert_eq!((*p, blocks.len()), (block_id(None, &a[..16]), 1));
    }

    #[test]
    fn ids_chain_over_the_whole_prefix() {
        let a = toks(32, 1);
        let mut b = a.clone();
        b[0] += 1;
        let id = |t: &[u32]| block_id(Some(block_id(None, &t[..16])), &t[16..32]);
        assert_ne!(id(&a), id(&b), "same second block, different first block: different ids");
        assert_eq!(id(&a), id(&a.clone()));
    }
}
