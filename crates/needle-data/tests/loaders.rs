//! Loader tests on small generated files: MovieLens layouts, CSV schemas, bad rows and
//! robustness against arbitrary bytes.

use std::fs;
use std::path::Path;

use needle_data::{
    load, load_csv, load_ml100k, load_ml1m, DataError, Dataset, DatasetName, DatasetSource, LoadOptions, Schema,
};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).unwrap();
}

const STRICT: LoadOptions = LoadOptions { skip_bad_rows: false };
const LENIENT: LoadOptions = LoadOptions { skip_bad_rows: true };

fn vals(ds: &Dataset, user_side: bool, feat: &str, entity: usize) -> Vec<String> {
    let f = if user_side { ds.user_feature(feat) } else { ds.item_feature(feat) }
        .unwrap_or_else(|| panic!("feature {feat} missing"));
    f.values_of(entity).map(str::to_owned).collect()
}

fn ml1m_dir(ratings: &[u8]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "ratings.dat", ratings);
    write(d.path(), "users.dat", b"1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n");
    // Latin-1: 0xE9 is e-acute.
    write(
        d.path(),
        "movies.dat",
        b"10::Caf\xe9 Society (1995)::Comedy|Drama\n20::Untitled::Action\n30::Other Film (2000)::Drama\n",
    );
    d
}

#[test]
fn ml1m_counts_features_titles() {
    let d = ml1m_dir(b"1::10::5::100\n2::20::3::50\n1::20::4::200\n");
    let ds = load_ml1m(d.path(), &STRICT).unwrap();
    assert_eq!(ds.name, "ml-1m");
    assert_eq!(ds.events.len(), 3);
    assert_eq!(ds.report.rows, 3);
    assert_eq!(ds.report.skipped_total(), 0);
    // Rated entities first in first-seen order, side-table-only ones appended.
    assert_eq!(ds.user_ids, vec!["1", "2", "3"]);
    assert_eq!(ds.item_ids, vec!["10", "20", "30"]);
    assert_eq!(ds.events[1].user, 1);
    assert_eq!(ds.events[1].item, 1);
    assert_eq!(ds.events[1].ts, 50);
    assert_eq!(ds.rating(1), Some(3.0));

    assert_eq!(vals(&ds, true, "gender", 0), vec!["F"]);
    assert_eq!(vals(&ds, true, "age", 1), vec!["56"]);
    assert_eq!(vals(&ds, true, "occupation", 2), vec!["15"]);
    assert_eq!(vals(&ds, true, "zip", 2), vec!["55117"]);
    for f in &ds.user_features {
        assert!(!f.multi);
        assert_eq!(f.offsets.len(), ds.user_ids.len() + 1);
    }

    assert_eq!(ds.item_titles.len(), 3);
    assert_eq!(ds.item_titles[0].as_deref(), Some("Café Society (1995)"));
    assert_eq!(ds.item_title(1), Some("Untitled"));
    assert_eq!(vals(&ds, false, "genres", 0), vec!["Comedy", "Drama"]);
    assert!(ds.item_feature("genres").unwrap().multi);
    assert_eq!(vals(&ds, false, "genres", 2), vec!["Drama"]);
    assert_eq!(vals(&ds, false, "year", 0), vec!["1995"]);
    assert!(vals(&ds, false, "year", 1).is_empty());
    assert_eq!(vals(&ds, false, "year", 2), vec!["2000"]);
    // "Drama" shared by two items is one value key.
    let g = ds.item_feature("genres").unwrap();
    assert_eq!(g.values, vec!["Comedy", "Drama", "Action"]);
    assert_eq!(g.offsets.len(), 4);
}

#[test]
fn ml1m_crlf_and_blank_lines_match_lf() {
    let a = load_ml1m(ml1m_dir(b"1::10::5::100\n2::20::3::50\n").path(), &STRICT).unwrap();
    let b = load_ml1m(ml1m_dir(b"1::10::5::100\r\n2::20::3::50\r\n\r\n\n").path(), &STRICT).unwrap();
    assert_eq!(a.events, b.events);
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.user_ids, b.user_ids);
}

