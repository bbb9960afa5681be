//! Writes the seed corpora of `fuzz/seeds/TARGET/` from needle's own writers.
//!
//! ```text
//! cargo run -p needle-fuzz --example make_seeds [OUT]    # OUT defaults to the repository's fuzz/seeds
//! ```
//!
//! Every seed is a selector byte followed by the input (see each target's documentation in
//! `needle-fuzz`). Seeds named `bad-*` must be rejected and all others accepted; the corpus
//! regression test holds both to that. A target's folder is emptied before it is written, so the
//! output depends only on this program.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow_schema::{Field, Schema as ArrowSchema};
use needle_data::csv::FileFormat;
use needle_data::packed;
use needle_data::split::time_ordered;
use needle_data::synth::{write_synth, SynthSpec};
use needle_data::{load_csv, load_ml1m, Dataset, LoadOptions};
use needle_index::{build, synthetic_clustered, HnswParams, IndexParams, IvfParams, IvfPqParams, Scan};

type Seeds = Vec<(String, Vec<u8>)>;

fn seed(name: &str, sel: u8, body: &[u8]) -> (String, Vec<u8>) {
    let mut bytes = vec![sel];
    bytes.extend_from_slice(body);
    (name.to_owned(), bytes)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn csv_log() -> Seeds {
    let dir = tempfile::tempdir().expect("temporary folder");
    let spec = SynthSpec { format: FileFormat::Csv, ..SynthSpec::new(12, 20, 60, 3) };
    write_synth(&spec, dir.path(), &mut |_, _| {}).expect("synthetic csv log");
    vec![
        seed(
            "log-comma-header-features",
            0b0001_0010,
            b"user,item,ts,rating,country,genres\nu1,i1,100,4.5,de,Action|Drama\nu2,i2,90,,fr,Comedy\n\
              u1,i2,101,3,de,Comedy\n\"u3\",\"i3\",-5,1e0,it,\n",
        ),
        seed("log-tab-positions", 0b0000_0100, b"u1\ti1\t100\t4\nu2\ti1\t100\t5\r\nu2\ti9\t7\t1.5\n\n"),
        seed("log-double-colon-no-rating", 0b0110_1010, b"user::item::ts\n1::10::978300760\n1::20::978300761\n"),
        seed(
            "log-semicolon-skip-bad-rows",
            0b0001_1111,
            b"user;item;ts;rating;country;genres\nu1;i1;1;5;de;a|b\nbroken row\nu2;i2;x;1;fr;c\nu2;i1;2;;fr;a\n",
        ),
        seed(
            "items-table",
            0b0010_0010,
            b"id,title,tags\ni1,\"Toy Story (1995)\",Animation|Comedy\ni2,,Drama\ni9,New item,Drama|Crime\n",
        ),
        seed("users-table-tab-positions", 0b0100_0100, b"u1\teu\t25\nu2\tus\t35\nu7\tapac\t18\n"),
        // The header row of the synthetic log is skipped as a bad row: columns by position.
        seed("synth-events-csv", 0b0110_0001, &read(&dir.path().join("events.csv"))),
        seed("synth-items-as-catalogue", 0b0010_0011, &synth_items_as_catalogue(&read(&dir.path().join("items.csv")))),
        seed("bad-timestamp", 0b0000_0000, b"u1,i1,noon,3\n"),
        seed("bad-header-missing-column", 0b0000_0010, b"user,item,rating\nu1,i1,3\n"),
    ]
}

/// The synthetic catalogue has `item_id,category,price_band,title`; the CSV target's catalogue
/// reads `id,title,tags` by name, so the columns are renamed and reordered to fit.
fn synth_items_as_catalogue(csv: &[u8]) -> Vec<u8> {
    let mut out = String::from("id,title,tags\n");
    for line in String::from_utf8_lossy(csv).lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if let [id, category, band, title] = f[..] {
            out.push_str(&format!("{id},{title},{category}|{band}\n"));
        }
    }
    out.into_bytes()
}

