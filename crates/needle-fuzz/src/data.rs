//! Interaction logs: CSV/TSV and Parquet through a schema, MovieLens, and the binary dataset.

use std::cell::Cell;
use std::path::Path;
use std::sync::Once;

use needle_data::packed::{self, PackedInfo};
use needle_data::split::{split, time_ordered, SplitStrategy};
use needle_data::{load_csv, load_ml100k, load_ml1m, Dataset, LoadOptions, Packed};

use crate::{put, scratch, selector};

/// Field separators the CSV target tries: one byte, tab, several bytes, another byte.
const DELIMITERS: [&str; 4] = [",", "\t", "::", ";"];

/// A small valid log for the inputs whose bytes are a side table.
const COMPANION_LOG: &str = "user,item,ts\nu1,i1,1\nu2,i2,2\nu1,i3,3\nu3,i1,3\n";

/// The schema of [`COMPANION_LOG`], to be completed by a side table section.
const COMPANION_SCHEMA: &str =
    "name = \"fuzz\"\n[interactions]\npath = \"log.csv\"\nheader = true\nuser = \"user\"\nitem = \"item\"\ntimestamp = \"ts\"\n";

/// A column by header name or by position, as a schema names it.
fn col(named: bool, name: &str, index: usize) -> String {
    if named {
        format!("{name:?}")
    } else {
        index.to_string()
    }
}

/// The CSV/TSV loader of `needle_data::csv` over a log or side table made of the bytes.
///
/// Selector bits: 0 skip bad rows; 1 header row (columns by name, else by position); 2–3
/// delimiter; 4 feature columns in the log (which moves the loader from block interning to
/// per-row interning); 5–6 role: 0 the log, 1 the item catalogue, 2 the user table, 3 the log
/// without a rating column.
pub fn csv_log(data: &[u8]) -> bool {
    let (sel, body) = selector(data);
    let opts = LoadOptions { skip_bad_rows: sel & 1 != 0 };
    let named = sel & 2 != 0;
    let delim = DELIMITERS[usize::from((sel >> 2) & 3)];
    let features = sel & 16 != 0;
    let role = (sel >> 5) & 3;
    let dir = scratch();
    let d = dir.path();
    let schema = match role {
        0 | 3 => {
            let mut s = format!(
                "name = \"fuzz\"\n[interactions]\npath = \"log.csv\"\ndelimiter = {delim:?}\nheader = {named}\n\
                 user = {}\nitem = {}\ntimestamp = {}\n",
                col(named, "user", 0),
                col(named, "item", 1),
                col(named, "ts", 2)
            );
            if role == 0 {
                s += &format!("rating = {}\n", col(named, "rating", 3));
            }
            if features {
                s += &format!("[[user_features]]\ncolumn = {}\n", col(named, "country", 4));
                s += &format!("[[item_features]]\ncolumn = {}\nseparator = \"|\"\n", col(named, "genres", 5));
            }
            put(&d.join("log.csv"), body);
            s
        }
        1 => {
            put(&d.join("log.csv"), COMPANION_LOG.as_bytes());
            put(&d.join("items.csv"), body);
            format!(
                "{COMPANION_SCHEMA}[items]\npath = \"items.csv\"\ndelimiter = {delim:?}\nheader = {named}\nid = {}\n\
                 title = {}\n[[items.features]]\ncolumn = {}\nseparator = \"|\"\n",
                col(named, "id", 0),
                col(named, "title", 1),
                col(named, "tags", 2)
            )
        }
        _ => {
            put(&d.join("log.csv"), COMPANION_LOG.as_bytes());
            put(&d.join("users.csv"), body);
            format!(
                "{COMPANION_SCHEMA}[users]\npath = \"users.csv\"\ndelimiter = {delim:?}\nheader = {named}\nid = {}\n\
                 [[users.features]]\ncolumn = {}\n[[users.features]]\ncolumn = {}\n",
                col(named, "id", 0),
                col(named, "region", 1),
                col(named, "age", 2)
            )
        }
    };
    put(&d.join("fuzz.toml"), schema.as_bytes());
    match load_csv(&d.join("fuzz.toml"), &opts) {
        Ok(ds) => {
            check_dataset(&ds, d);
            true
        }
        Err(_) => false,
    }
}

