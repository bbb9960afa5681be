//! The trained model behind one run, and the user/item vectors that evaluation and recall
//! search with.

use crate::prepare::{Prepared, Stage};
use needle_eval::{score, top_k, Lists, Report};
use needle_model::deep::DeepTwoTower;
use needle_model::fm::FmTwoTower;
use needle_model::mind::MindTwoTower;
use needle_model::tower::{Tower, UserBatch};

pub enum Model {
    /// Score = training count; expressed as a 1-d two-tower model (user vector `[1]`, item
    /// vector `[count]`) so it runs through exactly the same retrieval and metrics.
    Popularity {
        counts: Vec<f32>,
    },
    /// YouTubeDNN and DSSM.
    Deep(Box<DeepTwoTower>),
    Fm(Box<FmTwoTower>),
    Mind(Box<MindTwoTower>),
}

/// Users whose vectors are computed in one pass.
const USER_CHUNK: usize = 2048;

/// Calls `$body` with `$m` bound to the concrete tower of a neural model.
macro_rules! with_tower {
    ($model:expr, $m:ident => $body:expr, pop $counts:ident => $pop:expr) => {
        match $model {
            Model::Popularity { counts: $counts } => $pop,
            Model::Deep($m) => $body,
            Model::Fm($m) => $body,
            Model::Mind($m) => $body,
        }
    };
}

impl Model {
    pub fn dim(&self) -> usize {
        with_tower!(self, m => m.out_dim(), pop _c => 1)
    }

    /// Item table rows, padding row 0 included.
    pub fn item_rows(&self) -> usize {
        with_tower!(self, m => m.item_rows(), pop counts => counts.len())
    }

    /// Vectors per user (several for multi-interest models).
    pub fn interests(&self) -> usize {
        with_tower!(self, m => m.interests(), pop _c => 1)
    }

    /// `[item rows × dim]`, row 0 = padding.
    pub fn item_vectors(&self) -> Vec<f32> {
        with_tower!(self, m => m.all_item_vectors(), pop counts => counts.clone())
    }

    /// The rows and vectors of the real items (row 0, the padding, left out): what an item index
    /// holds.
    pub fn indexed_items(&self) -> (Vec<u32>, Vec<f32>) {
        let d = self.dim();
        let all = self.item_vectors();
        ((1..(all.len() / d) as u32).collect(), all[d..].to_vec())
    }

    /// The `interests × dim` vectors of one user given feature value rows (in the model's user
    /// feature order; 0 = unknown) and item rows, oldest first; only the newest `max_seq_len` count.
    pub fn user_vector(&self, features: &[u32], history: &[u32]) -> Vec<f32> {
        with_tower!(self, m => one_user_vector(m.as_ref(), features, history), pop _c => vec![1.0])
    }

    /// `[users.len() × interests × dim]` vectors from each user's known history for `stage`.
    pub fn user_vectors(&self, p: &Prepared, users: &[usize], stage: Stage) -> Vec<f32> {
        with_tower!(self, m => tower_user_vectors(m.as_ref(), p, users, stage), pop _c => vec![1.0; users.len()])
    }
}

fn tower_user_vectors<T: Tower>(m: &T, p: &Prepared, users: &[usize], stage: Stage) -> Vec<f32> {
    let w = m.out_dim() * m.interests();
    let mut out = Vec::with_capacity(users.len() * w);
    let (mut batch, mut acts) = (UserBatch::default(), T::UserActs::default());
    for chunk in users.chunks(USER_CHUNK) {
        fill_user_batch(m.max_seq_len(), m.n_user_features(), p, chunk, stage, &mut batch);
        m.user_forward(&batch, &mut acts);
        out.extend_from_slice(&m.user_out(&acts)[..chunk.len() * w]);
    }
    out
}

fn one_user_vector<T: Tower>(m: &T, features: &[u32], history: &[u32]) -> Vec<f32> {
    let (l, nf) = (m.max_seq_len(), m.n_user_features());
    let mut batch = UserBatch::default();
    batch.reset(1, l, nf);
    let recent = &history[history.len().saturating_sub(l)..];
    batch.hist[..recent.len()].copy_from_slice(recent);
    batch.hist_len[0] = recent.len() as u32;
    let n = nf.min(features.len());
    batch.feats[..n].copy_from_slice(&features[..n]);
    let mut acts = T::UserActs::default();
    m.user_forward(&batch, &mut acts);
    m.user_out(&acts)[..m.interests() * m.out_dim()].to_vec()
}

