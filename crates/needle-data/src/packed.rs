//! The binary dataset: a log ingested once into a compact, checksummed file that every later
//! command maps instead of parsing text again.
//!
//! ```text
//! DIR/dataset.ndb
//!   header   64 bytes: magic "NEEDLEDS", format version, meta offset/length/checksum, file length
//!   sections 64-byte aligned, each with its own checksum in the meta:
//!            user ids, item ids, item titles (varint lengths + UTF-8 bytes); per-user event runs
//!            in time order (varint counts, item keys in the fewest whole bytes the catalogue
//!            needs, timestamps as varint deltas: the first above the dataset's earliest, the
//!            rest above the user's previous event); feature tables (value strings, varint value
//!            counts per entity and varint value keys)
//!   meta     TOML: counts, names, source fingerprint and identity, section table
//! ```
//!
//! Events are stored per user, already in the order splits cut (timestamp, ties in source
//! order): with 10^7 items an event takes 3 bytes of item key and typically 2–3 of time.
//! Ratings are not kept: retrieval training does not read them. The file is written to a temporary name and renamed,
//! so a reader sees the old dataset, the new one, or none — never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Event, Feature, LoadReport};
use crate::error::{DataError, Result};
use crate::split::Sequences;

/// File name of the dataset inside its folder.
pub const DATASET_FILE: &str = "dataset.ndb";
/// Bumped whenever the layout changes; older files are rebuilt, not misread.
pub const FORMAT_VERSION: u32 = 2;

const MAGIC: &[u8; 8] = b"NEEDLEDS";
const HEADER_LEN: usize = 64;
const ALIGN: u64 = 64;

