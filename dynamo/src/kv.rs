//! kiln's KV block events ([`kiln_engine::kv_events`]) as Dynamo's KV router reads them.
//!
//! Each stored block carries two hashes: `tokens_hash`, the router's own hash of the block's
//! tokens (`compute_block_hash_for_seq`: XXH3 of the tokens' little-endian bytes, seed 1337), which
//! it matches against the hashes of a request's prompt; and `block_hash`, the worker's id of the
//! block (kiln's chained id), by which later events name it (a child's parent, a removal).

use std::sync::{Arc, Mutex};

use dynamo_llm::kv_router::protocols::{
    compute_block_hash_for_seq, BlockHashOptions, ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData,
    KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData,
};
use dynamo_llm::kv_router::publisher::KvEventPublisher;
use kiln_engine::kv_events::{KvEvent, KvEventSink, KV_EVENT_BLOCK};

/// Where the scheduler's events go: to Dynamo's publisher once the worker has made it, kept
/// until then (the worker asks for the event sources after the engine started).
#[derive(Clone, Default)]
pub struct Publisher {
    inner: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    publisher: Option<Arc<KvEventPublisher>>,
    pending: Vec<KvEvent>,
}

impl Publisher {
    /// From now on events go to `p`; those kept so far go first.
    pub fn connect(&self, p: Arc<KvEventPublisher>) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let pending = std::mem::take(&mut s.pending);
        send(&p, pending);
        s.publisher = Some(p);
    }
}

impl KvEventSink for Publisher {
    fn publish(&mut self, events: Vec<KvEvent>) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match &s.publisher {
            Some(p) => send(p, events),
            None => s.pending.extend(events),
        }
    }
}

fn send(p: &KvEventPublisher, events: Vec<KvEvent>) {
    for e in events {
        let data = to_dynamo(e);
        if p.publish(KvCacheEvent { event_id: p.next_event_id(), data, dp_rank: 0 }).is_err() {
            // The publisher is shutting down with the worker.
            tracing::debug!("KV event dropped: the publisher has stopped");
            return;
        }
    }
}

/// One kiln event as Dynamo's.
pub fn to_dynamo(e: KvEvent) -> KvCacheEventData {
    match e {
        KvEvent::Cleared => KvCacheEventData::Cleared,
        KvEvent::Removed { ids } => KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: ids.into_iter().map(ExternalSequenceBlockHash).collect(),
        }),
        KvEvent::Stored { parent, blocks } => KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: parent.map(ExternalSequenceBlockHash),
            start_position: None,
            blocks: blocks
                .into_iter()
                .map(|b| KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(b.id),
                    tokens_hash: compute_block_hash_for_seq(
                        &b.tokens,
                        KV_EVENT_BLOCK as u32,
                        BlockHashOptions::default(),
                    )[0],
                    mm_extra_info: None,
                })
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_engine::kv_events::StoredBlock;

    /// A stored block's token hash is the one the router computes for a prompt holding it.
    #[test]
    fn stored_blocks_carry_the_routers_hash_of_their_tokens() {
        let prompt: Vec<u32> = (0..40).map(|i| 1000 + i).collect();
        let router = compute_block_hash_for_seq(&prompt, KV_EVENT_BLOCK as u32, BlockHashOptions::default());
        assert_eq!(router.len(), 2, "whole blocks only");
        let e =
            KvEvent::Stored { parent: Some(7), blocks: vec![StoredBlock { id: 99, tokens: prompt[16..32].to_vec() }] };
        let KvCacheEventData::Stored(s) = to_dynamo(e) else { panic!("not stored") };
        assert_eq!(s.parent_hash, Some(ExternalSequenceBlockHash(7)));
        assert_eq!(s.blocks[0].block_hash, ExternalSequenceBlockHash(99));
        assert_eq!(s.blocks[0].tokens_hash, router[1]);
        let KvCacheEventData::Removed(r) = to_dynamo(KvEvent::Removed { ids: vec![99] }) else { panic!() };
        assert_eq!(r.block_hashes, vec![ExternalSequenceBlockHash(99)]);
    }
}
