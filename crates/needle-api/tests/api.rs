//! The library API end to end on a small generated log: load, train, reopen, evaluate, recall
//! for users and for explicit histories, vectors, export, and stopping through the observer.

use needle_api::{parse_config, train, Data, EvalOptions, Observer, Run, Silent, Stage};
use std::path::Path;

/// Users walk through their group's items in order: a learnable next-item structure.
fn write_log(dir: &Path) {
    let mut csv = String::from("user,item,ts\n");
    for u in 0..120 {
        let g = u % 4;
        for t in 0..12 {
            csv.push_str(&format!("u{u},g{g}_{},{}\n", (u + t) % 15, 1000 + u * 100 + t));
        }
    }
    std::fs::write(dir.join("log.csv"), csv).unwrap();
    std::fs::write(
        dir.join("schema.toml"),
        "name = \"walk\"\n[interactions]\npath = \"log.csv\"\nheader = true\nuser = \"user\"\nitem = \"item\"\ntimestamp = \"ts\"\n",
    )
    .unwrap();
}

fn config(dir: &Path, epochs: usize) -> needle_api::Config {
    let text = format!(
        "[data]\nschema = \"{}\"\n[model]\nkind = \"sequential\"\ndim = 16\nmax_seq_len = 8\nblocks = 1\nheads = 1\nffn = 16\nuser_features = []\n[train]\nepochs = {epochs}\nbatch_size = 16\nlr = 0.005\nembedding_lr = 0.01\ntemperature = 0.1\npatience = 0\nseed = 3\nthreads = 1\n",
        dir.join("schema.toml").display()
    );
    parse_config(&text, "test").unwrap()
}

#[test]
fn train_reopen_evaluate_recall_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_log(dir);
    let cfg = config(dir, 3);
    let data = Data::load(&cfg, None, &mut |_, _| {}).unwrap();
    assert!(data.notes[0].contains("1440 events, 120 users"), "{:?}", data.notes);
    let out = dir.join("run");
    let trained = train(&cfg, &data, &out, needle_api::DEFAULT_EVAL_SEED, &mut Silent).unwrap();
    assert_eq!(trained.epochs.len(), 3);
    assert!(!trained.stopped);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["hit_rate@10"].as_f64().unwrap(), trained.test.get(10).unwrap().hit_rate);
    assert!(trained.test.get(10).unwrap().hit_rate > 0.3, "the walk is learnable: {:?}", trained.test.get(10));

    let run = Run::open(&out, None).unwrap();
    let again = run.evaluate(Stage::Test, &[10, 50, 100], &EvalOptions::default(), &mut Silent).unwrap();
    assert_eq!(again.get(10).unwrap().hit_rate, trained.test.get(10).unwrap().hit_rate, "reopened run scores the same");

    // A known user's recall equals the recall of their known history sent explicitly (this
    // model reads no user features).
    let top = run.recall_users(&["u7"], 5, false).unwrap();
    let u = run.users(&["u7"]).unwrap()[0];
    let p = run.prepared();
    let history: Vec<String> = p.history(u, Stage::Test).map(|r| p.items.raw(r).unwrap().to_owned()).collect();
    let by_history = run.recall_histories(&[history.iter().map(String::as_str).collect()], 5, false).unwrap();
    assert_eq!(top.items(0), by_history.items(0));
    assert_eq!(top.items(0).len(), 5);
    assert!(top.items(0).iter().all(|(id, _)| !history.iter().any(|h| h == id)), "seen items are left out");
    let err = run.recall_users(&["nobody"], 5, false).err().unwrap().to_string();
    assert!(err.contains("unknown user id `nobody`"), "{err}");
    assert!(run.recall(&[u], 0, false).is_err(), "k = 0 is refused");

    // Vectors: the user's vector scores the recalled items with their reported scores.
    let iv = run.item_vectors().unwrap();
    let uv = run.user_vectors(&[u]).unwrap();
    assert_eq!((iv.dim, uv.dim, uv.per_id), (16, 16, 1));
    for (id, score) in top.items(0) {
        let i = iv.ids.iter().position(|x| x == id).unwrap();
        let dot: f32 = needle_core::dot::dot(&uv.data, &iv.data[i * 16..(i + 1) * 16]);
        assert_eq!(dot, score, "{id}");
    }

    // The manifest names its tower in one table; a manifest of the layout before it (one
    // top-level table per family) still loads.
    let manifest = std::fs::read_to_string(out.join("model.toml")).unwrap();
    assert!(manifest.contains("[tower.seq]"), "{manifest}");
    std::fs::write(out.join("model.toml"), manifest.replace("[tower.seq", "[seq")).unwrap();
    let old = Run::open(&out, None).unwrap();
    assert_eq!(old.recall_users(&["u7"], 5, false).unwrap().items(0), top.items(0));
    std::fs::write(out.join("model.toml"), manifest.replace("kind = \"sequential\"", "kind = \"fm\"")).unwrap();
    let err = Run::open(&out, None).err().unwrap().to_string();
    assert!(err.contains("cannot hold a seq tower"), "{err}");
    std::fs::write(out.join("model.toml"), &manifest).unwrap();

    let e = run.export(&dir.join("export")).unwrap();
    assert_eq!((e.items, e.users, e.dim), (iv.ids.len(), 120, 16));
    let npy = std::fs::read(dir.join("export/item_embeddings.npy")).unwrap();
    let values = &npy[npy.len() - iv.data.len() * 4..];
    let exported: Vec<f32> = values.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(exported, iv.data, "export writes the item vectors bit for bit");
}

/// Stops after `after` progress reports of the second epoch.
struct StopIn2nd {
    epochs: usize,
    reports: usize,
}

impl Observer for StopIn2nd {
    fn progress(&mut self, _done: u64, _status: &str) {
        if self.epochs == 1 {
            self.reports += 1;
        }
    }
    fn epoch(&mut self, _rec: &needle_api::EpochLog) {
        self.epochs += 1;
    }
    fn should_stop(&self) -> bool {
        self.reports >= 3
    }
}

#[test]
fn an_observer_stops_training_and_the_best_epoch_is_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_log(dir);
    let cfg = config(dir, 20);
    let data = Data::load(&cfg, None, &mut |_, _| {}).unwrap();
    let out = dir.join("run");
    let trained = train(&cfg, &data, &out, 42, &mut StopIn2nd { epochs: 0, reports: 0 }).unwrap();
    assert!(trained.stopped);
    assert_eq!((trained.info.training.epochs_run, trained.info.training.best_epoch), (1, 1));
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 1, "the interrupted epoch leaves no record");
    // The saved run is whole and usable.
    let run = Run::open(&out, None).unwrap();
    assert_eq!(run.info().training.best_epoch, 1);
    // Stopped before any epoch ended: an error, and no run.
    let out2 = dir.join("run2");
    let err = train(&cfg, &data, &out2, 42, &mut StopNow).err().unwrap().to_string();
    assert!(err.contains("stopped before its first epoch ended"), "{err}");
    assert!(!out2.join("model.toml").exists());
}

struct StopNow;

impl Observer for StopNow {
    fn should_stop(&self) -> bool {
        true
    }
}
