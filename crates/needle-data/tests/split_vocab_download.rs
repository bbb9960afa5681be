//! Split properties, vocabulary persistence and the offline parts of download.

use std::fs;
use std::io::Write;

use needle_data::{extract_zip, split, verify_md5, DataError, Dataset, Event, Sequences, SplitStrategy, Vocab};

fn ds_from(events: &[(u32, u32, i64)], n_users: usize, n_items: usize) -> Dataset {
    Dataset {
        name: "t".into(),
        user_ids: (0..n_users).map(|u| format!("u{u}")).collect(),
        item_ids: (0..n_items).map(|i| format!("i{i}")).collect(),
        events: events.iter().map(|&(user, item, ts)| Event { user, item, ts }).collect(),
        ..Default::default()
    }
}

#[test]
fn leave_last_out_small_with_ties() {
    // user 0: ts 5,3,3,9 on items 0,1,2,3 -> time order 1,2 (tie keeps file order),0,3
    // user 1: two events with equal ts -> first train, second test
    // user 2: one event -> train; user 3: none
    let ds = ds_from(&[(0, 0, 5), (1, 4, 7), (0, 1, 3), (0, 2, 3), (2, 5, 1), (1, 6, 7), (0, 3, 9)], 4, 7);
    let s = split(&ds, &SplitStrategy::LeaveLastOut).unwrap();
    for seq in [&s.train, &s.valid, &s.test] {
        assert_eq!(seq.num_users(), 4);
    }
    assert_eq!(s.train.items_of(0), &[1, 2]);
    assert_eq!(s.train.ts_of(0), &[3, 3]);
    assert_eq!(s.valid.items_of(0), &[0]);
    assert_eq!(s.test.items_of(0), &[3]);
    assert_eq!(s.train.items_of(1), &[4]);
    assert!(s.valid.items_of(1).is_empty());
    assert_eq!(s.test.items_of(1), &[6]);
    assert_eq!(s.train.items_of(2), &[5]);
    assert_eq!(s.test.len_of(2), 0);
    assert_eq!(s.train.len_of(3), 0);
    assert!(s.train.items_of(99).is_empty());
    assert_eq!(s.train.total() + s.valid.total() + s.test.total(), 7);
    assert_eq!(s.train_max_ts, 7);
}

fn random_ds(seed: u64, n_events: usize) -> Dataset {
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        x >> 33
    };
    let evs: Vec<(u32, u32, i64)> = (0..n_events)
        .map(|_| {
            (
                (next() % 40) as u32,
                (next() % 100) as u32,
                (next() % 500) as i64, // coarse timestamps so ties are frequent
            )
        })
        .collect();
    ds_from(&evs, 45, 100)
}

/// Each part's rows are time-sorted (tie order is checked by the callers' reconstruction).
fn check_sorted(seq: &Sequences) {
    for u in 0..seq.num_users() {
        let ts = seq.ts_of(u);
        assert!(ts.windows(2).all(|w| w[0] <= w[1]));
    }
}

#[test]
fn leave_last_out_properties() {
    let ds = random_ds(7, 2000);
    let s = split(&ds, &SplitStrategy::LeaveLastOut).unwrap();
    assert_eq!(s.train.total() + s.valid.total() + s.test.total(), 2000);
    let mut max_train = i64::MIN;
    for u in 0..ds.user_ids.len() {
        let mut evs: Vec<(i64, u32)> =
            ds.events.iter().filter(|e| e.user as usize == u).map(|e| (e.ts, e.item)).collect();
        evs.sort_by_key(|e| e.0); // stable
        let n = evs.len();
        let expect_test = usize::from(n >= 2);
        let expect_valid = usize::from(n >= 3);
        assert_eq!(s.test.len_of(u), expect_test);
        assert_eq!(s.valid.len_of(u), expect_valid);
        let joined: Vec<u32> =
            s.train.items_of(u).iter().chain(s.valid.items_of(u)).chain(s.test.items_of(u)).copied().collect();
        assert_eq!(joined, evs.iter().map(|e| e.1).collect::<Vec<_>>());
        let tmax = s.train.ts_of(u).iter().copied().max();
        for later in s.valid.ts_of(u).iter().chain(s.test.ts_of(u)) {
            if let Some(t) = tmax {
                assert!(t <= *later);
            }
        }
        if let Some(t) = tmax {
            max_train = max_train.max(t);
        }
    }
    assert_eq!(s.train_max_ts, max_train);
    for seq in [&s.train, &s.valid, &s.test] {
        check_sorted(seq);
    }
}

#[test]
fn global_time_properties() {
    let ds = random_ds(11, 3000);
    let s = split(&ds, &SplitStrategy::GlobalTime { valid_fraction: 0.1, test_fraction: 0.2 }).unwrap();
    let (tr, va, te) = (s.train.total(), s.valid.total(), s.test.total());
    assert_eq!(tr + va + te, 3000);
    // Quantile cuts with ties: roughly the requested fractions.
    assert!((2000..2300).contains(&tr), "train {tr}");
    assert!(te > 450 && te < 750, "test {te}");
    let max_train = s.train.ts.iter().copied().max().unwrap();
    let min_valid = s.valid.ts.iter().copied().min().unwrap();
    let max_valid = s.valid.ts.iter().copied().max().unwrap();
    let min_test = s.test.ts.iter().copied().min().unwrap();
    assert!(max_train < min_valid);
    assert!(max_valid < min_test);
    assert_eq!(s.train_max_ts, max_train);
    for u in 0..ds.user_ids.len() {
        let joined: Vec<u32> =
            s.train.items_of(u).iter().chain(s.valid.items_of(u)).chain(s.test.items_of(u)).copied().collect();
        let mut evs: Vec<(i64, u32)> =
            ds.events.iter().filter(|e| e.user as usize == u).map(|e| (e.ts, e.item)).collect();
        evs.sort_by_key(|e| e.0);
        assert_eq!(joined, evs.iter().map(|e| e.1).collect::<Vec<_>>());
    }
}

