//! From a loaded dataset and its time-ordered split to what the towers consume: vocabularies
//! built from training events only (so nothing about later events leaks into the model),
//! histories as item rows, targets, feature rows and popularity counts.

use crate::config::Config;
use crate::TrainError;
use needle_data::{Dataset, Split, Vocab};
use needle_eval::Lists;
use needle_model::deep::ItemBags;
use needle_model::embedding::RowHash;
use needle_model::tower::UserEvents;

pub use needle_run::USER_ID_FEATURE;

/// Model-ready view of one dataset split; all per-user arrays are indexed by dataset user key.
pub struct Prepared {
    pub items: Vocab,
    pub users: Vocab,
    pub user_feature_names: Vec<String>,
    pub user_feature_vocabs: Vec<Vocab>,
    /// `[dataset users × features]` value rows (0 = unknown).
    pub user_feats: Vec<u32>,
    /// Pooled item features: name and value vocabulary, and item row → value rows.
    pub item_features: Vec<(String, Vocab)>,
    pub item_bags: Vec<ItemBags>,
    /// Training histories (item rows, time order) and their timestamps.
    pub train: Lists,
    pub train_ts: Vec<i64>,
    /// Validation and test targets as item rows (0 when the item never occurs in training).
    pub valid: Lists,
    /// The validation targets' timestamps (a test history ends with the validation target).
    pub valid_ts: Vec<i64>,
    pub test: Lists,
    /// Training events per item row; zero for the last `cold_rows` rows.
    pub item_counts: Vec<u64>,
    /// Rows at the end of the item table for items with no training event, embedded from
    /// their features alone (their id rows stay zero).
    pub cold_rows: usize,
    /// Items of the dataset with no training event and no row: the model reads no item
    /// features (or none of theirs is known), so they cannot be recalled.
    pub unembedded_items: usize,
    /// How item rows map onto the id tables when the tail is hashed (`[model] hash_buckets`).
    pub item_hash: Option<RowHash>,
    pub train_min_ts: i64,
    pub train_max_ts: i64,
    /// Raw user ids, by dataset user key.
    pub user_raw: Vec<String>,
}

impl Prepared {
    pub fn n_users(&self) -> usize {
        self.user_raw.len()
    }

    /// Item table rows, padding row included.
    pub fn n_item_rows(&self) -> usize {
        self.item_counts.len()
    }

    /// Each item row's first training event, Unix seconds (0 for rows without one).
    pub fn item_first_seen(&self) -> Vec<i64> {
        let mut first = vec![i64::MAX; self.n_item_rows()];
        for (&row, &t) in self.train.items.iter().zip(&self.train_ts) {
            let f = &mut first[row as usize];
            *f = (*f).min(t);
        }
        first.iter_mut().filter(|f| **f == i64::MAX).for_each(|f| *f = 0);
        first
    }

    /// Item rows `0..warm_rows()` have training events (or are padding); the rest are cold.
    pub fn warm_rows(&self) -> usize {
        self.item_counts.len() - self.cold_rows
    }

    /// The user's known history when predicting `stage`'s target: the training events, plus
    /// the validation target when predicting the test target.
    pub fn history(&self, user: usize, stage: Stage) -> impl Iterator<Item = u32> + '_ {
        let extra: &[u32] = if stage == Stage::Test { self.valid.get(user) } else { &[] };
        self.train.get(user).iter().chain(extra).copied()
    }

    /// The user's known events for `stage` ([`Prepared::history`] with times and features) as
    /// the user window reads them.
    pub fn events(&self, user: usize, stage: Stage) -> UserEvents<'_> {
        let (train, valid) = (&self.train, &self.valid);
        let train_ts = &self.train_ts[train.offsets[user] as usize..train.offsets[user + 1] as usize];
        let (extra, extra_ts): (&[u32], &[i64]) = if stage == Stage::Test {
            (valid.get(user), &self.valid_ts[valid.offsets[user] as usize..valid.offsets[user + 1] as usize])
        } else {
            (&[], &[])
        };
        let nf = self.user_feature_names.len();
        UserEvents {
            items: [train.get(user), extra],
            times: [train_ts, extra_ts],
            features: &self.user_feats[user * nf..(user + 1) * nf],
        }
    }

    pub fn targets(&self, stage: Stage) -> &Lists {
        match stage {
            Stage::Valid => &self.valid,
            Stage::Test => &self.test,
        }
    }
}

/// Which held-out events a prediction is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Valid,
    Test,
}

