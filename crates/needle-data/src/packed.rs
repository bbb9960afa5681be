//! The binary dataset: a log ingested once into a compact, checksummed file that every later
//! command maps instead of parsing text again.
//!
//! ```text
//! DIR/dataset.ndb
//!   header   64 bytes: magic "NEEDLEDS", format version, meta offset/length/checksum, file length
//!   sections 64-byte aligned little-endian arrays, each with its own checksum in the meta:
//!            user ids, item ids (u64 offsets + UTF-8 bytes), per-user event runs in time order
//!            (u64 offsets, u32 item keys, timestamps as u32 above a base or as i64), feature
//!            tables (value strings, u32 CSR offsets and value keys), item titles
//!   meta     TOML: counts, names, source fingerprint and identity, section table
//! ```
//!
//! Events are stored per user, already in the order splits cut (timestamp, ties in source
//! order), at 8 bytes each when the timestamps span less than 2^32. Ratings are not kept:
//! retrieval training does not read them. The file is written to a temporary name and renamed,
//! so a reader sees the old dataset, the new one, or none — never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Event, Feature, LoadReport};
use crate::error::{DataError, Result};
use crate::split::time_ordered;

/// File name of the dataset inside its folder.
pub const DATASET_FILE: &str = "dataset.ndb";
/// Bumped whenever the layout changes; older files are rebuilt, not misread.
pub const FORMAT_VERSION: u32 = 1;

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
    /// Earliest timestamp; with `ts_bits = 32` timestamps are stored as `u32` above it.
    pub ts_base: i64,
    pub ts_bits: u32,
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

/// A fast 64-bit checksum over 8-byte words (four independent lanes, so it runs at memory
/// speed); detects torn writes and flipped bytes, not an adversary.
pub fn checksum(bytes: &[u8]) -> u64 {
    const P: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lanes = [0x243f_6a88_85a3_08d3u64, 0x1319_8a2e_0370_7344, 0xa409_3822_299f_31d0, 0x082e_fa98_ec4e_6c89];
    let mut blocks = bytes.chunks_exact(32);
    for b in &mut blocks {
        for (lane, w) in lanes.iter_mut().zip(b.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            *lane = (*lane ^ u64::from_le_bytes(a)).wrapping_mul(P).rotate_left(29);
        }
    }
    let mut h = (bytes.len() as u64).wrapping_mul(P);
    for lane in lanes {
        h = (h ^ lane).wrapping_mul(P).rotate_left(31);
    }
    for &byte in blocks.remainder() {
        h = (h ^ u64::from(byte)).wrapping_mul(P);
    }
    h ^ (h >> 29)
}

fn hex(h: u64) -> String {
    format!("{h:016x}")
}

/// Writes sections one after another, 64-byte aligned, remembering where each went.
struct SectionWriter<W: Write> {
    out: W,
    pos: u64,
    sections: Vec<Section>,
    path: PathBuf,
}

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

    fn section(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.pad()?;
        self.sections.push(Section {
            name: name.to_owned(),
            offset: self.pos,
            len: bytes.len() as u64,
            checksum: hex(checksum(bytes)),
        });
        self.raw(bytes)
    }

    /// Strings as `u64` offsets (n + 1) and their concatenated bytes.
    fn strings<'a>(&mut self, name: &str, items: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
        let mut offsets = Vec::new();
        let mut bytes = Vec::new();
        offsets.extend_from_slice(&0u64.to_le_bytes());
        for s in items {
            bytes.extend_from_slice(s.as_bytes());
            offsets.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        }
        self.section(&format!("{name}.offsets"), &offsets)?;
        self.section(&format!("{name}.bytes"), &bytes)
    }
}

