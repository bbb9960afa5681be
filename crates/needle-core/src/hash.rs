//! Non-cryptographic hashes: FNV-1a over bytes (identities of data and runs, store buckets),
//! FNV-1a over 64-bit words (the checksum of index files of format 1), a 64-bit finaliser that
//! spreads the bits of either before they are reduced to a bucket, and [`Checksum`], the
//! checksum every file format of needle writes.
//!
//! None of these resist a chosen input; they find accidents (a changed file, a different log).

/// Start value of an FNV-1a 64 hash (its offset basis).
pub const FNV1A64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV1A64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Folds `bytes` into the FNV-1a 64 hash `h`; start from [`FNV1A64_OFFSET`].
pub fn fnv1a64(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV1A64_PRIME))
}

/// Folds `bytes` (a multiple of 8 long; a shorter tail is ignored) into `h` one little-endian
/// 64-bit word at a time: one xor and one multiply per 8 bytes. Each step is a bijection of the
/// state for a fixed word, so changing any single word always changes the result.
pub fn fnv1a64_words(mut h: u64, bytes: &[u8]) -> u64 {
    debug_assert_eq!(bytes.len() % 8, 0);
    for w in bytes.chunks_exact(8) {
        let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        h = (h ^ w).wrapping_mul(FNV1A64_PRIME);
    }
    h
}

/// MurmurHash3's 64-bit finaliser: every input bit affects every output bit, which FNV's low
/// bits alone do not guarantee.
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The checksum of needle's files (the binary dataset, index files): 64 bits over 8-byte words
/// in four independent lanes, so it runs at memory speed; detects torn writes and flipped
/// bytes, not an adversary.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(bytes);
    c.finish()
}

const P: u64 = 0x9e37_79b9_7f4a_7c15;

/// [`checksum`] over data that arrives in pieces.
pub struct Checksum {
    lanes: [u64; 4],
    pending: [u8; 32],
    n_pending: usize,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum::new()
    }
}

impl Checksum {
    pub fn new() -> Checksum {
        Checksum {
            lanes: [0x243f_6a88_85a3_08d3, 0x1319_8a2e_0370_7344, 0xa409_3822_299f_31d0, 0x082e_fa98_ec4e_6c89],
            pending: [0; 32],
            n_pending: 0,
            len: 0,
        }
    }

    fn block(&mut self, b: &[u8]) {
        for (lane, w) in self.lanes.iter_mut().zip(b.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            *lane = (*lane ^ u64::from_le_bytes(a)).wrapping_mul(P).rotate_left(29);
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if self.n_pending > 0 {
            let take = (32 - self.n_pending).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            self.pending[self.n_pending..self.n_pending + take].copy_from_slice(head);
            self.n_pending += take;
            bytes = rest;
            if self.n_pending < 32 {
                return;
            }
            let p = self.pending;
            self.block(&p);
            self.n_pending = 0;
        }
        let mut blocks = bytes.chunks_exact(32);
        for b in &mut blocks {
            self.block(b);
        }
        let rem = blocks.remainder();
        self.pending[..rem.len()].copy_from_slice(rem);
        self.n_pending = rem.len();
    }

    pub fn finish(&self) -> u64 {
        let mut h = self.len.wrapping_mul(P);
        for lane in self.lanes {
            h = (h ^ lane).wrapping_mul(P).rotate_left(31);
        }
        for &byte in &self.pending[..self.n_pending] {
            h = (h ^ u64::from(byte)).wrapping_mul(P);
        }
        h ^ (h >> 29)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_its_published_test_vectors() {
        assert_eq!(fnv1a64(FNV1A64_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(FNV1A64_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(FNV1A64_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        // Chained calls equal one call over the concatenation.
        assert_eq!(fnv1a64(fnv1a64(FNV1A64_OFFSET, b"foo"), b"bar"), fnv1a64(FNV1A64_OFFSET, b"foobar"));
    }

    #[test]
    fn word_hash_sees_every_word() {
        let a = [1u8; 24];
        let mut b = a;
        b[17] ^= 1;
        assert_ne!(fnv1a64_words(FNV1A64_OFFSET, &a), fnv1a64_words(FNV1A64_OFFSET, &b));
        assert_ne!(fmix64(1), fmix64(2));
    }
}