fn write_parquet(columns: Vec<(&str, ArrayRef)>) -> Vec<u8> {
    let fields: Vec<Field> = columns.iter().map(|(n, a)| Field::new(*n, a.data_type().clone(), true)).collect();
    let schema = Arc::new(ArrowSchema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns.into_iter().map(|c| c.1).collect()).expect("batch");
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).expect("parquet writer");
    w.write(&batch).expect("parquet batch");
    w.close().expect("parquet footer");
    out
}

fn parquet_log() -> Seeds {
    let dir = tempfile::tempdir().expect("temporary folder");
    write_synth(&SynthSpec::new(10, 16, 40, 5), dir.path(), &mut |_, _| {}).expect("synthetic parquet log");
    let rich = write_parquet(vec![
        ("user", Arc::new(StringArray::from(vec![Some("u1"), Some("u2"), None, Some("u1")])) as ArrayRef),
        ("item", Arc::new(Int64Array::from(vec![10, 20, 30, 20])) as ArrayRef),
        ("ts", Arc::new(TimestampMillisecondArray::from(vec![5_000, 6_999, 7_000, 8_000])) as ArrayRef),
        ("rating", Arc::new(Float64Array::from(vec![Some(4.5), None, Some(1.0), Some(2.0)])) as ArrayRef),
        ("country", Arc::new(StringArray::from(vec!["de", "fr", "it", "es"])) as ArrayRef),
        ("genres", Arc::new(StringArray::from(vec![Some("a|b"), None, Some("c"), Some("a")])) as ArrayRef),
    ]);
    let string_times = write_parquet(vec![
        ("user_id", Arc::new(Int64Array::from(vec![1, 2, 1])) as ArrayRef),
        ("item_id", Arc::new(StringArray::from(vec!["i1", "i2", "i3"])) as ArrayRef),
        ("ts", Arc::new(StringArray::from(vec!["100", "-3", "101"])) as ArrayRef),
    ]);
    let events = read(&dir.path().join("events.parquet"));
    vec![
        seed("synth-events", 0, &events),
        seed("synth-events-by-position", 8, &events),
        seed("synth-items", 4, &read(&dir.path().join("items.parquet"))),
        seed("synth-users", 6, &read(&dir.path().join("users.parquet"))),
        seed("rating-feature-nulls-skip", 3, &rich),
        seed("rating-feature-nulls-skip-by-position", 11, &rich),
        seed("integer-ids-string-times", 0, &string_times),
        seed("bad-null-id-strict", 2, &rich),
        seed("bad-truncated", 0, &events[..events.len() / 2]),
    ]
}

fn joined(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&needle_fuzz::MOVIELENS_FILE_SEPARATOR)
}

fn movielens() -> Seeds {
    let ratings: &[u8] = b"1::10::5::978300760\n2::20::3::978302109\n1::20::4::978301968\n3::30::2::978300275\n";
    let users: &[u8] = b"1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n";
    let movies: &[u8] =
        b"10::Caf\xe9 Society (1995)::Comedy|Drama\n20::Untitled::Action\n30::Other Film (2000)::Drama\n";
    let data: &[u8] = b"5\t1\t3\t881250949\n6\t2\t4\t881250950\n5\t3\t1\t881250951\n";
    let user: &[u8] = b"5|24|M|technician|85711\n6|53|F|other|94043\n9|23|M|writer|32067\n";
    let item: &[u8] = b"1|Caf\xe9 (1995)|01-Jan-1995||http://x|0|1|1\n2|No Year|01-Jan-1997||http://y|1|0|0\n\
                        3|Third (1980)|||http://z|0|0|1\n";
    let genre: &[u8] = b"unknown|0\nAction|1\nComedy|2\n\n";
    vec![
        seed("ml-1m", 0, &joined(&[ratings, users, movies])),
        seed("ml-1m-ratings-only-crlf", 0, b"1::10::5::100\r\n2::20::3::50\r\n\r\n"),
        seed("ml-1m-skip-bad-rows", 2, &joined(&[b"1::10::5::100\nbroken\n2::20::x::1\n", b"nope::M::1::1::1\n"])),
        seed("ml-100k", 1, &joined(&[data, user, item, genre])),
        seed(
            "ml-100k-default-genres",
            1,
            &joined(&[data, user, b"1|A (1995)|||u|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"]),
        ),
        seed("bad-ml-1m-strict", 0, b"1::10::5\n"),
        seed("bad-ml-100k-genre-flag", 1, &joined(&[data, b"", b"1|A (1995)|||u|0|2|1\n", genre])),
    ]
}

