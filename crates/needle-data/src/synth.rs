//! A synthetic interaction log with the structure real ones have, at any size, seeded: the
//! scale fixture for ingest, training and serving (real data stays the quality fixture).
//!
//! - items belong to topics; within a topic, popularity follows a power law (P ∝ 1/rank), and
//!   topics themselves are unequally popular;
//! - a user has two or three favourite topics, and a taste that drifts: now and then one
//!   favourite is replaced by another topic;
//! - short-term sequence: often the next item is one of the two that follow the previous item
//!   in its topic's order (a series, an album), which only a model that reads the newest items
//!   can predict;
//! - item category and price band, and user region and age band, are correlated with topics,
//!   so feature-reading towers have something to learn;
//! - per user, timestamps increase; users start at different times over a year.
//!
//! Events are written in blocks of users whose events interleave in time, like a real log.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Sizes and seed of a synthetic log.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub users: u64,
    pub items: u64,
    pub events: u64,
    pub topics: u32,
    pub seed: u64,
    /// Parquet (the default) or CSV files.
    pub format: crate::csv::FileFormat,
    /// Fraction of the catalogue that never occurs in the log: items known only by their
    /// features, as newly published items are.
    pub cold_items: f64,
}

impl SynthSpec {
    /// Topics scale with the catalogue (√items / 4, at least 8), so topics stay large enough
    /// to have a popularity tail.
    pub fn new(users: u64, items: u64, events: u64, seed: u64) -> SynthSpec {
        let topics = ((items as f64).sqrt() / 4.0).clamp(8.0, 4096.0) as u32;
        SynthSpec { users, items, events, topics, seed, format: crate::csv::FileFormat::Parquet, cold_items: 0.0 }
    }
}

/// What [`write_synth`] wrote.
#[derive(Clone, Debug)]
pub struct SynthReport {
    pub events: u64,
    pub schema: PathBuf,
    pub files: Vec<PathBuf>,
}

/// splitmix64: tiny, fast, good enough for data generation, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n.max(1))) >> 64) as u64
    }
    /// A rank in `0..n` with P(r) ∝ 1/(r+1) (continuous log-uniform approximation).
    fn zipf(&mut self, n: u64) -> u64 {
        let r = ((n as f64 + 1.0).ln() * self.unit()).exp() - 1.0;
        (r as u64).min(n.saturating_sub(1))
    }
}

/// Items of topic `t` are `start[t]..start[t+1]`; sizes follow topic popularity so popular
/// topics have more items, as real catalogues do.
struct Catalogue {
    start: Vec<u64>,
    /// Cumulative topic weights, for drawing a topic by popularity.
    topic_cdf: Vec<f64>,
    /// Items whose hash falls below this never occur in the log.
    cold_below: u64,
    seed: u64,
}