/// The Parquet reader behind schemas whose log or side table is a `.parquet` file.
///
/// Selector bits: 0 skip bad rows; 1–2 role: 0 a log as `needle data synth` writes it
/// (`user_id`, `item_id`, `ts`), 1 a log with a rating, a user feature and a multi-valued item
/// feature (`user`, `item`, `ts`, `rating`, `country`, `genres`), 2 an item catalogue (`item_id`,
/// `category`, `price_band`, `title`), 3 a user table (`user_id`, `region`, `age_band`); 3 columns
/// by position instead of by name.
pub fn parquet_log(data: &[u8]) -> bool {
    let_reader_panics_unwind();
    let (sel, body) = selector(data);
    let opts = LoadOptions { skip_bad_rows: sel & 1 != 0 };
    let role = (sel >> 1) & 3;
    let named = sel & 8 == 0;
    let dir = scratch();
    let d = dir.path();
    let head = "name = \"fuzz\"\n[interactions]\npath = \"log.parquet\"\n";
    let schema = match role {
        0 => format!(
            "{head}user = {}\nitem = {}\ntimestamp = {}\n",
            col(named, "user_id", 0),
            col(named, "item_id", 1),
            col(named, "ts", 2)
        ),
        1 => format!(
            "{head}user = {}\nitem = {}\ntimestamp = {}\nrating = {}\n[[user_features]]\ncolumn = {}\n\
             [[item_features]]\ncolumn = {}\nseparator = \"|\"\n",
            col(named, "user", 0),
            col(named, "item", 1),
            col(named, "ts", 2),
            col(named, "rating", 3),
            col(named, "country", 4),
            col(named, "genres", 5)
        ),
        2 => format!(
            "{COMPANION_SCHEMA}[items]\npath = \"table.parquet\"\nid = {}\ntitle = {}\n[[items.features]]\n\
             column = {}\n[[items.features]]\ncolumn = {}\n",
            col(named, "item_id", 0),
            col(named, "title", 3),
            col(named, "category", 1),
            col(named, "price_band", 2)
        ),
        _ => format!(
            "{COMPANION_SCHEMA}[users]\npath = \"table.parquet\"\nid = {}\n[[users.features]]\ncolumn = {}\n\
             [[users.features]]\ncolumn = {}\n",
            col(named, "user_id", 0),
            col(named, "region", 1),
            col(named, "age_band", 2)
        ),
    };
    if role < 2 {
        put(&d.join("log.parquet"), body);
    } else {
        put(&d.join("log.csv"), COMPANION_LOG.as_bytes());
        put(&d.join("table.parquet"), body);
    }
    put(&d.join("fuzz.toml"), schema.as_bytes());
    let loaded = {
        let _reading = ParquetTarget::enter();
        load_csv(&d.join("fuzz.toml"), &opts)
    };
    match loaded {
        Ok(ds) => {
            check_dataset(&ds, d);
            true
        }
        Err(_) => false,
    }
}

thread_local! {
    static IN_PARQUET_TARGET: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as loading in the Parquet target until dropped, even by a panic.
struct ParquetTarget;

impl ParquetTarget {
    fn enter() -> ParquetTarget {
        IN_PARQUET_TARGET.with(|c| c.set(true));
        ParquetTarget
    }
}

impl Drop for ParquetTarget {
    fn drop(&mut self) {
        IN_PARQUET_TARGET.with(|c| c.set(false));
    }
}

/// `needle-data` turns panics of the Parquet reader into errors, but under libFuzzer every
/// panic aborts, caught or not (its panic hook aborts before unwinding). While the Parquet
/// target loads, a panic raised in the reader's own source (the `parquet` and `arrow` crates)
/// unwinds quietly to `needle-data`'s handler; any other panic still reaches the previous hook.
fn let_reader_panics_unwind() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_reader =
                info.location().is_some_and(|l| l.file().contains("/parquet-") || l.file().contains("/arrow-"));
            if !(in_reader && IN_PARQUET_TARGET.with(Cell::get)) {
                previous(info);
            }
        }));
    });
}