const SHOP_SCHEMA: &str = r#"name = "shop"
interactions = { path = "events.csv", header = true, user = "user", item = "item", timestamp = "ts" }
user_features = [{ column = "country" }]
item_features = [{ column = "tags", separator = "|" }]
[items]
path = "items.csv"
header = true
id = "item"
title = "title"
"#;

fn packed_bytes(ds: &Dataset) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temporary folder");
    packed::write(ds, &time_ordered(ds).expect("ordered"), "seed", dir.path()).expect("binary dataset");
    read(&dir.path().join(packed::DATASET_FILE))
}

fn dataset() -> Seeds {
    let dir = tempfile::tempdir().expect("temporary folder");
    let d = dir.path();
    let events = "user,item,ts,country,tags\nu1,i1,5,de,a|b\nu2,i2,-7,fr,c\nu1,i3,5,de,\nu3,i1,1099511627776,it,a\n";
    std::fs::write(d.join("events.csv"), events).expect("events");
    std::fs::write(d.join("items.csv"), "item,title\ni1,First\ni2,\ni4,Cold item\n").expect("items");
    std::fs::write(d.join("shop.toml"), SHOP_SCHEMA).expect("schema");
    let shop = packed_bytes(&load_csv(&d.join("shop.toml"), &LoadOptions::default()).expect("shop log"));
    let ml = tempfile::tempdir().expect("temporary folder");
    std::fs::write(ml.path().join("ratings.dat"), "1::10::5::100\n2::20::3::50\n1::20::4::200\n").expect("ratings");
    std::fs::write(ml.path().join("movies.dat"), "10::A (1995)::Comedy|Drama\n20::B::Action\n").expect("movies");
    let ml1m = packed_bytes(&load_ml1m(ml.path(), &LoadOptions::default()).expect("ml-1m"));
    let empty = packed_bytes(&Dataset { name: "empty".into(), ..Dataset::default() });
    let mut flipped = shop.clone();
    flipped[64] ^= 1;
    vec![
        seed("shop", 0, &shop),
        seed("shop-resealed", 1, &shop),
        seed("ml-1m", 0, &ml1m),
        seed("ml-1m-resealed", 1, &ml1m),
        seed("empty", 0, &empty),
        seed("bad-flipped-byte", 0, &flipped),
        seed("bad-truncated", 1, &shop[..shop.len() - 40]),
    ]
}

fn checkpoint() -> Seeds {
    let mut out = Vec::new();
    for (k, t) in needle_fuzz::templates().iter().enumerate() {
        let kind = format!("{:?}", t.kind).to_lowercase();
        let file = |name: &str| t.files.iter().find(|(n, _)| n == name).map(|(_, b)| b.clone());
        if let Some(weights) = file("model.safetensors") {
            out.push(seed(&format!("{kind}-checkpoint-alone"), k as u8, &weights));
        }
        for (slot, name) in needle_fuzz::RUN_FILES.iter().enumerate() {
            if let Some(bytes) = file(name) {
                let sel = (k + needle_fuzz::KINDS.len() * (slot + 1)) as u8;
                out.push(seed(&format!("{kind}-{}", name.replace('/', "-")), sel, &bytes));
            }
        }
    }
    out.push(seed("bad-run-format", needle_fuzz::KINDS.len() as u8, b"format = 2\n"));
    out.push(seed("bad-checkpoint", 0, b"\x05\x00\x00"));
    out
}