impl Catalogue {
    fn new(spec: &SynthSpec) -> Catalogue {
        let k = spec.topics.max(1) as usize;
        // Topic popularity ∝ 1/(t+1)^0.7: a head of broad topics and a tail of niches.
        let w: Vec<f64> = (0..k).map(|t| 1.0 / ((t + 1) as f64).powf(0.7)).collect();
        let total: f64 = w.iter().sum();
        let mut start = Vec::with_capacity(k + 1);
        let mut acc = 0.0;
        start.push(0);
        for x in &w {
            acc += x / total;
            start.push(((acc * spec.items as f64).round() as u64).min(spec.items));
        }
        if let Some(last) = start.last_mut() {
            *last = spec.items;
        }
        let mut cdf = Vec::with_capacity(k);
        let mut c = 0.0;
        for x in &w {
            c += x / total;
            cdf.push(c);
        }
        let cold = spec.cold_items.clamp(0.0, 1.0);
        let cold_below = if cold >= 1.0 { u64::MAX } else { (cold * (u64::MAX as f64)) as u64 };
        Catalogue { start, topic_cdf: cdf, cold_below, seed: spec.seed }
    }
    /// Whether `item` is one of the catalogue items the log never mentions; a hash of the
    /// item, so the catalogue and the log agree without storing a set.
    fn is_cold(&self, item: u64) -> bool {
        self.cold_below > 0
            && Rng(self.seed ^ 0x3333 ^ item.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next() < self.cold_below
    }
    /// `item`, or when it is cold the next item of its topic (wrapping) that is not, or else any
    /// item that is not.
    fn settle(&self, item: u64, rng: &mut Rng, items: u64) -> u64 {
        if !self.is_cold(item) {
            return item;
        }
        let (a, b) = self.range(self.topic_of(item));
        if let Some(c) = (1..b.saturating_sub(a)).map(|j| a + (item - a + j) % (b - a)).find(|&c| !self.is_cold(c)) {
            return c;
        }
        (0..1024).map(|_| rng.below(items)).find(|&c| !self.is_cold(c)).unwrap_or(item)
    }
    fn topics(&self) -> usize {
        self.topic_cdf.len()
    }
    fn range(&self, t: usize) -> (u64, u64) {
        (self.start[t], self.start[t + 1])
    }
    fn topic_of(&self, item: u64) -> usize {
        self.start.partition_point(|&s| s <= item).saturating_sub(1).min(self.topics() - 1)
    }
    fn draw_topic(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.topic_cdf.partition_point(|&c| c < u).min(self.topics() - 1)
    }
    /// A popular-within-topic item; empty topics fall back to a uniform item.
    fn draw_item(&self, t: usize, rng: &mut Rng, items: u64) -> u64 {
        let (a, b) = self.range(t);
        if b > a {
            // Rank 0 is the most popular; scatter ranks over the topic's ids so that id order
            // does not give popularity away.
            let r = rng.zipf(b - a);
            a + (r.wrapping_mul(0x9e37_79b9) % (b - a))
        } else {
            rng.below(items)
        }
    }
}

/// One user's state while their events are generated.
struct UserState {
    id: u64,
    favourites: [usize; 3],
    n_fav: usize,
    remaining: u64,
    ts: i64,
    /// Largest gap between two events; heavy users act more often, so every user's log spans
    /// at most about a year.
    gap: u64,
    last: Option<u64>,
}

const T0: i64 = 1_600_000_000;
const YEAR: i64 = 365 * 86_400;
const BLOCK: usize = 4096;

fn io(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |e| DataError::io(path, e)
}

/// One value of a row.
enum Val<'a> {
    S(&'a str),
    I(i64),
}

/// Column kinds of a synthetic table.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
}

/// Rows per Parquet batch; row groups hold 16 batches (about 10^6 rows).
const PQ_BATCH: usize = 1 << 16;

/// Writes one table as CSV or Parquet (snappy) to a temporary file renamed into place by
/// [`Table::finish`], so an interrupted run never leaves a truncated file under the final name.
struct Table {
    path: PathBuf,
    tmp: PathBuf,
    out: TableOut,
}

enum TableOut {
    Csv(std::io::BufWriter<std::fs::File>, String),
    Parquet {
        writer: Box<parquet::arrow::ArrowWriter<std::fs::File>>,
        schema: arrow_schema::SchemaRef,
        strs: Vec<arrow_array::builder::StringBuilder>,
        ints: Vec<arrow_array::builder::Int64Builder>,
        kinds: Vec<Kind>,
        rows: usize,
    },
}