/// Training events per dataset item key.
fn train_counts(ds: &Dataset, split: &Split) -> Vec<u64> {
    let mut counts = vec![0u64; ds.item_ids.len()];
    for &k in &split.train.items {
        counts[k as usize] += 1;
    }
    counts
}

/// With `max_items > 0`, which dataset item keys stay in the item table: the `max_items` with
/// the most training events (ties: the earlier key). `None` keeps every item.
fn kept_items(counts: &[u64], max_items: usize) -> Option<Vec<bool>> {
    if max_items == 0 || max_items >= counts.len() {
        return None;
    }
    let mut order: Vec<u32> = (0..counts.len() as u32).filter(|&k| counts[k as usize] > 0).collect();
    order.sort_unstable_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
    let mut kept = vec![false; counts.len()];
    for &k in order.iter().take(max_items) {
        kept[k as usize] = true;
    }
    Some(kept)
}

pub fn prepare(ds: &Dataset, split: &Split, cfg: &Config) -> Result<Prepared, TrainError> {
    let model = &cfg.model;
    let n_users = ds.user_ids.len();
    let mut items = Vocab::new();
    let mut key_to_row = vec![0u32; ds.item_ids.len()];
    let mut train = Lists::new();
    let mut train_ts = Vec::with_capacity(split.train.total());
    let (mut min_ts, mut max_ts) = (i64::MAX, i64::MIN);
    let key_counts = train_counts(ds, split);
    let kept = kept_items(&key_counts, model.max_items);
    // Hashing the tail: the kept items take rows 1..own first, so that the rest, which share
    // `hash_buckets` table rows, stay in the histories as rows from `own` on.
    let hashing = model.hash_buckets > 0 && kept.is_some();
    if let (true, Some(kept)) = (hashing, &kept) {
        for &k in split.train.items.iter().filter(|&&k| kept[k as usize]) {
            if key_to_row[k as usize] == 0 {
                key_to_row[k as usize] = items.insert(&ds.item_ids[k as usize]);
            }
        }
    }
    let own_rows = items.len();
    let keep = |k: u32| hashing || kept.as_ref().is_none_or(|kept| kept[k as usize]);
    for u in 0..n_users {
        let (keys, times) = (split.train.items_of(u), split.train.ts_of(u));
        for &k in keys.iter().filter(|&&k| keep(k)) {
            if key_to_row[k as usize] == 0 {
                key_to_row[k as usize] = items.insert(&ds.item_ids[k as usize]);
            }
        }
        // Items past the cut-off leave the histories; as targets they map to row 0 (unrecallable).
        train.push(keys.iter().filter(|&&k| keep(k)).map(|&k| key_to_row[k as usize]));
        for (_, &t) in keys.iter().zip(times).filter(|(&k, _)| keep(k)) {
            min_ts = min_ts.min(t);
            max_ts = max_ts.max(t);
            train_ts.push(t);
        }
    }
    if items.len() <= 1 {
        return Err(TrainError::Data("the training split holds no events".into()));
    }
    let mut users = Vocab::new();
    for u in 0..n_users {
        if !train.get(u).is_empty() {
            users.insert(&ds.user_ids[u]);
        }
    }
    let feature_names = model.read_user_features();
    let nf = feature_names.len();
    let mut user_feature_vocabs = Vec::with_capacity(nf);
    let mut user_feats = vec![0u32; n_users * nf];
    for (f, name) in feature_names.iter().enumerate() {
        if name == USER_ID_FEATURE {
            for u in 0..n_users {
                user_feats[u * nf + f] = users.get(&ds.user_ids[u]).unwrap_or(0);
            }
            user_feature_vocabs.push(users.clone());
            continue;
        }
        let feat = ds.user_feature(name).ok_or_else(|| {
            let mut known: Vec<String> = ds.user_features.iter().map(|f| format!("`{}`", f.name)).collect();
            known.push(format!("`{USER_ID_FEATURE}`"));
            TrainError::Config(format!(
                "user feature `{name}` is not in dataset {} (it has: {}); set [model] user_features",
                ds.name,
                known.join(", ")
            ))
        })?;
        // Multi-valued user features contribute their first value.
        let first = |u: usize| feat.of(u).first().and_then(|&k| feat.values.get(k as usize));
        let mut vocab = Vocab::new();
        for u in (0..n_users).filter(|&u| !train.get(u).is_empty()) {
            if let Some(raw) = first(u) {
                vocab.insert(raw);
            }
        }
        for u in 0..n_users {
            user_feats[u * nf + f] = first(u).and_then(|raw| vocab.get(raw)).unwrap_or(0);
        }
        user_feature_vocabs.push(vocab);
    }

    let item_feature_names: &[String] = if model.kind.is_counted() { &[] } else { &model.item_features };
    let feats = item_feature_names
        .iter()
        .map(|name| {
            ds.item_feature(name).ok_or_else(|| {
                let known: Vec<String> = ds.item_features.iter().map(|f| format!("`{}`", f.name)).collect();
                let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
                TrainError::Config(format!(
                    "item feature `{name}` is not in dataset {} (it has: {known}); set [model] item_features",
                    ds.name,
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Feature values get rows from the items that have training events only: a value seen only
    // on items nobody has interacted with would have an embedding that never trains.
    let mut value_vocabs: Vec<Vocab> = feats.iter().map(|_| Vocab::new()).collect();
    let mut row_keys: Vec<Vec<Vec<u32>>> = feats.iter().map(|_| vec![Vec::new(); items.len()]).collect();
    for (f, feat) in feats.iter().enumerate() {
        for (key, &row) in key_to_row.iter().enumerate() {
            if row == 0 {
                continue;
            }
            for &vk in feat.of(key) {
                if let Some(raw) = feat.values.get(vk as usize) {
                    row_keys[f][row as usize].push(value_vocabs[f].insert(raw));
                }
            }
        }
    }
    // Items without a training event (catalogue-only, or first seen in a held-out event) get
    // rows after the trained ones when their features are known, so the item tower can embed them.
    let warm_rows = items.len();
    let mut unembedded_items = 0usize;
    let embed_cold = model.cold_items.unwrap_or(cfg.train.item_id_dropout > 0.0) && !feats.is_empty();
    for key in (0..ds.item_ids.len()).filter(|&k| key_counts[k] == 0) {
        let bag = |f: usize| {
            let feat = feats[f];
            let vocab = &value_vocabs[f];
            feat.of(key).iter().filter_map(move |&vk| feat.values.get(vk as usize).and_then(|raw| vocab.get(raw)))
        };
        if !embed_cold || (0..feats.len()).all(|f| bag(f).next().is_none()) {
            unembedded_items += 1;
            continue;
        }
        key_to_row[key] = items.insert(&ds.item_ids[key]);
        for (f, rows) in row_keys.iter_mut().enumerate() {
            rows.push(bag(f).collect());
        }
    }
    let cold_rows = items.len() - warm_rows;
    let item_hash = hashing.then_some(RowHash {
        own: own_rows as u32,
        buckets: model.hash_buckets as u32,
        first_cold: warm_rows as u32,
    });
    if items.len() as u64 >= u64::from(needle_model::tower::ID_DROPPED) {
        return Err(TrainError::Data(format!("{} item rows: at most 2^31 - 1 fit an item table", items.len())));
    }
    let mut item_features = Vec::new();
    let mut item_bags = Vec::new();
    for ((name, vocab), rows) in item_feature_names.iter().zip(value_vocabs).zip(row_keys) {
        let mut bags = ItemBags { offsets: vec![0], keys: Vec::new() };
        for k in rows {
            bags.keys.extend(k);
            bags.offsets.push(bags.keys.len() as u32);
        }
        item_features.push((name.clone(), vocab));
        item_bags.push(bags);
    }
    let map_targets = |seqs: &needle_data::split::Sequences| {
        let mut l = Lists::new();
        for u in 0..n_users {
            l.push(seqs.items_of(u).iter().map(|&k| key_to_row[k as usize]));
        }
        l
    };
    let valid = map_targets(&split.valid);
    let valid_ts = (0..n_users).flat_map(|u| split.valid.ts_of(u).iter().copied()).collect();
    let test = map_targets(&split.test);
    let mut item_counts = vec![0u64; items.len()];
    for &r in &train.items {
        item_counts[r as usize] += 1;
    }

    Ok(Prepared {
        items,
        users,
        user_feature_names: feature_names.to_vec(),
        user_feature_vocabs,
        user_feats,
        item_features,
        item_bags,
        train,
        train_ts,
        valid,
        valid_ts,
        test,
        item_counts,
        cold_rows,
        unembedded_items,
        item_hash,
        train_min_ts: if min_ts == i64::MAX { 0 } else { min_ts },
        train_max_ts: if max_ts == i64::MIN { 0 } else { max_ts },
        user_raw: ds.user_ids.clone(),
    })
}
