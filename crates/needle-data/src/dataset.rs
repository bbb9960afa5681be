//! The in-memory form every loader produces, independent of the file format it came from,
//! so the model, trainer and evaluator only ever deal with dense `u32` keys.

use std::path::PathBuf;

use crate::text::{FastMap, Interner};

/// One user-item interaction. `user` and `item` are dense keys (indices into
/// [`Dataset::user_ids`] / [`Dataset::item_ids`]) so embedding tables can be indexed directly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Event {
    /// User key.
    pub user: u32,
    /// Item key.
    pub item: u32,
    /// Timestamp (seconds for MovieLens; any monotone integer for CSV logs). Splits order by it.
    pub ts: i64,
}

/// A categorical side feature of users or items, stored in CSR form so multi-valued features
/// (genres) and single-valued ones (gender) share one layout without per-entity allocations.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Feature {
    /// Feature name, e.g. "gender", "age", "occupation", "zip", "genres", "year".
    pub name: String,
    /// True when an entity may have several values (e.g. genres "Action|Comedy").
    pub multi: bool,
    /// Distinct value strings; the index is the value key used in `keys`.
    pub values: Vec<String>,
    /// CSR row pointers over entities: `len = n_entities + 1`.
    pub offsets: Vec<u32>,
    /// Value keys of all entities, concatenated in entity order.
    pub keys: Vec<u32>,
}

impl Feature {
    /// Value keys of `entity`. Empty when the entity has no value or is out of range, so
    /// callers never need to bounds-check entities that appeared only in side tables.
    pub fn of(&self, entity: usize) -> &[u32] {
        let Some(end_idx) = entity.checked_add(1) else {
            return &[];
        };
        match (self.offsets.get(entity), self.offsets.get(end_idx)) {
            (Some(&a), Some(&b)) => self.keys.get(a as usize..b as usize).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// Value string of a key; `None` for an unknown key. Used for printing and debugging.
    pub fn value(&self, key: u32) -> Option<&str> {
        self.values.get(key as usize).map(String::as_str)
    }

    /// Number of entities the feature covers (`offsets.len() - 1`).
    pub fn num_entities(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Value strings of `entity`, a convenience for tests and human-readable output.
    pub fn values_of(&self, entity: usize) -> impl Iterator<Item = &str> + '_ {
        self.of(entity).iter().filter_map(|&k| self.value(k))
    }
}

/// What a load did besides producing data: how many rows were used and which files had
/// bad rows skipped, so a lenient load is never silently lossy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Interaction rows accepted (equals `Dataset::events.len()`).
    pub rows: usize,
    /// `(file, skipped row count)` for each file where rows were skipped; files with no
    /// skipped rows are not listed.
    pub skipped: Vec<(PathBuf, usize)>,
}

impl LoadReport {
    /// Total skipped rows over all files, for a one-line summary.
    pub fn skipped_total(&self) -> usize {
        self.skipped.iter().map(|(_, n)| n).sum()
    }
}

/// Knobs shared by all loaders.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Skip malformed rows (counting them in [`LoadReport`]) instead of failing on the first
    /// one. Off by default: silently dropping data should be a conscious choice.
    pub skip_bad_rows: bool,
}

/// An interaction log plus optional side information, with raw ids interned to dense keys.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// "ml-1m", "ml-100k", or the CSV schema's name.
    pub name: String,
    /// Raw user ids; index = user key. First-seen order: interactions file first, then
    /// users that only appear in side tables.
    pub user_ids: Vec<String>,
    /// Raw item ids; index = item key, same ordering rule as users.
    pub item_ids: Vec<String>,
    /// Interactions in file order (splits re-sort per user by time).
    pub events: Vec<Event>,
    /// Explicit ratings parallel to `events` (NaN: none), or empty when the source has no
    /// rating column; kept apart so a log without ratings costs 16 bytes per event, not 24.
    pub ratings: Vec<f32>,
    /// User side features; each covers `user_ids.len()` entities.
    pub user_features: Vec<Feature>,
    /// Item side features; each covers `item_ids.len()` entities.
    pub item_features: Vec<Feature>,
    /// Item titles where known, parallel to `item_ids` (for showing recommendations).
    pub item_titles: Vec<Option<String>>,
    /// Row counts and skipped rows of the load.
    pub report: LoadReport,
    /// The fingerprint of the source the events came from, when they were not loaded in source
    /// order (a binary dataset stores them per user); `None` computes it from `events`.
    pub source_fingerprint: Option<String>,
}

pub use needle_core::hash::{fnv1a64, FNV1A64_OFFSET};