/// What the meta section records, readable without decoding the arrays (`needle data info`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PackedInfo {
    pub name: String,
    pub users: u64,
    pub items: u64,
    pub events: u64,
    /// The source's event fingerprint ([`Dataset::fingerprint`] of the text load), which runs
    /// are checked against.
    pub fingerprint: String,
    /// What the dataset was built from (schema text, file sizes and modification times); a
    /// different value means the source changed and the dataset is stale.
    pub source_id: String,
    /// Earliest timestamp; each user's first timestamp is stored above it.
    pub ts_base: i64,
    /// Bytes per item key in `runs.items` (1–4).
    pub item_bytes: u32,
    pub rows: u64,
    /// `(file, skipped rows)` of the ingest.
    pub skipped: Vec<(PathBuf, u64)>,
    pub user_features: Vec<FeatureInfo>,
    pub item_features: Vec<FeatureInfo>,
    pub sections: Vec<Section>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FeatureInfo {
    pub name: String,
    pub multi: bool,
    pub values: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Section {
    pub name: String,
    pub offset: u64,
    pub len: u64,
    /// [`checksum`] of the section's bytes, as 16 hex digits.
    pub checksum: String,
}

pub use needle_core::hash::{checksum, Checksum};

/// Appends `v` as LEB128: 7 bits a byte, low first.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads LEB128 values from a section; running off the end or over 64 bits is an error.
struct Varints<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Varints<'_> {
    fn next(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.bytes.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn done(&self) -> bool {
        self.pos == self.bytes.len()
    }
}

fn hex(h: u64) -> String {
    format!("{h:016x}")
}

/// Writes sections one after another, 64-byte aligned, remembering where each went. A section
/// is streamed through a small buffer, so no section is ever whole in memory.
struct SectionWriter<W: Write> {
    out: W,
    pos: u64,
    sections: Vec<Section>,
    path: PathBuf,
    /// The open section: name, start, running checksum, and bytes not yet written.
    open: Option<(String, u64, Checksum)>,
    buf: Vec<u8>,
}

const FLUSH_AT: usize = 1 << 20;

impl<W: Write> SectionWriter<W> {
    fn raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| DataError::io(&self.path, e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let pad = (ALIGN - self.pos % ALIGN) % ALIGN;
        self.raw(&vec![0u8; pad as usize])
    }

    fn begin(&mut self, name: &str) -> Result<()> {
        self.pad()?;
        self.open = Some((name.to_owned(), self.pos, Checksum::new()));
        Ok(())
    }

    /// The buffer the open section's bytes go into; call [`Self::spill`] after filling it.
    fn spill(&mut self) -> Result<()> {
        if self.buf.len() >= FLUSH_AT {
            self.flush_buf()?;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> Result<()> {
        let buf = std::mem::take(&mut self.buf);
        if let Some((_, _, sum)) = &mut self.open {
            sum.update(&buf);
        }
        self.raw(&buf)?;
        self.buf = buf;
        self.buf.clear();
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        self.flush_buf()?;
        if let Some((name, offset, sum)) = self.open.take() {
            self.sections.push(Section { name, offset, len: self.pos - offset, checksum: hex(sum.finish()) });
        }
        Ok(())
    }

    /// Values as a varint section.
    fn varints(&mut self, name: &str, values: impl Iterator<Item = u64>) -> Result<()> {
        self.begin(name)?;
        for v in values {
            put_varint(&mut self.buf, v);
            self.spill()?;
        }
        self.end()
    }

    /// Strings as varint lengths and their concatenated bytes.
    fn strings<'a>(&mut self, name: &str, items: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
        self.varints(&format!("{name}.lens"), items.clone().map(|s| s.len() as u64))?;
        self.begin(&format!("{name}.bytes"))?;
        for s in items {
            self.buf.extend_from_slice(s.as_bytes());
            self.spill()?;
        }
        self.end()
    }
}

/// Writes `ds` as `dir/dataset.ndb`, stamped with `source_id`; `seqs` are its events in
/// [`crate::split::time_ordered`] form (`ds.events` itself is not read, so a caller short of memory may
/// empty it first). The folder is created if needed; the file appears only once complete and
/// synced.
pub fn write(ds: &Dataset, seqs: &Sequences, source_id: &str, dir: &Path) -> Result<PackedInfo> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let path = dir.join(DATASET_FILE);
    let tmp = needle_core::file::tmp_path(&path);
    let out = needle_core::file::AtomicFile::create(&path).map_err(|e| DataError::io(&tmp, e))?;
    let mut w = SectionWriter {
        out,
        pos: 0,
        sections: Vec::new(),
        path: tmp.clone(),
        open: None,
        buf: Vec::with_capacity(FLUSH_AT + 64),
    };
    w.raw(&[0u8; HEADER_LEN])?;

    let ts_base = seqs.ts.iter().copied().min().unwrap_or(0);
    let n_items = ds.item_ids.len() as u64;
    let item_bytes: u32 = match n_items {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xff_ffff => 3,
        _ => 4,
    };

    w.strings("user_ids", ds.user_ids.iter().map(String::as_str))?;
    w.strings("item_ids", ds.item_ids.iter().map(String::as_str))?;
    let n_users = seqs.num_users();
    w.varints("runs.counts", (0..n_users).map(|u| seqs.len_of(u) as u64))?;
    w.begin("runs.items")?;
    for &item in &seqs.items {
        w.buf.extend_from_slice(&item.to_le_bytes()[..item_bytes as usize]);
        w.spill()?;
    }
    w.end()?;
    w.begin("runs.ts")?;
    for u in 0..n_users {
        let mut prev = ts_base;
        for &t in seqs.ts_of(u) {
            // Runs are ascending, so every delta is >= 0; the wrapping difference is exact.
            put_varint(&mut w.buf, t.wrapping_sub(prev) as u64);
            prev = t;
        }
        w.spill()?;
    }
    w.end()?;
    for (side, feats) in [("user", &ds.user_features), ("item", &ds.item_features)] {
        for f in feats {
            let base = format!("{side}_feat.{}", f.name);
            w.strings(&format!("{base}.values"), f.values.iter().map(String::as_str))?;
            w.varints(&format!("{base}.counts"), f.offsets.windows(2).map(|o| u64::from(o[1].saturating_sub(o[0]))))?;
            w.varints(&format!("{base}.keys"), f.keys.iter().map(|&k| u64::from(k)))?;
        }
    }
    w.strings("item_titles", ds.item_titles.iter().map(|t| t.as_deref().unwrap_or("")))?;

    let info = PackedInfo {
        name: ds.name.clone(),
        users: ds.user_ids.len() as u64,
        items: n_items,
        events: seqs.items.len() as u64,
        fingerprint: ds.fingerprint(),
        source_id: source_id.to_owned(),
        ts_base,
        item_bytes,
        rows: ds.report.rows as u64,
        skipped: ds.report.skipped.iter().map(|(p, n)| (p.clone(), *n as u64)).collect(),
        user_features: feature_infos(&ds.user_features),
        item_features: feature_infos(&ds.item_features),
        sections: std::mem::take(&mut w.sections),
    };
    let meta = toml::to_string(&info).map_err(|e| DataError::packed(&path, e.to_string()))?;
    w.pad()?;
    let meta_offset = w.pos;
    w.raw(meta.as_bytes())?;
    let file_len = w.pos;

    let mut out = w.out;
    let file = out.file_mut().map_err(|e| DataError::io(&tmp, e))?;
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&meta_offset.to_le_bytes());
    header[24..32].copy_from_slice(&(meta.len() as u64).to_le_bytes());
    header[32..40].copy_from_slice(&checksum(meta.as_bytes()).to_le_bytes());
    header[40..48].copy_from_slice(&file_len.to_le_bytes());
    let head_sum = checksum(&header[..48]);
    header[48..56].copy_from_slice(&head_sum.to_le_bytes());
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(0)).and_then(|_| file.write_all(&header)).map_err(|e| DataError::io(&tmp, e))?;
    out.commit().map_err(|e| DataError::io(&path, e))?;
    Ok(info)
}