#[test]
fn ml1m_side_files_optional() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "ratings.dat", b"7::8::1::1\n");
    let ds = load_ml1m(d.path(), &STRICT).unwrap();
    assert_eq!(ds.events.len(), 1);
    assert!(ds.user_features.is_empty());
    assert!(ds.item_features.is_empty());
    assert_eq!(ds.item_titles, vec![None]);
}

#[test]
fn bad_row_names_file_and_line() {
    let d = ml1m_dir(b"1::10::5::100\n\n1::10::5\n");
    let err = load_ml1m(d.path(), &STRICT).unwrap_err();
    assert!(matches!(err, DataError::BadRow { line: 3, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.ends_with("ratings.dat:3: expected 4 fields separated by \"::\", found 3"), "{msg}");

    for (bad, what) in [
        (&b"x::10::5::100\n"[..], "user id"),
        (b"1::1a::5::100\n", "item id"),
        (b"1::10::good::100\n", "rating"),
        (b"1::10::5::yesterday\n", "timestamp"),
        (b"1::10::5::100::7\n", "found 5"),
    ] {
        let d = ml1m_dir(bad);
        let msg = load_ml1m(d.path(), &STRICT).unwrap_err().to_string();
        assert!(msg.contains("ratings.dat:1:") && msg.contains(what), "{msg}");
    }

    // Bad side-table rows report their own file.
    let d = ml1m_dir(b"1::10::5::100\n");
    write(d.path(), "users.dat", b"1::F::1::10::48067\n2::M\n");
    let msg = load_ml1m(d.path(), &STRICT).unwrap_err().to_string();
    assert!(msg.contains("users.dat:2:"), "{msg}");
}

#[test]
fn skip_mode_counts_per_file() {
    let d = ml1m_dir(b"1::10::5::100\nbroken\n2::20::x::1\n2::20::3::50\n");
    write(d.path(), "users.dat", b"1::F::1::10::48067\nnope::M::1::1::1\n");
    let ds = load_ml1m(d.path(), &LENIENT).unwrap();
    assert_eq!(ds.events.len(), 2);
    assert_eq!(ds.report.rows, 2);
    assert_eq!(ds.report.skipped_total(), 3);
    let by_file: Vec<(String, usize)> =
        ds.report.skipped.iter().map(|(p, n)| (p.file_name().unwrap().to_string_lossy().into_owned(), *n)).collect();
    assert_eq!(by_file, vec![("ratings.dat".to_owned(), 2), ("users.dat".to_owned(), 1)]);
}

#[test]
fn missing_dataset_explains_download() {
    let d = tempfile::tempdir().unwrap();
    let err = load_ml1m(d.path(), &STRICT).unwrap_err();
    assert!(matches!(err, DataError::MissingDataset { .. }));
    let msg = err.to_string();
    assert!(msg.starts_with("MovieLens-1M not found in"), "{msg}");
    assert!(msg.contains("(expected ratings.dat)"), "{msg}");
    assert!(msg.contains("needle data download ml-1m --to"), "{msg}");
    assert!(msg.contains("NEEDLE_DATA_DIR"), "{msg}");

    let err = load(&DatasetSource::MovieLens(DatasetName::Ml100k), Some(d.path()), &STRICT).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("MovieLens-100k") && msg.contains("u.data"), "{msg}");
    assert!(msg.contains(&format!("needle data download ml-100k --to {}", d.path().display())), "{msg}");
}

#[test]
fn source_accepts_root_or_dataset_folder() {
    let root = tempfile::tempdir().unwrap();
    let ml = root.path().join("ml-1m");
    fs::create_dir(&ml).unwrap();
    write(&ml, "ratings.dat", b"1::2::3::4\n");
    let src = DatasetSource::MovieLens(DatasetName::Ml1m);
    let a = load(&src, Some(root.path()), &STRICT).unwrap();
    let b = load(&src, Some(&ml), &STRICT).unwrap();
    assert_eq!(a.events.len(), 1);
    assert_eq!(a.fingerprint(), b.fingerprint());
}

#[test]
fn data_dir_resolution_order() {
    let flag = Path::new("/some/flag");
    assert_eq!(needle_data::resolve_data_dir(Some(flag)), flag);
    std::env::set_var("NEEDLE_DATA_DIR", "/from/env");
    assert_eq!(needle_data::resolve_data_dir(None), Path::new("/from/env"));
    assert_eq!(needle_data::resolve_data_dir(Some(flag)), flag);
    std::env::remove_var("NEEDLE_DATA_DIR");
    assert_eq!(needle_data::resolve_data_dir(None), Path::new("data"));
}

#[test]
fn dataset_name_serde_kebab() {
    #[derive(serde::Deserialize)]
    struct C {
        d: DatasetName,
    }
    let c: C = toml::from_str("d = \"ml-100k\"").unwrap();
    assert_eq!(c.d, DatasetName::Ml100k);
    let c: C = toml::from_str("d = \"ml-1m\"").unwrap();
    assert_eq!(c.d, DatasetName::Ml1m);
    #[derive(serde::Serialize)]
    struct S {
        d: DatasetName,
    }
    let out = toml::to_string(&S { d: DatasetName::Ml1m }).unwrap();
    assert_eq!(out.trim(), "d = \"ml-1m\"");
    assert_eq!("ml-100k".parse::<DatasetName>(), Ok(DatasetName::Ml100k));
    assert_eq!(DatasetName::Ml100k.to_string(), "ml-100k");
}

fn ml100k_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "u.data", b"5\t1\t3\t881250949\n6\t2\t4\t881250950\n");
    write(d.path(), "u.user", b"5|24|M|technician|85711\n6|53|F|other|94043\n9|23|M|writer|32067\n");
    write(d.path(), "u.genre", b"unknown|0\nAction|1\nComedy|2\n\n");
    write(
        d.path(),
        "u.item",
        b"1|Caf\xe9 (1995)|01-Jan-1995||http://x|0|1|1\n2|No Year|01-Jan-1997||http://y|1|0|0\n3|Third (1980)|||http://z|0|0|1\n",
    );
    d
}

