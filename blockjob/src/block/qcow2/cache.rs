//! The small least-recently-used cache behind the L2 table and refcount
//! block caches, keyed by a table's host offset.
//!
//! Every qcow2 request looks up one L2 table here, so the lookup is on
//! the request path: keys are hashed with one folded multiply instead of
//! SipHash (the keys are cluster-aligned file offsets chosen by the image,
//! and the map holds at most a few hundred of them, so resistance to
//! chosen collisions buys nothing).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes a `u64` key with one 64×64→128 multiply folded to 64 bits: the
/// low bits of cluster-aligned offsets are all zero, and the fold spreads
/// the high ones into both the bucket index and the control byte.
#[derive(Default)]
pub(crate) struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        const K: u128 = 0x9e37_79b9_7f4a_7c15;
        let p = u128::from(self.0) * K;
        (p as u64) ^ ((p >> 64) as u64)
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used for `u64` keys; kept correct for any other key.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 ^= k;
    }
}

type OffsetMap<V> = HashMap<u64, (V, u64), BuildHasherDefault<OffsetHasher>>;

/// A tiny LRU: a map plus a use counter; evicts the least recent entry.
pub(crate) struct Lru<V> {
    map: OffsetMap<V>,
    clock: u64,
    pub(crate) cap: usize,
}

impl<V> Lru<V> {
    /// An empty cache holding at most `cap` entries (at least 2).
    pub(crate) fn new(cap: usize) -> Self {
        Lru {
            map: OffsetMap::default(),
            clock: 0,
            cap: cap.max(2),
        }
    }

    /// The entry for `k`, marked most recently used.
    pub(crate) fn get(&mut self, k: u64) -> Option<&mut V> {
        self.clock += 1;
        let c = self.clock;
        self.map.get_mut(&k).map(|(v, t)| {
            *t = c;
            v
        })
    }

    /// Whether `k` is cached (does not count as a use).
    pub(crate) fn contains(&self, k: u64) -> bool {
        self.map.contains_key(&k)
    }

    /// The entry for `k`, without counting a use.
    pub(crate) fn peek(&self, k: u64) -> Option<&V> {
        self.map.get(&k).map(|(v, _)| v)
    }

    /// The key [`insert`](Self::insert) would evict to make room for
    /// `k`: none when `k` is cached or there is room.
    pub(crate) fn victim(&self, k: u64) -> Option<u64> {
        if self.map.len() < self.cap || self.map.contains_key(&k) {
            return None;
        }
        self.map
            .iter()
            .min_by_key(|(_, (_, t))| *t)
            .map(|(&k, _)| k)
    }

    /// Drops `k` from the cache.
    pub(crate) fn remove(&mut self, k: u64) -> Option<V> {
        self.map.remove(&k).map(|(v, _)| v)
    }

    /// Inserts or replaces `k`, evicting the least recently used entry
    /// first when the cache is full and `k` is new.
    pub(crate) fn insert(&mut self, k: u64, v: V) {
        if let Some(old) = self.victim(k) {
            self.map.remove(&old);
        }
        self.clock += 1;
        self.map.insert(k, (v, self.clock));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut c = Lru::new(3);
        c.insert(0x10000, 1);
        c.insert(0x20000, 2);
        c.insert(0x30000, 3);
        // Use the oldest: the second one becomes the least recent.
        assert_eq!(c.get(0x10000).copied(), Some(1));
        c.insert(0x40000, 4);
        assert!(c.contains(0x10000));
        assert!(!c.contains(0x20000));
        assert!(c.contains(0x30000));
        assert!(c.contains(0x40000));
        assert_eq!(c.get(0x20000), None);
    }

    #[test]
    fn the_victim_is_what_insert_evicts() {
        let mut c = Lru::new(2);
        assert_eq!(c.victim(0x10000), None);
        c.insert(0x10000, 1);
        c.insert(0x20000, 2);
        // Cached keys and a cache with room evict nothing.
        assert_eq!(c.victim(0x20000), None);
        assert_eq!(c.victim(0x30000), Some(0x10000));
        assert_eq!(c.peek(0x10000).copied(), Some(1));
        // `peek` is not a use: the first key is still the victim.
        assert_eq!(c.victim(0x30000), Some(0x10000));
        c.get(0x10000);
        assert_eq!(c.victim(0x30000), Some(0x20000));
        assert_eq!(c.remove(0x20000), Some(2));
        assert_eq!(c.victim(0x30000), None);
    }

    #[test]
    fn replacing_a_key_evicts_nothing() {
        let mut c = Lru::new(2);
        c.insert(0x10000, 1);
        c.insert(0x20000, 2);
        c.insert(0x10000, 10);
        assert_eq!(c.get(0x10000).copied(), Some(10));
        assert_eq!(c.get(0x20000).copied(), Some(2));
    }

    #[test]
    fn capacity_is_at_least_two() {
        let mut c = Lru::new(0);
        c.insert(1 << 16, 'a');
        c.insert(2 << 16, 'b');
        assert!(c.contains(1 << 16) && c.contains(2 << 16));
        c.insert(3 << 16, 'c');
        assert!(!c.contains(1 << 16));
    }

    #[test]
    fn entries_change_in_place() {
        let mut c = Lru::new(4);
        c.insert(0x50000, vec![0u64; 4]);
        if let Some(t) = c.get(0x50000) {
            t[2] = 7;
        }
        assert_eq!(c.get(0x50000).map(|t| t[2]), Some(7));
    }

    #[test]
    fn aligned_offsets_spread_over_buckets_and_control_bytes() {
        let b = BuildHasherDefault::<OffsetHasher>::default();
        let mut low = std::collections::HashSet::new();
        let mut top = std::collections::HashSet::new();
        for i in 1..=256u64 {
            let h = b.hash_one(i << 16);
            low.insert(h & 0xff);
            top.insert(h >> 57);
        }
        // 256 cluster-aligned keys: many distinct bucket indices and
        // control bytes, not the handful an identity hash would give.
        assert!(low.len() > 128, "{} distinct low bytes", low.len());
        assert!(top.len() > 64, "{} distinct top bits", top.len());
    }

    #[test]
    fn many_keys_round_trip() {
        let mut c = Lru::new(256);
        for i in 0..256u64 {
            c.insert(i << 16, i);
        }
        for i in 0..256u64 {
            assert_eq!(c.get(i << 16).copied(), Some(i));
        }
    }
}
