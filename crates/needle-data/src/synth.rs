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
}

impl SynthSpec {
    /// Topics scale with the catalogue (√items / 4, at least 8), so topics stay large enough
    /// to have a popularity tail.
    pub fn new(users: u64, items: u64, events: u64, seed: u64) -> SynthSpec {
        let topics = ((items as f64).sqrt() / 4.0).clamp(8.0, 4096.0) as u32;
        SynthSpec { users, items, events, topics, seed }
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
        Catalogue { start, topic_cdf: cdf }
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
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cat = Catalogue::new(spec);
    let k = cat.topics();

    // Items: category = topic (10% of items mislabelled, as real catalogues are), price band
    // drifts with the topic.
    let items_path = dir.join("items.csv");
    {
        let mut w =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&items_path).map_err(io(&items_path))?);
        writeln!(w, "item_id,category,price_band,title").map_err(io(&items_path))?;
        let mut rng = Rng(spec.seed ^ 0x1111);
        for i in 0..spec.items {
            let t = cat.topic_of(i);
            let category = if rng.below(10) == 0 { rng.below(k as u64) as usize } else { t };
            let band = (t % 5 + rng.below(2) as usize).min(5);
            writeln!(w, "i{i},cat{category},p{band},Item {i} of topic {t}").map_err(io(&items_path))?;
        }
        w.flush().map_err(io(&items_path))?;
    }
    // Users: region follows the first favourite topic 70% of the time.
    let users_path = dir.join("users.csv");
    {
        let mut w =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&users_path).map_err(io(&users_path))?);
        writeln!(w, "user_id,region,age_band").map_err(io(&users_path))?;
        let mut rng = Rng(spec.seed ^ 0x2222);
        for u in 0..spec.users {
            let (fav, _) = favourites(&cat, spec.seed, u);
            let region = if rng.below(10) < 7 { fav[0] % 16 } else { rng.below(16) as usize };
            writeln!(w, "u{u},r{region},a{}", rng.below(6)).map_err(io(&users_path))?;
        }
        w.flush().map_err(io(&users_path))?;
    }

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

    let events_path = dir.join("events.csv");
    let mut w =
        std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(&events_path).map_err(io(&events_path))?);
    writeln!(w, "user_id,item_id,ts").map_err(io(&events_path))?;
    let mut written = 0u64;
    let mut line = Vec::with_capacity(64);
    let mut block: Vec<UserState> = Vec::with_capacity(BLOCK);
    for first in (0..spec.users).step_by(BLOCK) {
        block.clear();
        for id in first..(first + BLOCK as u64).min(spec.users) {
            let (favourites, n_fav) = favourites(&cat, spec.seed, id);
            block.push(UserState {
                id,
                favourites,
                n_fav,
                remaining: u64::from(counts[id as usize]),
                gap: (2 * YEAR as u64 / u64::from(counts[id as usize]).max(1)).clamp(120, 3 * 86_400),
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
                line.clear();
                writeln!(line, "u{},i{},{}", s.id, item, s.ts).map_err(io(&events_path))?;
                w.write_all(&line).map_err(io(&events_path))?;
                written += 1;
                active += usize::from(s.remaining > 0);
            }
            if written % (1 << 20) < BLOCK as u64 {
                progress(written, spec.events);
            }
        }
    }
    w.flush().map_err(io(&events_path))?;
    progress(written, spec.events);

    let schema_path = dir.join("schema.toml");
    let schema = format!(
        r#"# Synthetic log written by `needle data synth` ({} users, {} items, {} events, seed {}).
name = "synth"

[interactions]
path = "events.csv"
header = true
user = "user_id"
item = "item_id"
timestamp = "ts"

[items]
path = "items.csv"
header = true
id = "item_id"
title = "title"
[[items.features]]
column = "category"
[[items.features]]
column = "price_band"

[users]
path = "users.csv"
header = true
id = "user_id"
[[users.features]]
column = "region"
[[users.features]]
column = "age_band"
"#,
        spec.users, spec.items, spec.events, spec.seed
    );
    std::fs::write(&schema_path, schema).map_err(io(&schema_path))?;
    Ok(SynthReport { events: written, schema: schema_path, files: vec![events_path, items_path, users_path] })
}

/// The next item of a user: a successor of the previous item (short-term sequence), or a
/// popular item of one of the user's topics; the taste drifts now and then.
fn next_item(s: &mut UserState, cat: &Catalogue, rng: &mut Rng, items: u64) -> u64 {
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