/// Folds one event into a [`Dataset::fingerprint`] hash; loaders that stream call it per
/// accepted row, while the raw ids are at hand, instead of chasing them afterwards.
pub(crate) fn fingerprint_event(mut h: u64, user: &str, item: &str, ts: i64) -> u64 {
    h = fnv1a64(h, user.as_bytes());
    h = fnv1a64(h, &[0x1f]);
    h = fnv1a64(h, item.as_bytes());
    h = fnv1a64(h, &[0x1f]);
    h = fnv1a64(h, &ts.to_le_bytes());
    fnv1a64(h, &[0x1e])
}

impl Dataset {
    /// Stable 16-hex-digit identity of the interaction log, stored with trained models so
    /// evaluation can refuse to run on different data than training used.
    ///
    /// FNV-1a 64 over, for every event in order: raw user id bytes, 0x1F, raw item id bytes,
    /// 0x1F, timestamp as 8 little-endian bytes, 0x1E. Raw ids (not keys) are hashed so the
    /// value does not depend on interning details. Ratings and side tables are not included.
    pub fn fingerprint(&self) -> String {
        if let Some(fp) = &self.source_fingerprint {
            return fp.clone();
        }
        let mut h = FNV1A64_OFFSET;
        for e in &self.events {
            let u = self.user_ids.get(e.user as usize).map_or("", String::as_str);
            let i = self.item_ids.get(e.item as usize).map_or("", String::as_str);
            h = fingerprint_event(h, u, i, e.ts);
        }
        format!("{h:016x}")
    }

    /// User feature by name, so callers do not depend on feature order.
    pub fn user_feature(&self, name: &str) -> Option<&Feature> {
        self.user_features.iter().find(|f| f.name == name)
    }

    /// Rating of event `i`, when the source has one.
    pub fn rating(&self, i: usize) -> Option<f32> {
        self.ratings.get(i).copied().filter(|r| !r.is_nan())
    }

    /// Item feature by name.
    pub fn item_feature(&self, name: &str) -> Option<&Feature> {
        self.item_features.iter().find(|f| f.name == name)
    }

    /// Number of users (including users without events).
    pub fn num_users(&self) -> usize {
        self.user_ids.len()
    }

    /// Number of items (including items without events).
    pub fn num_items(&self) -> usize {
        self.item_ids.len()
    }

    /// Title of an item key, if known.
    pub fn item_title(&self, item: u32) -> Option<&str> {
        self.item_titles.get(item as usize)?.as_deref()
    }
}

/// Accumulates one feature while rows arrive in arbitrary entity order, then packs it into
/// CSR. The first assignment of an entity wins, which gives "value of the first row" for
/// logs and "first line wins" for side tables with duplicate ids.
pub(crate) struct FeatureBuilder {
    pub(crate) name: String,
    multi: bool,
    values: Vec<String>,
    index: FastMap<Box<str>, u32>,
    /// Per entity: (start, len) into `pool`, or `None` when not yet assigned.
    spans: Vec<Option<(u32, u32)>>,
    pool: Vec<u32>,
}

impl FeatureBuilder {
    pub(crate) fn new(name: impl Into<String>, multi: bool) -> Self {
        FeatureBuilder {
            name: name.into(),
            multi,
            values: Vec::new(),
            index: FastMap::default(),
            spans: Vec::new(),
            pool: Vec::new(),
        }
    }

    /// Pre-registers value strings so their keys follow a canonical order (e.g. u.genre).
    pub(crate) fn with_values<'a>(mut self, values: impl IntoIterator<Item = &'a str>) -> Self {
        for v in values {
            self.value_key(v);
        }
        self
    }

    pub(crate) fn is_set(&self, entity: usize) -> bool {
        matches!(self.spans.get(entity), Some(Some(_)))
    }

    fn value_key(&mut self, v: &str) -> u32 {
        if let Some(&k) = self.index.get(v) {
            return k;
        }
        // Value vocabularies are tiny compared with u32; saturating keeps this panic-free.
        let k = u32::try_from(self.values.len()).unwrap_or(u32::MAX);
        self.values.push(v.to_owned());
        self.index.insert(v.into(), k);
        k
    }

    /// Assigns values to `entity` unless it already has an assignment. Values are trimmed,
    /// empty ones dropped (an empty field means "no value"), duplicates collapsed.
    pub(crate) fn set<'a>(&mut self, entity: usize, values: impl IntoIterator<Item = &'a str>) {
        if self.is_set(entity) {
            return;
        }
        let start = self.pool.len();
        for v in values {
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            let k = self.value_key(v);
            let mine = self.pool.get(start..).unwrap_or(&[]);
            if !mine.contains(&k) {
                self.pool.push(k);
            }
            if !self.multi {
                break;
            }
        }
        if self.spans.len() <= entity {
            self.spans.resize(entity + 1, None);
        }
        let len = self.pool.len() - start;
        if let Some(slot) = self.spans.get_mut(entity) {
            *slot = Some((u32::try_from(start).unwrap_or(u32::MAX), u32::try_from(len).unwrap_or(0)));
        }
    }

    /// Packs into CSR over exactly `n_entities` entities (entities never assigned get none).
    pub(crate) fn finish(self, n_entities: usize) -> Feature {
        let mut offsets = Vec::with_capacity(n_entities + 1);
        let mut keys = Vec::with_capacity(self.pool.len());
        offsets.push(0u32);
        for e in 0..n_entities {
            if let Some(Some((s, l))) = self.spans.get(e) {
                let (s, l) = (*s as usize, *l as usize);
                if let Some(vals) = self.pool.get(s..s.saturating_add(l)) {
                    keys.extend_from_slice(vals);
                }
            }
            offsets.push(u32::try_from(keys.len()).unwrap_or(u32::MAX));
        }
        Feature { name: self.name, multi: self.multi, values: self.values, offsets, keys }
    }
}

