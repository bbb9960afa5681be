//! Byte-level parsing helpers shared by the loaders.
//!
//! Files are read whole and parsed as bytes so that (a) Latin-1 and invalid UTF-8 never abort
//! a load by themselves, and (b) the hot loop over a million rows does no per-row allocation.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Reads a whole file; the error carries the path because std's does not.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

/// Iterator over non-empty lines with their 1-based line numbers.
///
/// Empty lines are skipped rather than reported because trailing blank lines are common in
/// the MovieLens files (u.genre ends with one) and carry no data. A trailing `\r` is
/// stripped so CRLF files parse the same as LF files.
pub(crate) struct Lines<'a> {
    rest: &'a [u8],
    line: usize,
}

impl<'a> Lines<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Lines { rest: data, line: 0 }
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = (usize, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.rest.is_empty() {
                return None;
            }
            self.line += 1;
            let (mut line, rest) = match self.rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let (l, r) = self.rest.split_at(i);
                    (l, r.get(1..).unwrap_or(&[]))
                }
                None => (self.rest, &[][..]),
            };
            self.rest = rest;
            if let Some((b'\r', head)) = line.split_last() {
                line = head;
            }
            if !line.is_empty() {
                return Some((self.line, line));
            }
        }
    }
}

/// Reads a file line by line through one reusable buffer, so a log of any size is parsed in
/// bounded memory. Same rules as [`Lines`]: 1-based line numbers, empty lines skipped, a
/// trailing `\r` stripped.
pub(crate) struct LineReader {
    path: PathBuf,
    file: std::fs::File,
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    eof: bool,
    line: usize,
    /// Bytes handed out as lines (or skipped as empty ones) so far, for progress.
    consumed: u64,
    /// File length at open, for progress.
    pub(crate) len: u64,
}

/// Read size; large enough that the per-read cost vanishes, small enough to stay in L2/L3.
const CHUNK: usize = 1 << 20;

impl LineReader {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(LineReader {
            path: path.to_path_buf(),
            file,
            buf: vec![0; CHUNK],
            pos: 0,
            filled: 0,
            eof: false,
            line: 0,
            consumed: 0,
            len,
        })
    }

    /// Bytes of the file consumed so far.
    pub(crate) fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The next non-empty line and its number, or `None` at the end of the file.
    pub(crate) fn next_line(&mut self) -> Result<Option<(usize, &[u8])>> {
        use std::io::Read;
        loop {
            let window = self.buf.get(self.pos..self.filled).unwrap_or(&[]);
            let found = memchr::memchr(b'\n', window);
            let (start, end, next) = match found {
                Some(i) => (self.pos, self.pos + i, self.pos + i + 1),
                None if self.eof && self.pos < self.filled => (self.pos, self.filled, self.filled),
                None if self.eof => return Ok(None),
                None => {
                    // Keep the partial line, then read more after it (growing only for a line
                    // longer than the buffer).
                    self.buf.copy_within(self.pos..self.filled, 0);
                    self.filled -= self.pos;
                    self.pos = 0;
                    if self.filled == self.buf.len() {
                        self.buf.resize(self.buf.len() * 2, 0);
                    }
                    let dst = self.buf.get_mut(self.filled..).unwrap_or(&mut []);
                    match self.file.read(dst) {
                        Ok(0) => self.eof = true,
                        Ok(n) => self.filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(DataError::io(&self.path, e)),
                    }
                    continue;
                }
            };
            self.consumed += (next - start) as u64;
            self.pos = next;
            self.line += 1;
            let mut l = self.buf.get(start..end).unwrap_or(&[]);
            if let Some((b'\r', head)) = l.split_last() {
                l = head;
            }
            if l.is_empty() {
                continue;
            }
            let line = self.line;
            // Re-borrow after the loop's mutations so the returned slice is the only borrow.
            let (a, b) = (start, start + l.len());
            return Ok(Some((line, self.buf.get(a..b).unwrap_or(&[]))));
        }
    }
}

/// Position of `needle` in `hay`; the one-byte case is the common one and gets a plain scan.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    match needle {
        [] => None,
        [b] => hay.iter().position(|x| x == b),
        _ => hay.windows(needle.len()).position(|w| w == needle),
    }
}

