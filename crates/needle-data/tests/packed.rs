//! The binary dataset: what it reads back is what the text gave, damage is an error that names
//! the file, and a stale copy is rebuilt.

use needle_data::packed::{self, DATASET_FILE};
use needle_data::split::{split, time_ordered, SplitStrategy};
use needle_data::{load, load_cached, source_id, Cached, DatasetSource, LoadOptions, Packed};
use std::path::Path;

const SCHEMA: &str = r#"
name = "shop"
interactions = { path = "events.csv", header = true, user = "user", item = "item", timestamp = "ts" }
user_features = [{ column = "country" }]
item_features = [{ column = "tags", separator = "|" }]
"#;

/// A log with ties in time, users seen out of order and a timestamp span that fits 32 bits.
fn write_log(dir: &Path, n: usize, ts_scale: i64) {
    let mut csv = String::from("user,item,ts,country,tags\n");
    let mut s = 12345u64;
    for _ in 0..n {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let u = (s >> 33) % 37;
        let i = (s >> 17) % 101;
        let t = ((s >> 40) % 50) as i64 * ts_scale;
        csv.push_str(&format!("u{u},i{i},{t},c{},t{}|t{}\n", u % 3, i % 5, i % 7));
    }
    std::fs::write(dir.join("events.csv"), csv).unwrap();
    std::fs::write(dir.join("shop.toml"), SCHEMA).unwrap();
}

fn source(dir: &Path) -> DatasetSource {
    DatasetSource::Csv { schema: dir.join("shop.toml") }
}

#[test]
fn binary_dataset_reads_back_what_the_text_gave() {
    // Small and huge time spans, and times before the epoch.
    for ts_scale in [1i64, 1 << 40, -(1 << 50)] {
        let d = tempfile::tempdir().unwrap();
        write_log(d.path(), 3000, ts_scale);
        let opts = LoadOptions::default();
        let text = load(&source(d.path()), None, &opts).unwrap();
        let info = packed::write(&text, &time_ordered(&text).unwrap(), "id", &d.path().join("out")).unwrap();
        assert_eq!(info.item_bytes, 1);
        let bin = Packed::open(&d.path().join("out")).unwrap().dataset().unwrap();
        assert_eq!(bin.fingerprint(), text.fingerprint());
        assert_eq!(bin.user_ids, text.user_ids);
        assert_eq!(bin.item_ids, text.item_ids);
        assert_eq!(bin.user_features, text.user_features);
        assert_eq!(bin.item_features, text.item_features);
        assert_eq!(bin.events.len(), 3000);
        for strategy in
            [SplitStrategy::LeaveLastOut, SplitStrategy::GlobalTime { valid_fraction: 0.1, test_fraction: 0.1 }]
        {
            assert_eq!(split(&bin, &strategy).unwrap(), split(&text, &strategy).unwrap());
        }
    }
}

#[test]
fn damage_is_an_error_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    write_log(d.path(), 2000, 1);
    let ds = load(&source(d.path()), None, &LoadOptions::default()).unwrap();
    let out = d.path().join("out");
    packed::write(&ds, &time_ordered(&ds).unwrap(), "id", &out).unwrap();
    let file = out.join(DATASET_FILE);
    let good = std::fs::read(&file).unwrap();
    assert!(!out.join(format!("{DATASET_FILE}.tmp")).exists());

    // A flipped byte anywhere (header, arrays, meta) is caught by open or by decoding.
    let mut caught = 0;
    let positions: Vec<usize> = (0..good.len()).step_by(97).chain([0, 9, 20, 50, good.len() - 1]).collect();
    for &pos in &positions {
        let mut bad = good.clone();
        bad[pos] ^= 0x10;
        std::fs::write(&file, &bad).unwrap();
        let res = Packed::open(&out).and_then(|p| p.dataset().map(|_| ()));
        if let Err(e) = res {
            let msg = e.to_string();
            assert!(msg.contains("dataset.ndb"), "{msg}");
            caught += 1;
        } else {
            // Only padding between sections is outside every checksum.
            let sections = Packed::open(&out).unwrap().info.sections;
            assert!(
                !sections.iter().any(|s| (s.offset as usize..(s.offset + s.len) as usize).contains(&pos)),
                "flip at {pos} inside a section went unnoticed"
            );
        }
    }
    assert!(caught > positions.len() * 9 / 10, "{caught} of {}", positions.len());

    // Truncated, empty and foreign files.
    for bad in [
        &good[..good.len() / 2],
        &good[..10],
        &b""[..],
        &b"NOTNEEDLE-------------------------------------------------------------"[..],
    ] {
        std::fs::write(&file, bad).unwrap();
        let msg = Packed::open(&out).err().expect("a damaged file must not open").to_string();
        assert!(msg.contains("dataset.ndb"), "{msg}");
    }
}

#[test]
fn stale_or_damaged_copies_are_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    write_log(d.path(), 1000, 1);
    let src = source(d.path());
    let opts = LoadOptions::default();
    let (a, how) = load_cached(&src, None, &opts, None, &mut |_, _| {}).unwrap();
    let cache = d.path().join("shop.ndb");
    assert_eq!(how, Cached::Built { dir: cache.clone(), reason: "first use".into() });
    let (b, how) = load_cached(&src, None, &opts, None, &mut |_, _| {}).unwrap();
    assert_eq!(how, Cached::Hit(cache.clone()));
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(split(&a, &SplitStrategy::LeaveLastOut).unwrap(), split(&b, &SplitStrategy::LeaveLastOut).unwrap());

    // Another option is another dataset.
    let lenient = LoadOptions { skip_bad_rows: true };
    assert_ne!(source_id(&src, None, &opts).unwrap(), source_id(&src, None, &lenient).unwrap());

    // The log changes: the copy is stale and rebuilt from the new text.
    let mut log = std::fs::read_to_string(d.path().join("events.csv")).unwrap();
    log.push_str("u999,i1,7,c0,t0\n");
    std::fs::write(d.path().join("events.csv"), log).unwrap();
    let (c, how) = load_cached(&src, None, &opts, None, &mut |_, _| {}).unwrap();
    assert!(matches!(how, Cached::Built { ref reason, .. } if reason.contains("changed")), "{how:?}");
    assert_eq!(c.events.len(), 1001);
    assert_ne!(c.fingerprint(), a.fingerprint());

    // A corrupted copy is rebuilt, never used.
    let file = cache.join(DATASET_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let (e, how) = load_cached(&src, None, &opts, None, &mut |_, _| {}).unwrap();
    assert!(matches!(how, Cached::Built { ref reason, .. } if reason.contains("dataset.ndb")), "{how:?}");
    assert_eq!(e.fingerprint(), c.fingerprint());
}

#[test]
fn checksum_in_pieces_equals_checksum_at_once() {
    let data: Vec<u8> = (0..1000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let whole = packed::checksum(&data);
    for cut in [1usize, 7, 31, 32, 33, 64, 100, 999] {
        let mut c = packed::Checksum::new();
        for piece in data.chunks(cut) {
            c.update(piece);
        }
        assert_eq!(c.finish(), whole, "pieces of {cut}");
    }
    let mut other = data.clone();
    other[500] ^= 4;
    assert_ne!(packed::checksum(&other), whole);
}