/// Sets a title for `item` unless one is already set (first line wins), growing the vector.
pub(crate) fn set_title(titles: &mut Vec<Option<String>>, item: u32, title: String) {
    let i = item as usize;
    if titles.len() <= i {
        titles.resize(i + 1, None);
    }
    if let Some(slot) = titles.get_mut(i) {
        if slot.is_none() {
            *slot = Some(title);
        }
    }
}

/// Loader state shared by all formats; `finish` fixes every per-entity vector to the
/// final entity counts, which are only known once all files have been read.
pub(crate) struct Parts {
    pub(crate) users: Interner,
    pub(crate) items: Interner,
    pub(crate) events: Vec<Event>,
    pub(crate) ratings: Vec<f32>,
    pub(crate) user_features: Vec<FeatureBuilder>,
    pub(crate) item_features: Vec<FeatureBuilder>,
    pub(crate) item_titles: Vec<Option<String>>,
    pub(crate) report: LoadReport,
    /// Running fingerprint of the accepted events, for loaders that stream.
    pub(crate) fingerprint: Option<u64>,
}

impl Parts {
    pub(crate) fn new() -> Self {
        Parts {
            users: Interner::new("users"),
            items: Interner::new("items"),
            events: Vec::new(),
            ratings: Vec::new(),
            user_features: Vec::new(),
            item_features: Vec::new(),
            item_titles: Vec::new(),
            report: LoadReport::default(),
            fingerprint: None,
        }
    }

    pub(crate) fn finish(self, name: &str) -> Dataset {
        let (n_users, n_items) = (self.users.len(), self.items.len());
        let mut item_titles = self.item_titles;
        item_titles.resize(n_items, None);
        let mut report = self.report;
        report.rows = self.events.len();
        Dataset {
            name: name.to_owned(),
            user_ids: self.users.ids,
            item_ids: self.items.ids,
            events: self.events,
            ratings: self.ratings,
            user_features: self.user_features.into_iter().map(|f| f.finish(n_users)).collect(),
            item_features: self.item_features.into_iter().map(|f| f.finish(n_items)).collect(),
            item_titles,
            report,
            source_fingerprint: self.fingerprint.map(|h| format!("{h:016x}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_builder_first_wins_and_csr() {
        let mut b = FeatureBuilder::new("g", true);
        b.set(2, "a|b|a".split('|'));
        b.set(0, [""]);
        b.set(2, ["c"]);
        let f = b.finish(4);
        assert_eq!(f.offsets, vec![0, 0, 0, 2, 2]);
        assert_eq!(f.values_of(2).collect::<Vec<_>>(), vec!["a", "b"]);
        assert!(f.of(0).is_empty());
        assert!(f.of(3).is_empty());
        assert!(f.of(99).is_empty());
        assert!(f.of(usize::MAX).is_empty());
    }

    #[test]
    fn fingerprint_depends_on_raw_ids_and_order() {
        let mut ds = Dataset {
            user_ids: vec!["1".into(), "2".into()],
            item_ids: vec!["10".into()],
            events: vec![Event { user: 0, item: 0, ts: 5 }, Event { user: 1, item: 0, ts: 6 }],
            ..Default::default()
        };
        let a = ds.fingerprint();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        ds.events.swap(0, 1);
        assert_ne!(a, ds.fingerprint());
        assert_eq!(Dataset::default().fingerprint(), "cbf29ce484222325");
    }
}