/// Fills `batch` with the newest `max_seq_len` known items of each user and their features;
/// example age is 0, as at serving time.
pub fn fill_user_batch(l: usize, nf: usize, p: &Prepared, users: &[usize], stage: Stage, batch: &mut UserBatch) {
    batch.reset(users.len(), l, nf);
    for (b, &u) in users.iter().enumerate() {
        let known = p.train.get(u).len() + if stage == Stage::Test { p.valid.get(u).len() } else { 0 };
        let skip = known.saturating_sub(l);
        let mut n = 0;
        for (slot, item) in batch.hist[b * l..(b + 1) * l].iter_mut().zip(p.history(u, stage).skip(skip)) {
            *slot = item;
            n += 1;
        }
        batch.hist_len[b] = n as u32;
        batch.feats[b * nf..(b + 1) * nf].copy_from_slice(&p.user_feats[u * nf..(u + 1) * nf]);
    }
}

/// Exact top-K over the full corpus for `users`, excluding their known items unless `keep_seen`.
/// With several interests per user, each interest searches and the lists merge by score.
pub fn recall(
    model: &Model,
    p: &Prepared,
    users: &[usize],
    stage: Stage,
    k: usize,
    keep_seen: bool,
) -> (Vec<u32>, Vec<f32>) {
    let uv = model.user_vectors(p, users, stage);
    let iv = model.item_vectors();
    let ni = model.interests();
    let exclude = (!keep_seen).then(|| {
        let mut l = Lists::new();
        for &u in users {
            for _ in 0..ni {
                l.push(p.history(u, stage));
            }
        }
        l
    });
    let (ids, scores) = top_k(&uv, &iv, model.dim(), k, exclude.as_ref());
    if ni == 1 {
        return (ids, scores);
    }
    merge_interests(&ids, &scores, users.len(), ni, k)
}

/// Merges `ni` ranked lists per user (each `k` long) into one by best score, without duplicates.
pub fn merge_interests(ids: &[u32], scores: &[f32], users: usize, ni: usize, k: usize) -> (Vec<u32>, Vec<f32>) {
    let mut out_ids = vec![u32::MAX; users * k];
    let mut out_scores = vec![f32::NEG_INFINITY; users * k];
    let mut cand: Vec<(f32, u32)> = Vec::with_capacity(ni * k);
    for u in 0..users {
        cand.clear();
        let span = u * ni * k..(u + 1) * ni * k;
        cand.extend(scores[span.clone()].iter().zip(&ids[span]).filter(|(_, &i)| i != u32::MAX).map(|(&s, &i)| (s, i)));
        cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut n = 0;
        for &(s, i) in &cand {
            if n == k {
                break;
            }
            if out_ids[u * k..u * k + n].contains(&i) {
                continue;
            }
            out_ids[u * k + n] = i;
            out_scores[u * k + n] = s;
            n += 1;
        }
    }
    (out_ids, out_scores)
}

/// Evaluates `stage`'s targets for every user that has one (or the given subset).
pub fn evaluate(
    model: &Model,
    p: &Prepared,
    stage: Stage,
    ks: &[usize],
    keep_seen: bool,
    subset: Option<&[usize]>,
) -> Report {
    let targets = p.targets(stage);
    let users: Vec<usize> = match subset {
        Some(s) => s.iter().copied().filter(|&u| !targets.get(u).is_empty()).collect(),
        None => (0..p.n_users()).filter(|&u| !targets.get(u).is_empty()).collect(),
    };
    let kmax = ks.iter().copied().max().unwrap_or(10);
    let (ranked, _) = recall(model, p, &users, stage, kmax, keep_seen);
    let mut t = Lists::new();
    for &u in &users {
        t.push(targets.get(u).iter().copied());
    }
    score(&ranked, kmax, &t, ks, p.items.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_interests_keep_the_best_score_of_each_item_once() {
        // One user, two interests, k = 3.
        let ids = [5, 7, 9, 7, 2, 5];
        let scores = [0.9, 0.5, 0.1, 0.8, 0.6, 0.3];
        let (i, s) = merge_interests(&ids, &scores, 1, 2, 3);
        assert_eq!(i, vec![5, 7, 2]);
        assert_eq!(s, vec![0.9, 0.8, 0.6]);
    }
}