fn feature_infos(feats: &[Feature]) -> Vec<FeatureInfo> {
    feats.iter().map(|f| FeatureInfo { name: f.name.clone(), multi: f.multi, values: f.values.len() as u64 }).collect()
}

/// An opened dataset file: the mapping and its checked meta.
pub struct Packed {
    path: PathBuf,
    map: memmap2::Mmap,
    pub info: PackedInfo,
}

impl Packed {
    /// Maps `dir/dataset.ndb` and checks the header and meta (cheap: no array is read). A
    /// missing, truncated or foreign file, or another format version, is an error that says so.
    pub fn open(dir: &Path) -> Result<Packed> {
        let path = dir.join(DATASET_FILE);
        let file = std::fs::File::open(&path).map_err(|e| DataError::io(&path, e))?;
        // SAFETY: the file is only read; needle never writes a dataset in place (new ones are
        // renamed over it, which leaves this mapping on the old inode).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::io(&path, e))?;
        let bad = |r: String| DataError::packed(&path, r);
        let head =
            map.get(..HEADER_LEN).ok_or_else(|| bad(format!("{} bytes: too short to be a dataset", map.len())))?;
        if head.get(..8) != Some(&MAGIC[..]) {
            return Err(bad("not a needle dataset (bad magic)".into()));
        }
        let word = |a: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(head.get(a..a + 8).unwrap_or(&[0; 8]));
            u64::from_le_bytes(b)
        };
        if word(48) != checksum(head.get(..48).unwrap_or(&[])) {
            return Err(bad("header checksum mismatch: the file is corrupted; ingest it again".into()));
        }
        let version = u32::try_from(word(8) & 0xffff_ffff).unwrap_or(0);
        if version != FORMAT_VERSION {
            return Err(bad(format!("format version {version}, this build reads {FORMAT_VERSION}; ingest it again")));
        }
        let (meta_off, meta_len, meta_sum, file_len) = (word(16), word(24), word(32), word(40));
        if file_len != map.len() as u64 {
            return Err(bad(format!(
                "{} bytes but the header says {file_len}: the file is truncated or was appended to; ingest it again",
                map.len()
            )));
        }
        let meta = usize::try_from(meta_off)
            .ok()
            .zip(usize::try_from(meta_len).ok())
            .and_then(|(a, n)| map.get(a..a.checked_add(n)?))
            .ok_or_else(|| bad("meta section out of bounds".into()))?;
        if checksum(meta) != meta_sum {
            return Err(bad("meta checksum mismatch: the file is corrupted; ingest it again".into()));
        }
        let text = std::str::from_utf8(meta).map_err(|_| bad("meta is not UTF-8".into()))?;
        let info: PackedInfo = toml::from_str(text).map_err(|e| bad(format!("meta: {e}")))?;
        for s in &info.sections {
            let end = s.offset.checked_add(s.len).filter(|&e| e <= meta_off);
            if end.is_none() {
                return Err(bad(format!("section {} out of bounds", s.name)));
            }
        }
        Ok(Packed { path, map, info })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The bytes of a section, checked against its checksum.
    fn section(&self, name: &str) -> Result<&[u8]> {
        let s = self
            .info
            .sections
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| DataError::packed(&self.path, format!("section {name} is missing")))?;
        let bytes = usize::try_from(s.offset)
            .ok()
            .zip(usize::try_from(s.len).ok())
            .and_then(|(a, n)| self.map.get(a..a.checked_add(n)?))
            .ok_or_else(|| DataError::packed(&self.path, format!("section {name} out of bounds")))?;
        if hex(checksum(bytes)) != s.checksum {
            return Err(DataError::packed(
                &self.path,
                format!("section {name} checksum mismatch: the file is corrupted; ingest it again"),
            ));
        }
        Ok(bytes)
    }

    fn varints(&self, name: &str) -> Result<Varints<'_>> {
        Ok(Varints { bytes: self.section(name)?, pos: 0 })
    }

    /// Exactly `n` varints of a section, each at most `max`; anything else is corruption.
    fn varint_vec(&self, name: &str, n: u64, max: u64) -> Result<Vec<u64>> {
        let mut it = self.varints(name)?;
        // Every value takes at least one byte: a count beyond the section's length is corruption,
        // and must not size an allocation first.
        if n > it.bytes.len() as u64 {
            return Err(DataError::packed(&self.path, format!("section {name} is inconsistent")));
        }
        let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        for _ in 0..n {
            match it.next() {
                Some(v) if v <= max => out.push(v),
                _ => return Err(DataError::packed(&self.path, format!("section {name} is inconsistent"))),
            }
        }
        if !it.done() {
            return Err(DataError::packed(&self.path, format!("section {name} has trailing bytes")));
        }
        Ok(out)
    }

    fn strings(&self, name: &str, n: u64) -> Result<Vec<String>> {
        let bytes = self.section(&format!("{name}.bytes"))?;
        let lens = self.varint_vec(&format!("{name}.lens"), n, bytes.len() as u64)?;
        let bad = |r: &str| DataError::packed(&self.path, format!("{name}: {r}"));
        let mut out = Vec::with_capacity(lens.len());
        let mut at = 0usize;
        for len in lens {
            let s = at
                .checked_add(len as usize)
                .and_then(|end| bytes.get(at..end))
                .ok_or_else(|| bad("lengths out of bounds"))?;
            at += s.len();
            out.push(std::str::from_utf8(s).map_err(|_| bad("not UTF-8"))?.to_owned());
        }
        if at != bytes.len() {
            return Err(bad("lengths do not cover the bytes"));
        }
        Ok(out)
    }

    fn feature(&self, side: &str, f: &FeatureInfo, n_entities: u64) -> Result<Feature> {
        let base = format!("{side}_feat.{}", f.name);
        let values = self.strings(&format!("{base}.values"), f.values)?;
        let counts = self.varint_vec(&format!("{base}.counts"), n_entities, u64::from(u32::MAX))?;
        let mut offsets = Vec::with_capacity(counts.len() + 1);
        let mut total = 0u64;
        offsets.push(0u32);
        for c in counts {
            total += c;
            offsets.push(u32::try_from(total).map_err(|_| DataError::packed(&self.path, format!("{base} too large")))?);
        }
        let keys = self.varint_vec(&format!("{base}.keys"), total, values.len().saturating_sub(1) as u64)?;
        let keys = keys.into_iter().map(|k| k as u32).collect();
        Ok(Feature { name: f.name.clone(), multi: f.multi, values, offsets, keys })
    }

    /// Decodes the whole dataset, checking every section's checksum and every key's range.
    /// Events come back per user in time order; the fingerprint is the source's.
    pub fn dataset(&self) -> Result<Dataset> {
        let i = &self.info;
        let bad = |r: &str| DataError::packed(&self.path, r.to_owned());
        let user_ids = self.strings("user_ids", i.users)?;
        let item_ids = self.strings("item_ids", i.items)?;
        let counts = self.varint_vec("runs.counts", i.users, i.events)?;
        let items = self.section("runs.items")?;
        let width = i.item_bytes as usize;
        if !(1..=4).contains(&width) || Some(items.len() as u64) != i.events.checked_mul(width as u64) {
            return Err(bad("event runs are inconsistent with the meta"));
        }
        if counts.iter().sum::<u64>() != i.events {
            return Err(bad("event counts do not add up to the events"));
        }
        let mut ts = self.varints("runs.ts")?;
        let mut events = Vec::with_capacity(usize::try_from(i.events).unwrap_or(0));
        let mut keys = items.chunks_exact(width);
        for (u, &n) in counts.iter().enumerate() {
            let u = u32::try_from(u).map_err(|_| DataError::TooLarge { what: "users" })?;
            let mut prev = i.ts_base;
            for _ in 0..n {
                let (Some(k), Some(d)) = (keys.next(), ts.next()) else {
                    return Err(bad("event runs are truncated"));
                };
                let mut a = [0u8; 4];
                a[..width].copy_from_slice(k);
                let item = u32::from_le_bytes(a);
                if u64::from(item) >= i.items {
                    return Err(bad("an item key is out of range"));
                }
                prev = prev.wrapping_add(d as i64);
                events.push(Event { user: u, item, ts: prev });
            }
        }
        if !ts.done() {
            return Err(bad("runs.ts has trailing bytes"));
        }
        let user_features =
            i.user_features.iter().map(|f| self.feature("user", f, i.users)).collect::<Result<Vec<_>>>()?;
        let item_features =
            i.item_features.iter().map(|f| self.feature("item", f, i.items)).collect::<Result<Vec<_>>>()?;
        let item_titles =
            self.strings("item_titles", i.items)?.into_iter().map(|t| (!t.is_empty()).then_some(t)).collect();
        Ok(Dataset {
            name: i.name.clone(),
            user_ids,
            item_ids,
            events,
            ratings: Vec::new(),
            user_features,
            item_features,
            item_titles,
            report: LoadReport {
                rows: usize::try_from(i.rows).unwrap_or(usize::MAX),
                skipped: i.skipped.iter().map(|(p, n)| (p.clone(), *n as usize)).collect(),
            },
            source_fingerprint: Some(i.fingerprint.clone()),
        })
    }
}