/// Splits `line` on `delim` into `out` (cleared first). `out` is reused across rows so the
/// loop does not allocate; all slices borrow the file buffer.
pub(crate) fn split_fields<'a>(line: &'a [u8], delim: &[u8], out: &mut Vec<&'a [u8]>) {
    out.clear();
    let mut rest = line;
    while let Some(i) = find(rest, delim) {
        let (field, tail) = rest.split_at(i);
        out.push(field);
        rest = tail.get(delim.len()..).unwrap_or(&[]);
    }
    out.push(rest);
}

/// Splits into exactly `N` fields, or returns the number actually found. Fixed-layout files
/// (MovieLens) use this so a short or long row is reported with its real field count.
pub(crate) fn split_exact<'a, const N: usize>(
    line: &'a [u8],
    delim: &[u8],
) -> std::result::Result<[&'a [u8]; N], usize> {
    let mut out: [&[u8]; N] = [&[]; N];
    let mut n = 0usize;
    let mut rest = line;
    loop {
        let (field, next) = match find(rest, delim) {
            Some(i) => {
                let (f, tail) = rest.split_at(i);
                (f, Some(tail.get(delim.len()..).unwrap_or(&[])))
            }
            None => (rest, None),
        };
        if let Some(slot) = out.get_mut(n) {
            *slot = field;
        }
        n += 1;
        match next {
            Some(r) => rest = r,
            None => break,
        }
    }
    if n == N {
        Ok(out)
    } else {
        Err(n)
    }
}

/// Trims ASCII whitespace on both ends (ids and numbers may be padded in hand-made files).
pub(crate) fn trim(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// Parses a signed decimal integer without going through `str`, with overflow checking.
pub(crate) fn parse_i64(b: &[u8]) -> Option<i64> {
    let b = trim(b);
    let (neg, digits) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, b),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(d - b'0');
        v = v.checked_mul(10)?;
        v = if neg { v.checked_sub(digit)? } else { v.checked_add(digit)? };
    }
    Some(v)
}

/// Returns the trimmed field as `&str` if it is a non-empty run of ASCII digits. MovieLens
/// ids must be numeric; keeping them as strings preserves the raw id for output.
pub(crate) fn numeric_id(b: &[u8]) -> Option<&str> {
    let b = trim(b);
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()
}

/// Parses a finite float; NaN/inf are rejected because they would poison rating-based losses.
pub(crate) fn parse_f32(b: &[u8]) -> Option<f32> {
    let s = std::str::from_utf8(trim(b)).ok()?;
    let v: f32 = s.parse().ok()?;
    v.is_finite().then_some(v)
}

/// Decodes ISO-8859-1: every byte maps to the code point of the same value, so this can
/// never fail (unlike UTF-8), which is why Latin-1 files need no bad-row handling for text.
pub(crate) fn latin1(b: &[u8]) -> String {
    b.iter().map(|&c| char::from(c)).collect()
}

/// Shows a field in an error message without flooding the terminal on a garbage row.
pub(crate) fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.chars().count() > 40 {
        let head: String = s.chars().take(40).collect();
        format!("{head:?}...")
    } else {
        format!("{s:?}")
    }
}

/// Collects bad rows of one file: either turns them into an error or counts them,
/// depending on `skip_bad_rows`. Keeps that policy in one place for all loaders.
pub(crate) struct RowSink {
    pub(crate) path: PathBuf,
    skip: bool,
    pub(crate) skipped: usize,
}

impl RowSink {
    pub(crate) fn new(path: &Path, skip: bool) -> Self {
        RowSink { path: path.to_path_buf(), skip, skipped: 0 }
    }

    /// Reports a bad row. `Ok(())` means "skip it and go on"; the reason is built lazily
    /// so well-formed rows never pay for formatting.
    pub(crate) fn bad(&mut self, line: usize, reason: impl FnOnce() -> String) -> Result<()> {
        if self.skip {
            self.skipped += 1;
            Ok(())
        } else {
            Err(DataError::BadRow { path: self.path.clone(), line, reason: reason() })
        }
    }