/// Separates the files of one MovieLens input; no MovieLens file holds a NUL byte.
pub const MOVIELENS_FILE_SEPARATOR: u8 = 0;

/// The MovieLens-1M and -100k parsers over a dataset folder made of the bytes.
///
/// Selector bits: 0 MovieLens-100k (else 1M); 1 skip bad rows. The rest is split at NUL bytes
/// into the release's files in order — `ratings.dat`, `users.dat`, `movies.dat` for 1M; `u.data`,
/// `u.user`, `u.item`, `u.genre` for 100k — and the files past the last part are absent.
pub fn movielens(data: &[u8]) -> bool {
    let (sel, body) = selector(data);
    let opts = LoadOptions { skip_bad_rows: sel & 2 != 0 };
    let ml100k = sel & 1 != 0;
    let names: &[&str] =
        if ml100k { &["u.data", "u.user", "u.item", "u.genre"] } else { &["ratings.dat", "users.dat", "movies.dat"] };
    let dir = scratch();
    let d = dir.path();
    for (name, part) in names.iter().zip(body.split(|&b| b == MOVIELENS_FILE_SEPARATOR)) {
        put(&d.join(name), part);
    }
    let loaded = if ml100k { load_ml100k(d, &opts) } else { load_ml1m(d, &opts) };
    match loaded {
        Ok(ds) => {
            check_dataset(&ds, d);
            true
        }
        Err(_) => false,
    }
}

/// Bytes of the binary dataset's header (the layout of `needle_data::packed`).
const PACKED_HEADER: usize = 64;

/// The binary dataset reader (`Packed::open`, then `dataset`) over a `dataset.ndb` made of the
/// bytes.
///
/// Selector bit 0 reseals the file first (see [`reseal_packed`]), so that mutations reach the
/// decoding behind the checksums instead of stopping at them.
pub fn dataset(data: &[u8]) -> bool {
    let (sel, body) = selector(data);
    let bytes = if sel & 1 != 0 { reseal_packed(body) } else { body.to_vec() };
    let dir = scratch();
    let d = dir.path();
    put(&d.join(packed::DATASET_FILE), &bytes);
    let Ok(p) = Packed::open(d) else {
        return false;
    };
    assert_eq!(p.file_len(), bytes.len() as u64);
    match p.dataset() {
        Ok(ds) => {
            check_dataset(&ds, &d.join("again"));
            true
        }
        Err(_) => false,
    }
}

fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(b) = bytes.get(at..at + 8) {
        w.copy_from_slice(b);
    }
    u64::from_le_bytes(w)
}