#[test]
fn ml100k_counts_features_titles() {
    let d = ml100k_dir();
    let ds = load_ml100k(d.path(), &STRICT).unwrap();
    assert_eq!(ds.name, "ml-100k");
    assert_eq!(ds.events.len(), 2);
    assert_eq!(ds.user_ids, vec!["5", "6", "9"]);
    assert_eq!(ds.item_ids, vec!["1", "2", "3"]);
    assert_eq!(ds.events[0].ts, 881250949);
    assert_eq!(vals(&ds, true, "gender", 1), vec!["F"]);
    assert_eq!(vals(&ds, true, "age", 0), vec!["24"]);
    assert_eq!(vals(&ds, true, "occupation", 2), vec!["writer"]);
    assert_eq!(vals(&ds, true, "zip", 1), vec!["94043"]);
    assert_eq!(ds.item_title(0), Some("Café (1995)"));
    assert_eq!(vals(&ds, false, "genres", 0), vec!["Action", "Comedy"]);
    assert_eq!(vals(&ds, false, "genres", 1), vec!["unknown"]);
    assert_eq!(vals(&ds, false, "year", 0), vec!["1995"]);
    assert_eq!(vals(&ds, false, "year", 1), vec!["1997"]);
    assert_eq!(vals(&ds, false, "year", 2), vec!["1980"]);
    assert_eq!(ds.item_feature("genres").unwrap().values, vec!["unknown", "Action", "Comedy"]);
}

