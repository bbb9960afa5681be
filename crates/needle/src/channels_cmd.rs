//! `needle eval --channels FILE`: every channel of a channel file alone, and their mix, scored
//! on the test targets over the full corpus with the metrics of `needle eval`.

use anyhow::{bail, Context, Result};
use needle_eval::{Lists, Report};
use needle_run::channels::{mix, ChannelKind, ChannelsConfig, MixScratch, Mixed};
use needle_train::model::{recall as recall_top_k, Query};
use needle_train::run::{load_run, LoadedRun};
use needle_train::Stage;
use std::path::{Path, PathBuf};

/// One channel's candidates for every evaluated user: `[users × depth]` rows, `u32::MAX` padded.
struct Ranked {
    ids: Vec<u32>,
    scores: Vec<f32>,
}

/// `stage`: the test targets, or the validation targets (history = training events only), on
/// which quotas and merge rules are chosen.
pub fn eval_channels(
    path: &Path,
    data_dir: Option<&Path>,
    ks: &[usize],
    eval_users: Option<usize>,
    stage: Stage,
    metrics: Option<&Path>,
) -> Result<()> {
    if ks.is_empty() || ks.contains(&0) {
        bail!("--k needs positive cut-offs, e.g. --k 10,50,100");
    }
    let cfg = ChannelsConfig::read(path).map_err(anyhow::Error::msg)?;
    let kmax = *ks.iter().max().expect("checked non-empty");

    // Each run once, however many channels read it.
    let mut dirs: Vec<PathBuf> = Vec::new();
    for c in &cfg.channels {
        if let Some(r) = &c.run {
            if !dirs.contains(r) {
                dirs.push(r.clone());
            }
        }
    }
    let mut runs: Vec<LoadedRun> = Vec::with_capacity(dirs.len());
    for d in &dirs {
        let r = load_run(d, data_dir).with_context(|| format!("channel run {}", d.display()))?;
        if let Some(base) = runs.first() {
            same_data(base, &r)?;
        }
        runs.push(r);
    }
    let base = &runs[0];
    let p = &base.prepared;
    let users = crate::metrics::eval_users_of(p, eval_users);
    let targets = p.targets(stage);
    let users: Vec<usize> = users.into_iter().filter(|&u| !targets.get(u).is_empty()).collect();
    let mut t = Lists::new();
    for &u in &users {
        t.push(targets.get(u).iter().copied());
    }
    let n_items = p.items.len() - 1;

    let bar = needle_api::progress::count_bar(cfg.channels.len() as u64, "channels");
    let mut ranked: Vec<Ranked> = Vec::with_capacity(cfg.channels.len());
    for c in &cfg.channels {
        bar.set_message(c.name.clone());
        let run = |dir: &PathBuf| &runs[dirs.iter().position(|d| d == dir).expect("every run was loaded")];
        ranked.push(match c.kind {
            ChannelKind::Run => {
                let r = run(c.run.as_ref().expect("validated"));
                let (ids, scores) =
                    recall_top_k(&r.model, &r.prepared, &Query { users: &users, stage, k: kmax, keep_seen: false });
                Ranked { ids, scores }
            }
            ChannelKind::Similar => similar(run(c.run.as_ref().expect("validated")), &users, stage, c.recent, kmax)?,
            ChannelKind::Popularity => {
                // The base run's training counts, through the retrieval a popularity run uses.
                let counts =
                    needle_run::Model::Popularity { counts: p.item_counts.iter().map(|&c| c as f32).collect() };
                let (ids, scores) =
                    recall_top_k(&counts, p, &Query { users: &users, stage, k: kmax, keep_seen: false });
                Ranked { ids, scores }
            }
            ChannelKind::Newest => {
                // The base run's items ranked by first training event, through the same
                // retrieval: the score is the rank (exact, where Unix seconds in f32 are not).
                let rows = needle_run::channels::newest_rows(&p.item_first_seen(), &p.item_counts);
                let mut rank = vec![0f32; p.item_counts.len()];
                for (i, &r) in rows.iter().enumerate() {
                    rank[r as usize] = (rows.len() - i) as f32;
                }
                let (ids, scores) = recall_top_k(
                    &needle_run::Model::Popularity { counts: rank },
                    p,
                    &Query { users: &users, stage, k: kmax, keep_seen: false },
                );
                Ranked { ids, scores }
            }
        });
        bar.inc(1);
    }
    bar.finish_and_clear();

    let mut reports: Vec<(String, Report)> = cfg
        .channels
        .iter()
        .zip(&ranked)
        .map(|(c, r)| (c.name.clone(), needle_eval::score(&r.ids, kmax, &t, ks, n_items)))
        .collect();
    let mut mixed_ids = Vec::with_capacity(users.len() * kmax);
    let (mut scratch, mut out, mut lists) =
        (MixScratch::default(), Vec::<Mixed>::new(), vec![Vec::new(); ranked.len()]);
    for row in 0..users.len() {
        for (l, r) in lists.iter_mut().zip(&ranked) {
            l.clear();
            let span = row * kmax..(row + 1) * kmax;
            l.extend(
                r.ids[span.clone()]
                    .iter()
                    .zip(&r.scores[span])
                    .take_while(|(&i, _)| i != u32::MAX)
                    .map(|(&i, &s)| (i, s)),
            );
        }
        let refs: Vec<&[(u32, f32)]> = lists.iter().map(Vec::as_slice).collect();
        mix(&cfg, &refs, kmax, &mut scratch, &mut out);
        mixed_ids.extend(out.iter().map(|m| m.item));
        mixed_ids.resize((row + 1) * kmax, u32::MAX);
    }
    let rule = format!("{:?}", cfg.merge).to_lowercase();
    reports.push((format!("mix ({rule})"), needle_eval::score(&mixed_ids, kmax, &t, ks, n_items)));

    let stage_name = if stage == Stage::Test { "test" } else { "validation" };
    println!(
        "{}: {} channels, {}, full corpus, known items excluded, {} users, {} items",
        path.display(),
        cfg.channels.len(),
        stage_name,
        users.len(),
        n_items
    );
    print!("{}", channel_table(&reports, ks));
    if let Some(out) = metrics {
        let rows: Vec<serde_json::Value> = reports
            .iter()
            .map(|(name, r)| serde_json::json!({"channel": name, "metrics": crate::metrics::metrics_json(r)}))
            .collect();
        let doc = serde_json::json!({
            "channels": path.display().to_string(),
            "stage": stage_name,
            "rows": rows,
        });
        crate::metrics::write_replacing(out, &(serde_json::to_string_pretty(&doc)? + "\n"))?;
    }
    Ok(())
}

