//! Index files of every kind (exact, IVF-Flat, HNSW).

use needle_index::{load, SearchOptions};

use crate::{put, scratch, selector};

/// Bytes of the index file header; the checksum is its last 8 (the layout of `needle-index`'s
/// `format.rs`).
const HEADER: usize = 80;

/// Widest query the target builds; a header may claim any dimension up to 2^32 with no vectors.
const MAX_QUERY_DIM: usize = 1 << 16;

/// `needle_index::load` over an index file made of the bytes, whatever kind its header names.
///
/// Selector bit 0 reseals the file first (see [`reseal_index`]). An index that loads is searched
/// plainly, with a filter and with a search effort of its own, so that a structure which passed
/// the loader's checks but would crash or loop on a query is caught.
pub fn index(data: &[u8]) -> bool {
    let (sel, body) = selector(data);
    let bytes = if sel & 1 != 0 { reseal_index(body) } else { body.to_vec() };
    let dir = scratch();
    let path = dir.path().join("index.bin");
    put(&path, &bytes);
    let Ok(ix) = load(&path) else {
        return false;
    };
    let (dim, n) = (ix.dim(), ix.len());
    let _ = (ix.kind(), ix.params(), ix.memory_bytes(), ix.is_empty());
    if dim > MAX_QUERY_DIM {
        return true;
    }
    let query: Vec<f32> = (0..dim).map(|i| 1.0 - (i % 7) as f32 * 0.25).collect();
    let mut out = Vec::new();
    let k = 10;
    let check = |out: &[(u32, f32)]| {
        assert!(out.len() <= k.min(n), "{} results for k = {k} over {n} vectors", out.len());
        if out.iter().all(|r| r.1.is_finite()) {
            assert!(out.windows(2).all(|w| w[0].1 >= w[1].1), "results are not best first: {out:?}");
        }
    };
    if ix.search(&query, k, &mut out).is_ok() {
        check(&out);
    }
    let even = |id: u32| id.is_multiple_of(2);
    if ix.search_filtered(&query, k, &even, &mut out).is_ok() {
        check(&out);
        assert!(out.iter().all(|&(id, _)| even(id)), "the filter let an odd id through");
    }
    let opts = SearchOptions { effort: Some(3), keep: None };
    if ix.search_with(&query, k, &opts, &mut out).is_ok() {
        check(&out);
    }
    true
}

/// The file with its payload length and checksum recomputed from its bytes, so that mutations
/// reach the section decoding; left as it is when the payload is not whole 8-byte words.
pub fn reseal_index(body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    if out.len() < HEADER || !(out.len() - HEADER).is_multiple_of(8) {
        return out;
    }
    let payload = (out.len() - HEADER) as u64;
    out[64..72].copy_from_slice(&payload.to_le_bytes());
    if let Some(h) = needle_index::image_checksum(&out) {
        out[72..80].copy_from_slice(&h.to_le_bytes());
    }
    out
}