#[test]
fn ml100k_bad_flag_and_field_count() {
    let d = ml100k_dir();
    write(d.path(), "u.item", b"1|A (1995)|||u|0|2|1\n");
    let msg = load_ml100k(d.path(), &STRICT).unwrap_err().to_string();
    assert!(msg.contains("u.item:1:") && msg.contains("0 or 1"), "{msg}");
    write(d.path(), "u.item", b"1|A (1995)|||u|0|1\n");
    let msg = load_ml100k(d.path(), &STRICT).unwrap_err().to_string();
    assert!(msg.contains("expected 8 fields"), "{msg}");
    let ds = load_ml100k(d.path(), &LENIENT).unwrap();
    assert_eq!(ds.report.skipped_total(), 1);
    assert_eq!(ds.item_ids.len(), 2);
}

// ---------- CSV ----------

fn csv_dir(schema: &str, events: &[u8]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "shop.toml", schema.as_bytes());
    write(d.path(), "events.csv", events);
    d
}

const SHOP: &str = r#"
name = "shop"
interactions = { path = "events.csv", delimiter = ";", header = true, user = "user_id", item = "item_id", timestamp = "ts", rating = "rating" }
[[user_features]]
column = "age"
[[user_features]]
column = "tags"
separator = "|"
name = "tag"
[[item_features]]
column = "genres"
separator = "|"
"#;

#[test]
fn csv_header_names_and_multi_features() {
    let d = csv_dir(
        SHOP,
        b"\"user_id\";item_id;ts;rating;age;tags;genres\r\n\
          u1;i1;10;4.5;30;a|b;x|y\r\n\
          u2;\"i2\";11;;40;;y\r\n\
          u1;i2;12;1;99;c;z\r\n",
    );
    let ds = load_csv(&d.path().join("shop.toml"), &STRICT).unwrap();
    assert_eq!(ds.name, "shop");
    assert_eq!(ds.events.len(), 3);
    assert_eq!(ds.user_ids, vec!["u1", "u2"]);
    assert_eq!(ds.item_ids, vec!["i1", "i2"]);
    assert_eq!(ds.rating(0), Some(4.5));
    assert_eq!(ds.rating(1), None);
    assert_eq!(ds.events[2].ts, 12);
    // First row of an entity wins.
    assert_eq!(vals(&ds, true, "age", 0), vec!["30"]);
    assert_eq!(vals(&ds, true, "tag", 0), vec!["a", "b"]);
    assert!(ds.user_feature("tag").unwrap().multi);
    assert!(!ds.user_feature("age").unwrap().multi);
    assert!(vals(&ds, true, "tag", 1).is_empty());
    assert_eq!(vals(&ds, false, "genres", 0), vec!["x", "y"]);
    assert_eq!(vals(&ds, false, "genres", 1), vec!["y"]);
    assert_eq!(ds.item_titles, vec![None, None]);
}

#[test]
fn csv_indices_without_header() {
    let schema = r#"
interactions = { path = "events.csv", delimiter = "::", user = 1, item = 0, timestamp = 2 }
[[item_features]]
column = 3
"#;
    let d = csv_dir(schema, b"i1::u1::5::red\ni2::u1::6::blue\n");
    let ds = load_csv(&d.path().join("shop.toml"), &STRICT).unwrap();
    assert_eq!(ds.name, "shop", "defaults to the schema file stem");
    assert_eq!(ds.user_ids, vec!["u1"]);
    assert_eq!(ds.item_ids, vec!["i1", "i2"]);
    assert_eq!(vals(&ds, false, "col3", 1), vec!["blue"]);
    assert_eq!(ds.rating(1), None);

    // Through the CLI entry point with an absolute schema path.
    let src = DatasetSource::Csv { schema: d.path().join("shop.toml") };
    assert_eq!(load(&src, None, &STRICT).unwrap().events.len(), 2);
}