#[test]
fn split_rejects_bad_fractions_and_handles_empty() {
    for (v, t) in [(0.0, 0.1), (0.1, 0.0), (0.5, 0.5), (0.1, 1.0), (f64::NAN, 0.1), (-0.1, 0.2)] {
        let err =
            split(&Dataset::default(), &SplitStrategy::GlobalTime { valid_fraction: v, test_fraction: t }).unwrap_err();
        assert!(matches!(err, DataError::InvalidSplit(_)), "{v} {t}");
    }
    let s = split(&Dataset::default(), &SplitStrategy::GlobalTime { valid_fraction: 0.1, test_fraction: 0.1 }).unwrap();
    assert_eq!(s.train.num_users(), 0);
    assert_eq!(s.train_max_ts, i64::MIN);
}

#[test]
fn vocab_round_trip_and_errors() {
    let d = tempfile::tempdir().unwrap();
    let mut v = Vocab::new();
    for id in ["42", "Café", "a b", "42", "z"] {
        v.insert(id);
    }
    assert_eq!(v.len(), 5);
    let path = d.path().join("items.tsv");
    v.save(&path).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "1\t42\n2\tCafé\n3\ta b\n4\tz\n");
    let back = Vocab::load(&path).unwrap();
    assert_eq!(back, v);
    assert_eq!(back.get("z"), Some(4));
    assert_eq!(back.iter().collect::<Vec<_>>(), vec![(1, "42"), (2, "Café"), (3, "a b"), (4, "z")]);

    let mut bad = Vocab::new();
    bad.insert("tab\there");
    assert!(bad.save(&d.path().join("bad.tsv")).is_err());

    fs::write(&path, "1\ta\n3\tb\n").unwrap();
    let msg = Vocab::load(&path).unwrap_err().to_string();
    assert!(msg.contains("items.tsv:2:") && msg.contains("expected index 2"), "{msg}");
    fs::write(&path, "1\ta\n2\ta\n").unwrap();
    assert!(Vocab::load(&path).unwrap_err().to_string().contains("duplicate"));
    fs::write(&path, "1 a\n").unwrap();
    assert!(Vocab::load(&path).is_err());
}

#[test]
fn md5_verification() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f");
    fs::write(&p, b"hello").unwrap();
    verify_md5(&p, "5d41402abc4b2a76b9719d911017c592").unwrap();
    verify_md5(&p, "5D41402ABC4B2A76B9719D911017C592").unwrap();
    let err = verify_md5(&p, "00000000000000000000000000000000").unwrap_err();
    assert!(matches!(err, DataError::ChecksumMismatch { .. }));
    assert!(err.to_string().contains("5d41402abc4b2a76b9719d911017c592"));
}

fn make_zip(path: &std::path::Path, entries: &[(&str, &[u8])]) {
    let f = fs::File::create(path).unwrap();
    let mut w = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default();
    for (name, data) in entries {
        if name.ends_with('/') {
            w.add_directory(*name, opts).unwrap();
        } else {
            w.start_file(*name, opts).unwrap();
            w.write_all(data).unwrap();
        }
    }
    w.finish().unwrap();
}

#[test]
fn zip_extraction_and_slip_rejection() {
    let d = tempfile::tempdir().unwrap();
    let zp = d.path().join("ml.zip");
    make_zip(&zp, &[("ml-1m/", b""), ("ml-1m/ratings.dat", b"1::2::3::4\n"), ("ml-1m/sub/readme", b"hi")]);
    let out = d.path().join("out");
    extract_zip(&zp, &out).unwrap();
    assert_eq!(fs::read(out.join("ml-1m/ratings.dat")).unwrap(), b"1::2::3::4\n");
    assert_eq!(fs::read(out.join("ml-1m/sub/readme")).unwrap(), b"hi");
    let ds = needle_data::load_ml1m(&out.join("ml-1m"), &Default::default()).unwrap();
    assert_eq!(ds.events.len(), 1);

    for evil in ["../evil.txt", "ok/../../evil.txt", "/abs-evil.txt"] {
        let zp = d.path().join("evil.zip");
        make_zip(&zp, &[("fine.txt", b"x"), (evil, b"pwned")]);
        let target = d.path().join("t").join("inner");
        let err = extract_zip(&zp, &target).unwrap_err();
        assert!(matches!(err, DataError::Zip { .. }), "{evil}: {err:?}");
        assert!(!d.path().join("t/evil.txt").exists());
        assert!(!d.path().join("evil.txt").exists());
        // Validation happens before writing, so nothing at all is extracted.
        assert!(!target.join("fine.txt").exists());
    }

    fs::write(&zp, b"not a zip").unwrap();
    assert!(extract_zip(&zp, &out).is_err());
}

#[test]
fn unknown_download_name_lists_known() {
    let d = tempfile::tempdir().unwrap();
    let err = needle_data::download("ml-25m", d.path(), &mut |_, _| {}).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("ml-1m") && msg.contains("ml-100k"), "{msg}");
}