    /// [`RowSink::bad`] for sources without lines: `error` builds the error to return.
    pub(crate) fn bad_value(&mut self, error: impl FnOnce() -> DataError) -> Result<()> {
        if self.skip {
            self.skipped += 1;
            Ok(())
        } else {
            Err(error())
        }
    }

    /// Records the skip count in a load report's `(file, skipped rows)` list; files without
    /// skips are left out so the report stays short.
    pub(crate) fn finish(self, skipped: &mut Vec<(std::path::PathBuf, usize)>) {
        if self.skipped > 0 {
            skipped.push((self.path, self.skipped));
        }
    }
}

/// Small multiplicative hasher. The default SipHash is DoS-resistant, which we do not
/// need for local files, and is several times slower on the short ids we intern.
#[derive(Clone, Copy, Default)]
pub(crate) struct FastHash;

/// Hasher state for [`FastHash`].
pub(crate) struct FastHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let mut w = [0u8; 8];
        let rem = chunks.remainder();
        for (dst, src) in w.iter_mut().zip(rem) {
            *dst = *src;
        }
        self.add(u64::from_le_bytes(w) ^ ((rem.len() as u64) << 56));
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn finish(&self) -> u64 {
        // Final avalanche so the low bits (used for bucket selection) depend on all input.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h
    }
}

impl FastHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(SEED);
    }
}

impl BuildHasher for FastHash {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(0)
    }
}

/// Map type used for string interning.
pub(crate) type FastMap<K, V> = HashMap<K, V, FastHash>;

/// Hash of an id for [`IdIndex`].
fn id_hash(s: &str) -> u64 {
    let mut h = FastHasher(0);
    h.write(s.as_bytes());
    h.finish()
}

/// Raw id → position in an id list that the caller owns. The strings live once, in the list;
/// the table holds each id's position and, for ids of up to [`INLINE`] bytes (numeric ids,
/// short codes), the id itself, so a lookup touches one cache line of the table instead of
/// chasing the list and the string's heap block — at 10^7 ids the lookup is memory-bound, and
/// this makes parsing about twice as fast.
#[derive(Clone, Default)]
pub(crate) struct IdIndex(hashbrown::HashTable<Slot>);

const INLINE: usize = 11;

#[derive(Clone, Copy)]
pub(crate) struct Slot {
    key: u32,
    /// Length of the id when it is inline (<= INLINE), else `u8::MAX`.
    len: u8,
    bytes: [u8; INLINE],
}

impl Slot {
    fn new(key: u32, raw: &str) -> Slot {
        let mut bytes = [0u8; INLINE];
        match bytes.get_mut(..raw.len()) {
            Some(dst) if raw.len() <= INLINE => {
                dst.copy_from_slice(raw.as_bytes());
                Slot { key, len: raw.len() as u8, bytes }
            }
            _ => Slot { key, len: u8::MAX, bytes },
        }
    }

    fn is(&self, ids: &[String], raw: &str) -> bool {
        if self.len == u8::MAX {
            raw.len() > INLINE && ids.get(self.key as usize).is_some_and(|s| s == raw)
        } else {
            self.bytes.get(..self.len as usize) == Some(raw.as_bytes())
        }
    }
}

impl std::fmt::Debug for IdIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdIndex({} ids)", self.0.len())
    }
}

impl IdIndex {
    pub(crate) fn get(&self, ids: &[String], raw: &str) -> Option<u32> {
        self.0.find(id_hash(raw), |s| s.is(ids, raw)).map(|s| s.key)
    }

    /// Position of `raw`, appending it to `ids` when new; `Err` when `ids` is full.
    pub(crate) fn get_or_push(&mut self, ids: &mut Vec<String>, raw: &str) -> std::result::Result<u32, ()> {
        let h = id_hash(raw);
        if let Some(s) = self.0.find(h, |s| s.is(ids, raw)) {
            return Ok(s.key);
        }
        let k = u32::try_from(ids.len()).map_err(|_| ())?;
        ids.push(raw.to_owned());
        self.0.insert_unique(h, Slot::new(k, raw), |s| ids.get(s.key as usize).map_or(0, |s| id_hash(s)));
        Ok(k)
    }
}

