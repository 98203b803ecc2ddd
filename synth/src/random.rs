//! Seeded randomness helpers: every stream is a ChaCha8 stream derived from
//! the user's seed, so output never depends on time, threads or hashing.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// SplitMix64 finaliser: a fast, well-mixed 64-bit hash.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Independent random domains derived from one seed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Domain {
    /// Per-person identity (stream = global person index).
    Person = 1,
    /// Per-trust sequential generation (stream = trust index).
    Trust = 2,
}

/// A 256-bit ChaCha key for `domain`, derived from `seed`.
pub(crate) fn key(seed: u64, domain: Domain) -> [u8; 32] {
    let mut key = [0u8; 32];
    let base = mix(seed) ^ mix(domain as u64);
    for (i, chunk) in key.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&mix(base.wrapping_add(i as u64)).to_le_bytes());
    }
    key
}

/// Stream `stream` of the generator keyed by `key`. Creating one is cheap,
/// which allows random access to per-person streams.
pub(crate) fn stream(key: [u8; 32], stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(stream);
    rng
}

/// Picks from a small table of `(value, weight)` pairs.
pub(crate) fn pick<T: Copy>(rng: &mut impl Rng, table: &[(T, u32)]) -> T {
    let total: u32 = table.iter().map(|&(_, w)| w).sum();
    let mut ticket = rng.random_range(0..total);
    for &(value, weight) in table {
        if ticket < weight {
            return value;
        }
        ticket -= weight;
    }
    table[table.len() - 1].0
}

/// A uniform draw from the half-open interval (0, 1].
pub(crate) fn unit_open(rng: &mut impl Rng) -> f64 {
    1.0 - rng.random::<f64>()
}