fn le_u32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn le_u64(v: impl Iterator<Item = u64>) -> Vec<u8> {
    v.flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `ds` as `dir/dataset.ndb`, stamped with `source_id`. The folder is created if needed;
/// the file appears only once complete and synced.
pub fn write(ds: &Dataset, source_id: &str, dir: &Path) -> Result<PackedInfo> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let path = dir.join(DATASET_FILE);
    let tmp = dir.join(format!("{DATASET_FILE}.tmp"));
    let file = std::fs::File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    let mut w = SectionWriter {
        out: std::io::BufWriter::with_capacity(1 << 20, file),
        pos: 0,
        sections: Vec::new(),
        path: tmp.clone(),
    };
    w.raw(&[0u8; HEADER_LEN])?;

    let seqs = time_ordered(ds)?;
    let (lo, hi) = seqs.ts.iter().fold((i64::MAX, i64::MIN), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    let ts_base = if seqs.ts.is_empty() { 0 } else { lo };
    let ts_bits =
        if seqs.ts.is_empty() || hi.checked_sub(lo).is_some_and(|r| r <= i64::from(u32::MAX)) { 32 } else { 64 };

    w.strings("user_ids", ds.user_ids.iter().map(String::as_str))?;
    w.strings("item_ids", ds.item_ids.iter().map(String::as_str))?;
    w.section("runs.offsets", &le_u64(seqs.offsets.iter().map(|&o| u64::from(o))))?;
    w.section("runs.items", &le_u32(&seqs.items))?;
    let ts: Vec<u8> = if ts_bits == 32 {
        seqs.ts.iter().flat_map(|&t| (u32::try_from(t - ts_base).unwrap_or(u32::MAX)).to_le_bytes()).collect()
    } else {
        seqs.ts.iter().flat_map(|t| t.to_le_bytes()).collect()
    };
    w.section("runs.ts", &ts)?;
    drop(ts);
    for (side, feats) in [("user", &ds.user_features), ("item", &ds.item_features)] {
        for f in feats {
            let base = format!("{side}_feat.{}", f.name);
            w.strings(&format!("{base}.values"), f.values.iter().map(String::as_str))?;
            w.section(&format!("{base}.offsets"), &le_u32(&f.offsets))?;
            w.section(&format!("{base}.keys"), &le_u32(&f.keys))?;
        }
    }
    w.strings("item_titles", ds.item_titles.iter().map(|t| t.as_deref().unwrap_or("")))?;

    let info = PackedInfo {
        name: ds.name.clone(),
        users: ds.user_ids.len() as u64,
        items: ds.item_ids.len() as u64,
        events: seqs.items.len() as u64,
        fingerprint: ds.fingerprint(),
        source_id: source_id.to_owned(),
        ts_base,
        ts_bits,
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

    let mut file = w.out.into_inner().map_err(|e| DataError::io(&tmp, e.into_error()))?;
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
    file.sync_all().map_err(|e| DataError::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))?;
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

    fn u32s(&self, name: &str) -> Result<Vec<u32>> {
        let b = self.section(name)?;
        if b.len() % 4 != 0 {
            return Err(DataError::packed(&self.path, format!("section {name} is not a u32 array")));
        }
        Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn u64s(&self, name: &str) -> Result<Vec<u64>> {
        let b = self.section(name)?;
        if b.len() % 8 != 0 {
            return Err(DataError::packed(&self.path, format!("section {name} is not a u64 array")));
        }
        Ok(b.chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect())
    }

    fn strings(&self, name: &str, n: u64) -> Result<Vec<String>> {
        let offsets = self.u64s(&format!("{name}.offsets"))?;
        let bytes = self.section(&format!("{name}.bytes"))?;
        let bad = |r: &str| DataError::packed(&self.path, format!("{name}: {r}"));
        if offsets.len() as u64 != n + 1 {
            return Err(bad("count does not match the meta"));
        }
        let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
        for w in offsets.windows(2) {
            let s = usize::try_from(w[0])
                .ok()
                .zip(usize::try_from(w[1]).ok())
                .and_then(|(a, b)| bytes.get(a..b))
                .ok_or_else(|| bad("offsets out of bounds"))?;
            out.push(std::str::from_utf8(s).map_err(|_| bad("not UTF-8"))?.to_owned());
        }
        Ok(out)
    }

    fn feature(&self, side: &str, f: &FeatureInfo, n_entities: u64) -> Result<Feature> {
        let base = format!("{side}_feat.{}", f.name);
        let values = self.strings(&format!("{base}.values"), f.values)?;
        let offsets = self.u32s(&format!("{base}.offsets"))?;
        let keys = self.u32s(&format!("{base}.keys"))?;
        let ok = offsets.len() as u64 == n_entities + 1
            && offsets.windows(2).all(|w| w[0] <= w[1])
            && offsets.last().map(|&o| o as usize) == Some(keys.len())
            && keys.iter().all(|&k| (k as usize) < values.len());
        if !ok {
            return Err(DataError::packed(&self.path, format!("feature {base} is inconsistent")));
        }
        Ok(Feature { name: f.name.clone(), multi: f.multi, values, offsets, keys })
    }

    /// Decodes the whole dataset, checking every section's checksum and every key's range.
    /// Events come back per user in time order; the fingerprint is the source's.
    pub fn dataset(&self) -> Result<Dataset> {
        let i = &self.info;
        let bad = |r: &str| DataError::packed(&self.path, r.to_owned());
        let user_ids = self.strings("user_ids", i.users)?;
        let item_ids = self.strings("item_ids", i.items)?;
        let offsets = self.u64s("runs.offsets")?;
        let items = self.u32s("runs.items")?;
        let ts_bytes = self.section("runs.ts")?;
        let width = (i.ts_bits / 8) as usize;
        if offsets.len() as u64 != i.users + 1
            || items.len() as u64 != i.events
            || (width != 4 && width != 8)
            || ts_bytes.len() != items.len() * width
            || offsets.first() != Some(&0)
            || offsets.last() != Some(&i.events)
            || offsets.windows(2).any(|w| w[0] > w[1])
            || items.iter().any(|&k| u64::from(k) >= i.items)
        {
            return Err(bad("event runs are inconsistent with the meta"));
        }
        let mut events = Vec::with_capacity(items.len());
        let ts_at = |e: usize| -> i64 {
            let b = ts_bytes.get(e * width..(e + 1) * width).unwrap_or(&[]);
            let mut a = [0u8; 8];
            a.get_mut(..b.len()).unwrap_or(&mut []).copy_from_slice(b);
            let raw = u64::from_le_bytes(a);
            if width == 4 {
                i.ts_base + raw as i64
            } else {
                raw as i64
            }
        };
        for (u, w) in offsets.windows(2).enumerate() {
            let u = u32::try_from(u).map_err(|_| DataError::TooLarge { what: "users" })?;
            let run = w[0] as usize..w[1] as usize;
            for (e, &item) in run.clone().zip(items.get(run).unwrap_or(&[])) {
                events.push(Event { user: u, item, ts: ts_at(e), rating: None });
            }
        }
        drop(items);
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