/// Assigns dense `u32` keys to raw ids in first-seen order, which is what makes
/// `Dataset::user_ids[key]` the inverse mapping.
#[derive(Default)]
pub(crate) struct Interner {
    index: IdIndex,
    pub(crate) ids: Vec<String>,
    what: &'static str,
}

impl Interner {
    pub(crate) fn new(what: &'static str) -> Self {
        Interner { index: IdIndex::default(), ids: Vec::new(), what }
    }

    /// Key of `raw`, creating one if unseen. Only a new id allocates.
    pub(crate) fn intern(&mut self, raw: &str) -> Result<u32> {
        self.index.get_or_push(&mut self.ids, raw).map_err(|()| DataError::TooLarge { what: self.what })
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_skip_empty_and_strip_cr() {
        let v: Vec<_> = Lines::new(b"a\r\n\r\nb\n\nc").collect();
        assert_eq!(v, vec![(1, &b"a"[..]), (3, &b"b"[..]), (5, &b"c"[..])]);
    }

    #[test]
    fn line_reader_matches_lines_across_chunk_edges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        // Lines straddle the 1 MiB read size, one is longer than it, CRLF and blanks mixed in.
        let mut text = Vec::new();
        for i in 0..40_000 {
            text.extend_from_slice(format!("row{i},{}\r\n", "x".repeat(i % 53)).as_bytes());
            if i % 997 == 0 {
                text.extend_from_slice(b"\n\r\n");
            }
        }
        text.extend_from_slice(&vec![b'y'; 3 << 20]);
        text.extend_from_slice(b"\nlast");
        std::fs::write(&path, &text).unwrap();
        let expected: Vec<(usize, Vec<u8>)> = Lines::new(&text).map(|(n, l)| (n, l.to_vec())).collect();
        let mut r = LineReader::open(&path).unwrap();
        let mut got = Vec::new();
        while let Some((n, l)) = r.next_line().unwrap() {
            got.push((n, l.to_vec()));
        }
        assert_eq!(got.len(), expected.len());
        assert!(got == expected);
        assert_eq!(r.consumed(), text.len() as u64);
    }

    #[test]
    fn id_index_finds_short_and_long_ids() {
        let mut ids = Vec::new();
        let mut ix = IdIndex::default();
        let raws: Vec<String> =
            (0..5000).map(|i| if i % 3 == 0 { format!("a-long-identifier-{i}") } else { format!("{i}") }).collect();
        for (k, r) in raws.iter().enumerate() {
            assert_eq!(ix.get_or_push(&mut ids, r), Ok(k as u32));
        }
        for (k, r) in raws.iter().enumerate() {
            assert_eq!(ix.get_or_push(&mut ids, r), Ok(k as u32));
            assert_eq!(ix.get(&ids, r), Some(k as u32));
        }
        assert_eq!(ids.len(), 5000);
        assert_eq!(ix.get(&ids, ""), None);
        assert_eq!(ix.get(&ids, "12345678901"), None);
        assert_eq!(ix.get(&ids, "a-long-identifier-1"), None);
    }

    #[test]
    fn split_exact_counts_fields() {
        let r: std::result::Result<[&[u8]; 3], usize> = split_exact(b"1::2::3", b"::");
        assert_eq!(r.unwrap(), [&b"1"[..], b"2", b"3"]);
        assert_eq!(split_exact::<3>(b"1::2", b"::").unwrap_err(), 2);
        assert_eq!(split_exact::<3>(b"1::2::3::4::5", b"::").unwrap_err(), 5);
        let mut out = Vec::new();
        split_fields(b"a,,b,", b",", &mut out);
        assert_eq!(out, vec![&b"a"[..], b"", b"b", b""]);
    }

    #[test]
    fn int_parsing_checks_overflow_and_garbage() {
        assert_eq!(parse_i64(b" -12 "), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        assert_eq!(parse_i64(b"1x"), None);
        assert_eq!(parse_i64(b"-"), None);
        assert_eq!(parse_f32(b"NaN"), None);
        assert_eq!(parse_f32(b"3.5"), Some(3.5));
        assert_eq!(numeric_id(b"12a"), None);
    }
}