#[test]
fn csv_missing_column_is_schema_error() {
    let d = csv_dir(&SHOP.replace("\"age\"", "\"agee\""), b"user_id;item_id;ts;rating;age;tags;genres\n");
    let err = load_csv(&d.path().join("shop.toml"), &STRICT).unwrap_err();
    assert!(matches!(err, DataError::Schema { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("shop.toml") && msg.contains("\"agee\""), "{msg}");

    let schema = "[interactions]\npath = \"events.csv\"\nuser = 0\nitem = 1\ntimestamp = 5\n";
    let d = csv_dir(schema, b"a,b,1\n");
    let msg = load_csv(&d.path().join("shop.toml"), &STRICT).unwrap_err().to_string();
    assert!(msg.contains("shop.toml") && msg.contains("index 5"), "{msg}");

    let schema = "[interactions]\npath = \"events.csv\"\nuser = \"u\"\nitem = 1\ntimestamp = 2\n";
    let d = csv_dir(schema, b"a,b,1\n");
    let err = load_csv(&d.path().join("shop.toml"), &STRICT).unwrap_err();
    assert!(err.to_string().contains("header"), "{err}");
}

#[test]
fn csv_unknown_key_is_schema_error() {
    let d = csv_dir(&SHOP.replace("header = true", "header = true\nheadr = 1"), b"");
    let err = load_csv(&d.path().join("shop.toml"), &STRICT).unwrap_err();
    assert!(matches!(err, DataError::Schema { .. }), "{err:?}");
    assert!(err.to_string().contains("headr"), "{err}");

    let err =
        Schema::from_toml("colour = 1\n[interactions]\npath=\"x\"\nuser=0\nitem=1\ntimestamp=2\n", Path::new("s.toml"))
            .unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
    let err = Schema::from_toml(
        "[interactions]\npath=\"x\"\ndelimiter=\"\"\nuser=0\nitem=1\ntimestamp=2\n",
        Path::new("s.toml"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("delimiter"), "{err}");
}

#[test]
fn csv_bad_rows() {
    let d = csv_dir(
        SHOP,
        b"user_id;item_id;ts;rating;age;tags;genres\n\
          u1;i1;10;4;30;a;x\n\
          u1;i1;10;4;30;a\n\
          ;i1;10;4;30;a;x\n\
          u1;i1;soon;4;30;a;x\n\
          u1;i1;10;four;30;a;x\n\
          u1;i\xff;10;4;30;a;x\n",
    );
    let path = d.path().join("shop.toml");
    let msg = load_csv(&path, &STRICT).unwrap_err().to_string();
    assert!(msg.contains("events.csv:3: expected 7 fields separated by \";\", found 6"), "{msg}");
    let ds = load_csv(&path, &LENIENT).unwrap();
    assert_eq!(ds.events.len(), 1);
    assert_eq!(ds.report.skipped_total(), 5);
}

// ---------- robustness ----------

/// Tiny deterministic generator so the test needs no rand crate.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn bytes(&mut self) -> Vec<u8> {
        // Mostly structure characters so rows get past the first checks sometimes.
        const ALPHABET: &[u8] = b"0123456789::::||||\t\t,,;\n\n\r\"- .ab(1995)\xff\xe9";
        let len = (self.next() % 120) as usize;
        (0..len)
            .map(|_| {
                if self.next() & 15 == 0 {
                    self.next() as u8
                } else {
                    ALPHABET[(self.next() as usize) % ALPHABET.len()]
                }
            })
            .collect()
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Lcg(42);
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let schema_hdr = "[interactions]\npath = \"events.csv\"\nheader = true\ndelimiter = \",\"\nuser = 0\nitem = 1\ntimestamp = 2\nrating = 3\n[[user_features]]\ncolumn = 1\nseparator = \"|\"\n";
    let schema_nohdr =
        "[interactions]\npath = \"events2.csv\"\ndelimiter = \"::\"\nuser = 0\nitem = 1\ntimestamp = 2\n";
    write(p, "s1.toml", schema_hdr.as_bytes());
    write(p, "s2.toml", schema_nohdr.as_bytes());
    let mut ok = 0usize;
    for round in 0..300 {
        for f in [
            "ratings.dat",
            "users.dat",
            "movies.dat",
            "u.data",
            "u.user",
            "u.item",
            "u.genre",
            "events.csv",
            "events2.csv",
            "vocab.tsv",
        ] {
            let mut b = rng.bytes();
            // Every few rounds, start from a valid row so later checks are reached.
            if round % 3 == 0 {
                let valid: &[u8] = match f {
                    "ratings.dat" => b"1::2::3::4\n",
                    "u.data" => b"1\t2\t3\t4\n",
                    "events.csv" => b"u,i,t,r\n",
                    _ => b"",
                };
                b.splice(0..0, valid.iter().copied());
            }
            write(p, f, &b);
        }
        let schema_rand = rng.bytes();
        write(p, "s3.toml", &schema_rand);
        for opts in [&STRICT, &LENIENT] {
            let results = [
                load_ml1m(p, opts),
                load_ml100k(p, opts),
                load_csv(&p.join("s1.toml"), opts),
                load_csv(&p.join("s2.toml"), opts),
                load_csv(&p.join("s3.toml"), opts),
            ];
            for r in results.into_iter().flatten() {
                ok += 1;
                let _ = r.fingerprint();
                for f in r.user_features.iter().chain(&r.item_features) {
                    assert_eq!(f.num_entities(), f.offsets.len() - 1);
                }
                let s = needle_data::split(&r, &needle_data::SplitStrategy::LeaveLastOut).unwrap();
                assert_eq!(s.train.total() + s.valid.total() + s.test.total(), r.events.len());
            }
        }
        let _ = needle_data::Vocab::load(&p.join("vocab.tsv"));
    }
    assert!(ok > 0, "some random inputs should load");
}

#[test]
fn catalogue_and_user_tables_add_entities_features_and_titles() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "s.toml",
        br#"
interactions = { path = "events.csv", header = true, user = "user", item = "item", timestamp = "ts" }
items = { path = "items.tsv", delimiter = "\t", header = true, id = "sku", title = "name", features = [{ column = "cat" }, { column = "tags", separator = "|" }] }
[users]
path = "users.csv"
id = 0
[[users.features]]
column = 1
name = "region"
"#,
    );
    write(d.path(), "events.csv", b"user,item,ts\nu1,a,1\nu2,b,2\nu1,b,3\n");
    // "c" is in the catalogue only; "a" is listed twice (first row wins).
    write(
        d.path(),
        "items.tsv",
        b"sku\tname\tcat\ttags\nb\tBee\tx\tt1|t2\na\tAy\ty\t\nc\tSee\tx\tt2\na\tOther\tz\tt9\n",
    );
    write(d.path(), "users.csv", b"u2,north\nu3,south\n");
    let ds = load_csv(&d.path().join("s.toml"), &STRICT).unwrap();
    assert_eq!(ds.item_ids, vec!["a", "b", "c"]);
    assert_eq!(ds.user_ids, vec!["u1", "u2", "u3"]);
    assert_eq!(ds.events.len(), 3);
    assert_eq!(vals(&ds, false, "cat", 0), vec!["y"]);
    assert_eq!(vals(&ds, false, "cat", 2), vec!["x"]);
    assert_eq!(vals(&ds, false, "tags", 1), vec!["t1", "t2"]);
    assert_eq!(ds.item_title(0), Some("Ay"));
    assert_eq!(ds.item_title(2), Some("See"));
    assert_eq!(vals(&ds, true, "region", 1), vec!["north"]);
    assert!(vals(&ds, true, "region", 0).is_empty());

    // A table row with the wrong width names the table file and line.
    write(d.path(), "users.csv", b"u2,north\nu3,south,extra\n");
    let msg = load_csv(&d.path().join("s.toml"), &STRICT).unwrap_err().to_string();
    assert!(msg.contains("users.csv:2") && msg.contains("expected 2 fields"), "{msg}");
    let ds = load_csv(&d.path().join("s.toml"), &LENIENT).unwrap();
    assert_eq!(ds.report.skipped_total(), 1);
}