/// Channels of one mix must rank the same users' same targets among the same items.
fn same_data(base: &LoadedRun, other: &LoadedRun) -> Result<()> {
    let (a, b) = (&base.prepared, &other.prepared);
    let why = if base.info.data_fingerprint != other.info.data_fingerprint {
        Some("was trained on other data")
    } else if a.items.len() != b.items.len() || a.items.iter().zip(b.items.iter()).any(|(x, y)| x != y) {
        Some("has another item vocabulary")
    } else if a.user_raw != b.user_raw {
        Some("has other users")
    } else if (0..a.n_users()).any(|u| a.targets(Stage::Test).get(u) != b.targets(Stage::Test).get(u)) {
        Some("holds other test targets (another split)")
    } else {
        None
    };
    match why {
        Some(w) => bail!(
            "{} {w} than {}; the channels of one mix must share their data",
            other.dir.display(),
            base.dir.display()
        ),
        None => Ok(()),
    }
}

/// Items nearest the user's newest `recent` items in the run's item-vector space, each scored
/// by its best match; seen items left out.
fn similar(r: &LoadedRun, users: &[usize], stage: Stage, recent: usize, k: usize) -> Result<Ranked> {
    let d = r.model.dim();
    if d == 0 {
        bail!("{}: a `similar` channel needs a run with item vectors, not an item-to-item model", r.dir.display());
    }
    let iv = r.model.item_vectors();
    let p = &r.prepared;
    let (mut queries, mut exclude) = (Vec::with_capacity(users.len() * recent * d), Lists::new());
    let mut empty = Vec::new();
    for (row, &u) in users.iter().enumerate() {
        // Items the model knows, as a server sees the same history (the user window's rule).
        let hist: Vec<u32> = p.events(u, stage).known_items(usize::MAX).collect();
        if hist.is_empty() {
            empty.push(row);
        }
        // Users with fewer items repeat their oldest; the merge drops the duplicates.
        for j in 0..recent {
            let item = if hist.is_empty() { 0 } else { hist[hist.len() - 1 - j.min(hist.len() - 1)] as usize };
            queries.extend_from_slice(&iv[item * d..(item + 1) * d]);
            exclude.push(hist.iter().copied());
        }
    }
    let (ids, scores) = needle_eval::top_k(&queries, &iv, d, k, Some(&exclude));
    let (mut ids, scores) = needle_run::merge_interests(&ids, &scores, users.len(), recent, k);
    for row in empty {
        ids[row * k..(row + 1) * k].fill(u32::MAX);
    }
    Ok(Ranked { ids, scores })
}

/// `name | HR@k… | NDCG@k…`, one row per report, as a Markdown table.
fn channel_table(reports: &[(String, Report)], ks: &[usize]) -> String {
    let mut s = String::from("| channel |");
    let mut rule = String::from("|---|");
    for m in ["HR", "NDCG"] {
        for k in ks {
            s += &format!(" {m}@{k} |");
            rule += "---|";
        }
    }
    s += "\n";
    s += &rule;
    s += "\n";
    for (name, r) in reports {
        s += &format!("| {name} |");
        for pick in [|a: &needle_eval::AtK| a.hit_rate, |a: &needle_eval::AtK| a.ndcg] {
            for &k in ks {
                s += &format!(" {:.4} |", r.get(k).map_or(f64::NAN, pick));
            }
        }
        s += "\n";
    }
    s
}
