//! The trained model behind one run, and the user/item vectors that evaluation and recall
//! search with.

use crate::prepare::{Prepared, Stage};
use needle_eval::{score, top_k, Lists, Report};
use needle_model::youtubednn::{UserActs, UserBatch, YoutubeDnn};

pub enum Model {
    /// Score = training count; expressed as a 1-d two-tower model (user vector `[1]`, item
    /// vector `[count]`) so it runs through exactly the same retrieval and metrics.
    Popularity {
        counts: Vec<f32>,
    },
    Youtubednn(Box<YoutubeDnn>),
}

/// Users whose vectors are computed in one pass.
const USER_CHUNK: usize = 2048;

impl Model {
    pub fn dim(&self) -> usize {
        match self {
            Model::Popularity { .. } => 1,
            Model::Youtubednn(m) => m.spec.out_dim(),
        }
    }

    /// `[item rows × dim]`, row 0 = padding.
    pub fn item_vectors(&self) -> Vec<f32> {
        match self {
            Model::Popularity { counts } => counts.clone(),
            Model::Youtubednn(m) => m.all_item_vectors(),
        }
    }

    /// `[users.len() × dim]` vectors from each user's known history for `stage`.
    pub fn user_vectors(&self, p: &Prepared, users: &[usize], stage: Stage) -> Vec<f32> {
        match self {
            Model::Popularity { .. } => vec![1.0; users.len()],
            Model::Youtubednn(m) => {
                let d = m.spec.out_dim();
                let mut out = Vec::with_capacity(users.len() * d);
                let (mut batch, mut acts) = (UserBatch::default(), UserActs::default());
                for chunk in users.chunks(USER_CHUNK) {
                    fill_user_batch(m, p, chunk, stage, &mut batch);
                    m.user_forward(&batch, &mut acts);
                    out.extend_from_slice(&acts.out[..chunk.len() * d]);
                }
                out
            }
        }
    }
}

/// Fills `batch` with the newest `max_seq_len` known items of each user and their features;
/// example age is 0, as at serving time.
pub fn fill_user_batch(
    m: &YoutubeDnn,
    p: &Prepared,
    users: &[usize],
    stage: Stage,
    batch: &mut UserBatch,
) {
    let l = m.spec.max_seq_len;
    let nf = m.spec.user_features.len();
    batch.reset(users.len(), l, nf);
    for (b, &u) in users.iter().enumerate() {
        let hist: Vec<u32> = p.history(u, stage).collect();
        let h = &hist[hist.len().saturating_sub(l)..];
        batch.hist[b * l..b * l + h.len()].copy_from_slice(h);
        batch.hist_len[b] = h.len() as u32;
        batch.feats[b * nf..(b + 1) * nf].copy_from_slice(&p.user_feats[u * nf..(u + 1) * nf]);
    }
}

/// Exact top-K over the full corpus for `users`, excluding their known items unless `keep_seen`.
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
    let exclude = (!keep_seen).then(|| {
        let mut l = Lists::new();
        for &u in users {
            l.push(p.history(u, stage));
        }
        l
    });
    top_k(&uv, &iv, model.dim(), k, exclude.as_ref())
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
        Some(s) => s
            .iter()
            .copied()
            .filter(|&u| !targets.get(u).is_empty())
            .collect(),
        None => (0..p.n_users())
            .filter(|&u| !targets.get(u).is_empty())
            .collect(),
    };
    let kmax = ks.iter().copied().max().unwrap_or(10);
    let (ranked, _) = recall(model, p, &users, stage, kmax, keep_seen);
    let mut t = Lists::new();
    for &u in &users {
        t.push(targets.get(u).iter().copied());
    }
    score(&ranked, kmax, &t, ks, p.items.len() - 1)
}