fn index() -> Seeds {
    let dim = 8;
    let n = 60;
    let data = synthetic_clustered(n, dim, 4, 1.0, 9);
    let ids: Vec<u32> = (0..n as u32).map(|i| i * 3).collect();
    let dir = tempfile::tempdir().expect("temporary folder");
    let mut out = Vec::new();
    let kinds = [
        ("exact", IndexParams::Exact),
        ("ivf", IndexParams::Ivf(IvfParams { nlist: 6, nprobe: 2, ..IvfParams::default() })),
        ("hnsw", IndexParams::Hnsw(HnswParams { m: 4, ef_construction: 32, ef_search: 16, seed: 1 })),
        ("ivfpq", IndexParams::IvfPq(IvfPqParams { nlist: 4, nprobe: 2, ..IvfPqParams::default() })),
        ("ivfsq8", IndexParams::IvfPq(IvfPqParams { nlist: 4, nprobe: 2, scan: Scan::Sq8, ..IvfPqParams::default() })),
    ];
    for (name, params) in kinds {
        let ix = build(&params, &ids, &data, dim).expect("index");
        let path = dir.path().join(name);
        ix.save(&path).expect("saved index");
        let bytes = read(&path);
        out.push(seed(name, 0, &bytes));
        out.push(seed(&format!("{name}-resealed"), 1, &bytes));
        if name == "exact" {
            let empty = build(&params, &[], &[], 3).expect("empty index");
            empty.save(&path).expect("saved index");
            out.push(seed("exact-empty", 0, &read(&path)));
            let mut flipped = bytes.clone();
            flipped[100] ^= 4;
            out.push(seed("bad-exact-flipped-byte", 0, &flipped));
        }
    }
    out
}