impl Table {
    fn create(path: &Path, format: crate::csv::FileFormat, columns: &[(&str, Kind)]) -> Result<Table> {
        let tmp = needle_core::file::tmp_path(path);
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let out = match format {
            crate::csv::FileFormat::Csv => {
                let mut w = std::io::BufWriter::with_capacity(4 << 20, file);
                let header: Vec<&str> = columns.iter().map(|c| c.0).collect();
                writeln!(w, "{}", header.join(",")).map_err(io(&tmp))?;
                TableOut::Csv(w, String::with_capacity(128))
            }
            crate::csv::FileFormat::Parquet => {
                use arrow_schema::{DataType, Field, Schema};
                let fields: Vec<Field> = columns
                    .iter()
                    .map(|(n, k)| {
                        Field::new(*n, if matches!(k, Kind::Str) { DataType::Utf8 } else { DataType::Int64 }, false)
                    })
                    .collect();
                let schema = std::sync::Arc::new(Schema::new(fields));
                let props = parquet::file::properties::WriterProperties::builder()
                    .set_compression(parquet::basic::Compression::SNAPPY)
                    .set_max_row_group_row_count(Some(16 * PQ_BATCH))
                    .build();
                let writer = Box::new(
                    parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(props))
                        .map_err(|e| DataError::Parquet { path: tmp.clone(), reason: e.to_string() })?,
                );
                let n_str = columns.iter().filter(|c| matches!(c.1, Kind::Str)).count();
                TableOut::Parquet {
                    writer,
                    schema,
                    strs: (0..n_str).map(|_| arrow_array::builder::StringBuilder::new()).collect(),
                    ints: (0..columns.len() - n_str).map(|_| arrow_array::builder::Int64Builder::new()).collect(),
                    kinds: columns.iter().map(|c| c.1).collect(),
                    rows: 0,
                }
            }
        };
        Ok(Table { path: path.to_path_buf(), tmp, out })
    }

    fn row(&mut self, vals: &[Val<'_>]) -> Result<()> {
        match &mut self.out {
            TableOut::Csv(w, line) => {
                use std::fmt::Write as _;
                line.clear();
                for (k, v) in vals.iter().enumerate() {
                    if k > 0 {
                        line.push(',');
                    }
                    match v {
                        Val::S(s) => line.push_str(s),
                        Val::I(i) => {
                            let _ = write!(line, "{i}");
                        }
                    }
                }
                line.push('\n');
                w.write_all(line.as_bytes()).map_err(io(&self.tmp))
            }
            TableOut::Parquet { strs, ints, rows, .. } => {
                let (mut si, mut ii) = (0, 0);
                for v in vals {
                    match v {
                        Val::S(s) => {
                            if let Some(b) = strs.get_mut(si) {
                                b.append_value(s);
                            }
                            si += 1;
                        }
                        Val::I(i) => {
                            if let Some(b) = ints.get_mut(ii) {
                                b.append_value(*i);
                            }
                            ii += 1;
                        }
                    }
                }
                *rows += 1;
                if *rows >= PQ_BATCH {
                    self.flush_batch()?;
                }
                Ok(())
            }
        }
    }

    fn flush_batch(&mut self) -> Result<()> {
        let TableOut::Parquet { writer, schema, strs, ints, kinds, rows } = &mut self.out else {
            return Ok(());
        };
        if *rows == 0 {
            return Ok(());
        }
        let (mut si, mut ii) = (0, 0);
        let mut arrays: Vec<arrow_array::ArrayRef> = Vec::with_capacity(kinds.len());
        for k in kinds.iter() {
            match k {
                Kind::Str => {
                    arrays.push(std::sync::Arc::new(strs[si].finish()));
                    si += 1;
                }
                Kind::Int => {
                    arrays.push(std::sync::Arc::new(ints[ii].finish()));
                    ii += 1;
                }
            }
        }
        let pq = |e: String| DataError::Parquet { path: self.tmp.clone(), reason: e };
        let batch = arrow_array::RecordBatch::try_new(schema.clone(), arrays).map_err(|e| pq(e.to_string()))?;
        writer.write(&batch).map_err(|e| pq(e.to_string()))?;
        *rows = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<PathBuf> {
        self.flush_batch()?;
        match self.out {
            TableOut::Csv(mut w, _) => w.flush().map_err(io(&self.tmp))?,
            TableOut::Parquet { writer, .. } => {
                writer.close().map_err(|e| DataError::Parquet { path: self.tmp.clone(), reason: e.to_string() })?;
            }
        }
        needle_core::file::persist(&self.path).map_err(io(&self.path))?;
        Ok(self.path)
    }
}

/// The user's favourite topics: a deterministic function of the user and seed, so the users
/// table and the log agree without storing state.
fn favourites(cat: &Catalogue, seed: u64, user: u64) -> ([usize; 3], usize) {
    let mut rng = Rng(seed ^ user.wrapping_mul(0xd6e8_feb8_6659_fd93));
    let n = 2 + (rng.below(2) as usize);
    let mut f = [0usize; 3];
    for slot in f.iter_mut().take(n) {
        *slot = cat.draw_topic(&mut rng);
    }
    (f, n)
}

/// Writes `events.csv`, `items.csv`, `users.csv` and `schema.toml` into `dir`. `progress`
/// gets `(events written, events total)`.
pub fn write_synth(spec: &SynthSpec, dir: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<SynthReport> {
    if spec.users == 0 || spec.items == 0 || spec.events < spec.users {
        return Err(DataError::InvalidSplit(format!(
            "synthetic log needs users > 0, items > 0 and events >= users (got {} users, {} items, {} events)",
            spec.users, spec.items, spec.events
        )));
    }
    if !(0.0..1.0).contains(&spec.cold_items) {
        return Err(DataError::InvalidSplit(format!(
            "the fraction of cold items must be at least 0 and below 1 (got {})",
            spec.cold_items
        )));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Until the new schema is written, the folder holds no usable log.
    let schema_path = dir.join("schema.toml");
    match std::fs::remove_file(&schema_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(DataError::io(&schema_path, e)),
        _ => {}
    }
    let cat = Catalogue::new(spec);
    let k = cat.topics();

    // Items: category = topic (10% of items mislabelled, as real catalogues are), price band
    // drifts with the topic.
    let ext = match spec.format {
        crate::csv::FileFormat::Csv => "csv",
        crate::csv::FileFormat::Parquet => "parquet",
    };
    let mut table = Table::create(
        &dir.join(format!("items.{ext}")),
        spec.format,
        &[("item_id", Kind::Str), ("category", Kind::Str), ("price_band", Kind::Str), ("title", Kind::Str)],
    )?;
    {
        let mut rng = Rng(spec.seed ^ 0x1111);
        let (mut id, mut cat_s, mut band_s, mut title) = (String::new(), String::new(), String::new(), String::new());
        use std::fmt::Write as _;
        for i in 0..spec.items {
            let t = cat.topic_of(i);
            let category = if rng.below(10) == 0 { rng.below(k as u64) as usize } else { t };
            let band = (t % 5 + rng.below(2) as usize).min(5);
            for b in [&mut id, &mut cat_s, &mut band_s, &mut title] {
                b.clear();
            }
            let _ = (write!(id, "i{i}"), write!(cat_s, "cat{category}"), write!(band_s, "p{band}"));
            let _ = write!(title, "Item {i} of topic {t}");
            table.row(&[Val::S(&id), Val::S(&cat_s), Val::S(&band_s), Val::S(&title)])?;
        }
    }
    let items_path = table.finish()?;
    // Users: region follows the first favourite topic 70% of the time.
    let mut table = Table::create(
        &dir.join(format!("users.{ext}")),
        spec.format,
        &[("user_id", Kind::Str), ("region", Kind::Str), ("age_band", Kind::Str)],
    )?;
    {
        let mut rng = Rng(spec.seed ^ 0x2222);
        let (mut id, mut region_s, mut age_s) = (String::new(), String::new(), String::new());
        use std::fmt::Write as _;
        for u in 0..spec.users {
            let (fav, _) = favourites(&cat, spec.seed, u);
            let region = if rng.below(10) < 7 { fav[0] % 16 } else { rng.below(16) as usize };
            for b in [&mut id, &mut region_s, &mut age_s] {
                b.clear();
            }
            let _ = (write!(id, "u{u}"), write!(region_s, "r{region}"), write!(age_s, "a{}", rng.below(6)));
            table.row(&[Val::S(&id), Val::S(&region_s), Val::S(&age_s)])?;
        }
    }
    let users_path = table.finish()?;

    // Events per user: heavy-tailed (Pareto, shape 1.5, at least 3), scaled to the total.
    let mut rng = Rng(spec.seed);
    let mut counts: Vec<u32> = Vec::with_capacity(spec.users as usize);
    let mut raw_total = 0.0f64;
    let raw: Vec<f32> = (0..spec.users)
        .map(|_| {
            let x = (1.0 - rng.unit()).powf(-1.0 / 1.5) as f32;
            raw_total += f64::from(x);
            x
        })
        .collect();
    let spare = spec.events.saturating_sub(3 * spec.users) as f64;
    let mut assigned = 0u64;
    for x in &raw {
        let c = 3 + (f64::from(*x) / raw_total * spare).floor() as u64;
        assigned += c;
        counts.push(u32::try_from(c).unwrap_or(u32::MAX));
    }
    drop(raw);
    // Hand out the rounding remainder one event at a time, so the total is exact.
    let mut u = 0usize;
    while assigned < spec.events {
        let n = counts.len();
        if let Some(c) = counts.get_mut(u % n) {
            *c = c.saturating_add(1);
        }
        assigned += 1;
        u += 1;
    }

    let mut table = Table::create(
        &dir.join(format!("events.{ext}")),
        spec.format,
        &[("user_id", Kind::Str), ("item_id", Kind::Str), ("ts", Kind::Int)],
    )?;
    let mut written = 0u64;
    {
        let (mut uid, mut iid) = (String::new(), String::new());
        use std::fmt::Write as _;
        let mut block: Vec<UserState> = Vec::with_capacity(BLOCK);
        for first in (0..spec.users).step_by(BLOCK) {
            block.clear();
            for id in first..(first + BLOCK as u64).min(spec.users) {
                let (favourites, n_fav) = favourites(&cat, spec.seed, id);
                let count = u64::from(counts.get(id as usize).copied().unwrap_or(0));
                block.push(UserState {
                    id,
                    favourites,
                    n_fav,
                    remaining: count,
                    gap: (2 * YEAR as u64 / count.max(1)).clamp(120, 3 * 86_400),
                    ts: T0 + rng.below(YEAR as u64 / 2) as i64,
                    last: None,
                });
            }
            // Round-robin over the block: one event per user per round, so users interleave.
            let mut active = block.len();
            while active > 0 {
                active = 0;
                for s in block.iter_mut().filter(|s| s.remaining > 0) {
                    let item = next_item(s, &cat, &mut rng, spec.items);
                    s.last = Some(item);
                    s.remaining -= 1;
                    s.ts += 60 + rng.below(s.gap) as i64;
                    uid.clear();
                    iid.clear();
                    let _ = (write!(uid, "u{}", s.id), write!(iid, "i{item}"));
                    table.row(&[Val::S(&uid), Val::S(&iid), Val::I(s.ts)])?;
                    written += 1;
                    active += usize::from(s.remaining > 0);
                }
                if written % (1 << 20) < BLOCK as u64 {
                    progress(written, spec.events);
                }
            }
        }
    }
    let events_path = table.finish()?;
    progress(written, spec.events);

    let schema = format!(
        r#"# Synthetic log written by `needle data synth` ({} users, {} items, {} events, seed {}, cold items {}).
name = "synth"

[interactions]
path = "events.{ext}"
header = true
user = "user_id"
item = "item_id"
timestamp = "ts"

[items]
path = "items.{ext}"
header = true
id = "item_id"
title = "title"
[[items.features]]
column = "category"
[[items.features]]
column = "price_band"

[users]
path = "users.{ext}"
header = true
id = "user_id"
[[users.features]]
column = "region"
[[users.features]]
column = "age_band"
"#,
        spec.users, spec.items, spec.events, spec.seed, spec.cold_items
    );
    // The schema goes last: a folder with a schema holds a complete log.
    needle_core::file::write_atomic(&schema_path, schema.as_bytes()).map_err(io(&schema_path))?;
    Ok(SynthReport { events: written, schema: schema_path, files: vec![events_path, items_path, users_path] })
}

/// The next item of a user: a successor of the previous item (short-term sequence), or a
/// popular item of one of the user's topics; the taste drifts now and then.
fn next_item(s: &mut UserState, cat: &Catalogue, rng: &mut Rng, items: u64) -> u64 {
    let item = next_item_raw(s, cat, rng, items);
    cat.settle(item, rng, items)
}

/// [`next_item`] before cold items are stepped over.
fn next_item_raw(s: &mut UserState, cat: &Catalogue, rng: &mut Rng, items: u64) -> u64 {
    if rng.below(50) == 0 {
        let slot = rng.below(s.n_fav as u64) as usize;
        s.favourites[slot] = cat.draw_topic(rng);
    }
    let roll = rng.below(100);
    if let (Some(prev), true) = (s.last, roll < 45) {
        let t = cat.topic_of(prev);
        let (a, b) = cat.range(t);
        if b > a {
            return a + (prev - a + 1 + rng.below(2)) % (b - a);
        }
    }
    if roll >= 95 {
        // Exploration: any topic, by topic popularity.
        let t = cat.draw_topic(rng);
        return cat.draw_item(t, rng, items);
    }
    let t = s.favourites[rng.below(s.n_fav as u64) as usize];
    cat.draw_item(t, rng, items)
}