/// The file with its section checksums (in the meta), meta checksum and length, file length and
/// header checksum recomputed from its bytes. Anything that cannot be located is left as it is.
pub fn reseal_packed(body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    if out.len() < PACKED_HEADER {
        return out;
    }
    // The meta runs to the end of the file, as the writer puts it; taking it from there rather
    // than by its recorded length keeps bytes inserted into it or cut from it by a mutation.
    let meta_start = usize::try_from(word(&out, 16)).ok().filter(|&a| a >= PACKED_HEADER && a <= out.len());
    if let Some(start) = meta_start {
        let meta = out[start..].to_vec();
        let resealed = std::str::from_utf8(&meta)
            .ok()
            .and_then(|text| toml::from_str::<PackedInfo>(text).ok())
            .and_then(|mut info| {
                for s in &mut info.sections {
                    let bytes = usize::try_from(s.offset)
                        .ok()
                        .zip(usize::try_from(s.len).ok())
                        .and_then(|(a, n)| out.get(a..a.checked_add(n)?));
                    if let Some(b) = bytes {
                        s.checksum = format!("{:016x}", packed::checksum(b));
                    }
                }
                toml::to_string(&info).ok()
            })
            .map(String::into_bytes)
            .unwrap_or(meta);
        out.truncate(start);
        out.extend_from_slice(&resealed);
        out[24..32].copy_from_slice(&(resealed.len() as u64).to_le_bytes());
        out[32..40].copy_from_slice(&packed::checksum(&resealed).to_le_bytes());
    }
    let len = out.len() as u64;
    out[40..48].copy_from_slice(&len.to_le_bytes());
    let head = packed::checksum(&out[..48]);
    out[48..56].copy_from_slice(&head.to_le_bytes());
    out
}

/// Puts an accepted dataset to use: its documented invariants, both splits, and a round trip
/// through the binary dataset, which must read back what was written.
fn check_dataset(ds: &Dataset, dir: &Path) {
    let (users, items) = (ds.user_ids.len(), ds.item_ids.len());
    for (i, e) in ds.events.iter().enumerate() {
        assert!(
            (e.user as usize) < users && (e.item as usize) < items,
            "event {i} has keys ({}, {}) outside {users} users and {items} items",
            e.user,
            e.item
        );
    }
    assert!(ds.ratings.is_empty() || ds.ratings.len() == ds.events.len(), "ratings are not parallel to events");
    for (side, feats, n) in [("user", &ds.user_features, users), ("item", &ds.item_features, items)] {
        for f in feats {
            assert_eq!(f.num_entities(), n, "{side} feature {} does not cover every entity", f.name);
            let values = f.values.len();
            assert!(f.keys.iter().all(|&k| (k as usize) < values), "{side} feature {} has a key out of range", f.name);
        }
    }
    let _ = split(ds, &SplitStrategy::LeaveLastOut);
    let _ = split(ds, &SplitStrategy::GlobalTime { valid_fraction: 0.1, test_fraction: 0.2 });
    let Ok(seqs) = time_ordered(ds) else {
        return;
    };
    let out = dir.join("packed");
    let info = match packed::write(ds, &seqs, "fuzz", &out) {
        Ok(info) => info,
        Err(e) => panic!("an accepted dataset cannot be written as a binary dataset: {e}"),
    };
    let back = match Packed::open(&out).and_then(|p| p.dataset()) {
        Ok(b) => b,
        Err(e) => panic!("a binary dataset just written cannot be read back: {e}"),
    };
    assert_eq!(info.events, seqs.total() as u64);
    assert_eq!(back.fingerprint(), ds.fingerprint(), "the fingerprint changed through the binary dataset");
    assert_eq!(back.user_ids, ds.user_ids);
    assert_eq!(back.item_ids, ds.item_ids);
    assert_eq!(back.user_features, ds.user_features);
    assert_eq!(back.item_features, ds.item_features);
    // An empty title and no title mean the same to every reader.
    let titles = |d: &Dataset| -> Vec<Option<String>> {
        (0..d.item_ids.len()).map(|i| d.item_title(i as u32).filter(|t| !t.is_empty()).map(str::to_owned)).collect()
    };
    assert_eq!(titles(&back), titles(ds));
    let again = match time_ordered(&back) {
        Ok(s) => s,
        Err(e) => panic!("the binary dataset's events cannot be ordered: {e}"),
    };
    for u in 0..users {
        assert_eq!(again.items_of(u), seqs.items_of(u), "user {u}'s items changed through the binary dataset");
        assert_eq!(again.ts_of(u), seqs.ts_of(u), "user {u}'s times changed through the binary dataset");
    }
}