fn store_records() -> Seeds {
    vec![
        seed("item-details", 0, br#"{"title":"Toy Story (1995)","genres":["Animation","Comedy"],"year":["1995"]}"#),
        seed("item-details-untitled", 0, br#"{"genres":[]}"#),
        seed("user-features", 1, br#"{"gender":"F","age":"25","zip":"48067"}"#),
        seed("user-profile", 2, br#"{"features":{"gender":"M"},"history":["1193","661","914"]}"#),
        seed("store-embedded", 3, b"embedded"),
        seed("store-embedded-path", 3, b"embedded:/var/lib/needle/store.redb"),
        seed("store-redis", 3, b"redis://127.0.0.1:6379/0"),
        seed("bad-item-details-list", 0, b"[1,2]"),
        seed("bad-store-spec", 3, b"postgres://db"),
    ]
}

fn request_json() -> Seeds {
    vec![
        seed("recall-known-user", 0, br#"{"user_id": "42", "k": 100}"#),
        seed(
            "recall-explicit",
            0,
            br#"{"features": {"gender": "F", "age": "25"}, "history": ["1193", 661], "k": 50, "exclude_seen": true}"#,
        ),
        seed("recall-integer-user", 0, br#"{"user_id": 42}"#),
        seed("event", 1, br#"{"user_id": "42", "item_id": 1193, "ts": 978300760}"#),
        seed("reload-run", 2, br#"{"run": "runs/youtubednn"}"#),
        seed("reload-empty", 2, b""),
        seed("bad-recall-k-zero", 0, br#"{"user_id": "42", "k": 0}"#),
        seed("bad-recall-unknown-field", 0, br#"{"user": "42"}"#),
        seed("bad-event-empty-user", 1, br#"{"user_id": "", "item_id": "1"}"#),
        seed(
            "items-publish",
            3,
            br#"{"items": [{"id": "new-1", "title": "New", "genres": ["Comedy", "Drama"], "year": 1999}, {"id": 7}]}"#,
        ),
        seed("bad-items-duplicate", 3, br#"{"items": [{"id": "a"}, {"id": "a"}]}"#),
        seed("traffic", 4, br#"{"weights": {"youtubednn": 90, "canary": 10}}"#),
        seed("bad-traffic-negative", 4, br#"{"weights": {"a": -1}}"#),
        seed("version-add", 5, br#"{"name": "canary", "run": "runs/youtubednn-reg"}"#),
        seed("bad-version-no-run", 5, br#"{"name": "canary"}"#),
    ]
}

fn config_toml(repo: &Path) -> Seeds {
    let mut out = Vec::new();
    let configs = repo.join("configs");
    let mut paths: Vec<PathBuf> = Vec::new();
    for group in std::fs::read_dir(&configs).unwrap_or_else(|e| panic!("{}: {e}", configs.display())) {
        let group = group.expect("configs entry").path();
        for f in std::fs::read_dir(&group).unwrap_or_else(|e| panic!("{}: {e}", group.display())) {
            paths.push(f.expect("config entry").path());
        }
    }
    paths.sort();
    for p in paths.iter().filter(|p| p.extension().is_some_and(|e| e == "toml")) {
        let group = p.parent().and_then(Path::file_name).map(|g| g.to_string_lossy().into_owned()).unwrap_or_default();
        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        out.push(seed(&format!("config-{group}-{stem}"), 0, &read(p)));
    }
    let dir = tempfile::tempdir().expect("temporary folder");
    let spec = SynthSpec { format: FileFormat::Csv, ..SynthSpec::new(3, 3, 3, 1) };
    let synth = write_synth(&spec, dir.path(), &mut |_, _| {}).expect("synthetic log");
    out.push(seed("schema-synth", 1, &read(&synth.schema)));
    out.push(seed("schema-shop", 1, SHOP_SCHEMA.as_bytes()));
    out.push(seed(
        "schema-positions-tsv",
        1,
        b"[interactions]\npath = \"u.data\"\ndelimiter = \"\\t\"\nuser = 0\nitem = 1\ntimestamp = 3\nrating = 2\n",
    ));
    out.push(seed("index-hnsw", 2, b"hnsw:m=16,ef_construction=200,ef_search=128"));
    out.push(seed("index-ivf", 2, b"ivf:nlist=4000,nprobe=16"));
    out.push(seed("index-exact", 2, b"exact"));
    out.push(seed("bad-config-batch-size", 0, b"[data]\ndataset = \"ml-1m\"\n[train]\nbatch_size = 0\n"));
    out.push(seed(
        "bad-schema-unknown-key",
        1,
        b"[interactions]\npath = \"x\"\nuser = 0\nitem = 1\ntimestamp = 2\nuzer = 3\n",
    ));
    out.push(seed("bad-index-m", 2, b"hnsw:m=1"));
    out
}

fn main() {
    // The HNSW build inserts in parallel, so its graph depends on thread timing; one thread
    // makes the seeds the same on every run.
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().expect("thread pool");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| repo.join("fuzz/seeds"));
    let sets: Vec<(&str, Seeds)> = vec![
        ("csv_log", csv_log()),
        ("parquet_log", parquet_log()),
        ("movielens", movielens()),
        ("dataset", dataset()),
        ("checkpoint", checkpoint()),
        ("index", index()),
        ("store_records", store_records()),
        ("request_json", request_json()),
        ("config_toml", config_toml(&repo)),
    ];
    for (target, seeds) in sets {
        let dir = root.join(target);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        }
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut bytes = 0;
        for (name, body) in &seeds {
            assert!(body.len() < 64 * 1024, "seed {target}/{name} is {} bytes", body.len());
            std::fs::write(dir.join(name), body).unwrap_or_else(|e| panic!("{target}/{name}: {e}"));
            bytes += body.len();
        }
        println!("{target}: {} seeds, {bytes} bytes", seeds.len());
    }
}
