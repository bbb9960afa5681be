//! The trained model behind one run, and the user/item vectors that evaluation and recall
//! search with.

use crate::prepare::{Prepared, Stage};
use needle_eval::{score, top_k, Lists, Report};
use needle_model::neighbors::{ItemNeighbors, Scratch};
use needle_model::tower::{Tower, UserBatch};
pub use needle_run::model::{merge_interests, Model};
use needle_run::with_tower;
use rayon::prelude::*;

/// Users whose vectors are computed in one pass.
const USER_CHUNK: usize = 2048;

/// What evaluation needs of a model: its vectors. The saved [`Model`] has them, and so does a
/// tower under training ([`InPlace`]), which is then scored without a copy of its tables.
pub trait Scorer {
    fn dim(&self) -> usize;
    fn interests(&self) -> usize;
    /// Vectors of every item row, row 0 included.
    fn item_vectors(&self) -> Vec<f32>;
    /// `[users.len() × interests × dim]` vectors from each user's known history for `stage`.
    fn user_vectors(&self, p: &Prepared, users: &[usize], stage: Stage) -> Vec<f32>;
    /// The neighbour lists of an item-to-item model, which is scored from them instead of vectors.
    fn neighbors(&self) -> Option<&ItemNeighbors> {
        None
    }
}

impl Scorer for Model {
    fn dim(&self) -> usize {
        Model::dim(self)
    }
    fn interests(&self) -> usize {
        Model::interests(self)
    }
    fn item_vectors(&self) -> Vec<f32> {
        Model::item_vectors(self)
    }
    fn user_vectors(&self, p: &Prepared, users: &[usize], stage: Stage) -> Vec<f32> {
        user_vectors(self, p, users, stage)
    }
    fn neighbors(&self) -> Option<&ItemNeighbors> {
        Model::neighbors(self)
    }
}

/// A tower scored where it is, e.g. the model under training at validation time.
pub struct InPlace<'a, T>(pub &'a T);

impl<T: Tower> Scorer for InPlace<'_, T> {
    fn dim(&self) -> usize {
        self.0.out_dim()
    }
    fn interests(&self) -> usize {
        self.0.interests()
    }
    fn item_vectors(&self) -> Vec<f32> {
        self.0.all_item_vectors()
    }
    fn user_vectors(&self, p: &Prepared, users: &[usize], stage: Stage) -> Vec<f32> {
        tower_user_vectors(self.0, p, users, stage)
    }
}

/// `[users.len() × interests × dim]` vectors from each user's known history for `stage`.
pub fn user_vectors(model: &Model, p: &Prepared, users: &[usize], stage: Stage) -> Vec<f32> {
    with_tower!(model, m => tower_user_vectors(m.as_ref(), p, users, stage), pop _c => vec![1.0; users.len()], nb _n => Vec::new())
}

fn tower_user_vectors<T: Tower>(m: &T, p: &Prepared, users: &[usize], stage: Stage) -> Vec<f32> {
    let w = m.out_dim() * m.interests();
    let mut out = Vec::with_capacity(users.len() * w);
    let (mut batch, mut acts) = (UserBatch::default(), T::UserActs::default());
    for chunk in users.chunks(USER_CHUNK.min(m.max_users_per_batch())) {
        fill_user_batch(m.max_seq_len(), m.n_user_features(), m.reads_event_times(), p, chunk, stage, &mut batch);
        m.user_infer(&batch, &mut acts);
        out.extend_from_slice(&m.user_out(&acts)[..chunk.len() * w]);
    }
    out
}

/// Fills `batch` with each user's known events for `stage` through the one user window
/// ([`UserBatch::set_user`]); event times only for a tower that reads them (`times`). Example
/// age is 0, as at serving time.
pub fn fill_user_batch(
    l: usize,
    nf: usize,
    times: bool,
    p: &Prepared,
    users: &[usize],
    stage: Stage,
    batch: &mut UserBatch,
) {
    batch.reset(users.len(), l, nf);
    for (b, &u) in users.iter().enumerate() {
        let mut events = p.events(u, stage);
        if !times {
            events.times = [&[], &[]];
        }
        batch.set_user(b, &events);
    }
}

/// Whose top-K a recall computes: known users (dataset positions) from their known history for
/// `stage`, `k` items each, their known items left out unless `keep_seen`.
#[derive(Clone, Copy, Debug)]
pub struct Query<'a> {
    pub users: &'a [usize],
    pub stage: Stage,
    pub k: usize,
    pub keep_seen: bool,
}

/// Exact top-K over the full corpus for the query's users, `[users × k]` item rows and scores.
/// With several interests per user, each interest searches and the lists merge by score.
pub fn recall(model: &Model, p: &Prepared, q: &Query<'_>) -> (Vec<u32>, Vec<f32>) {
    recall_against(model, &model.item_vectors(), p, q)
}

/// [`recall`] against item vectors computed once by the caller.
fn recall_against<S: Scorer + ?Sized>(model: &S, iv: &[f32], p: &Prepared, q: &Query<'_>) -> (Vec<u32>, Vec<f32>) {
    let &Query { users, stage, k, keep_seen } = q;
    if let Some(n) = model.neighbors() {
        return rank_neighbors(n, users.len(), k, |i, history, seen| {
            let u = users[i];
            history.extend(p.events(u, stage).known_items(usize::MAX));
            if !keep_seen {
                seen.extend(p.history(u, stage));
            }
        });
    }
    let uv = model.user_vectors(p, users, stage);
    let seen = (!keep_seen).then(|| {
        let mut l = Lists::new();
        for &u in users {
            l.push(p.history(u, stage));
        }
        l
    });
    rank_vectors(&uv, iv, model.dim(), model.interests(), k, seen.as_ref())
}

/// Exact top-`k` over the corpus `iv` for users whose vectors are `uv` (`interests` of them per
/// user, `[users × interests × dim]`), user `i` leaving out the items of `seen`'s list `i`; a
/// multi-interest user's lists merge by score.
pub fn rank_vectors(
    uv: &[f32],
    iv: &[f32],
    dim: usize,
    interests: usize,
    k: usize,
    seen: Option<&Lists>,
) -> (Vec<u32>, Vec<f32>) {
    if interests == 1 {
        return top_k(uv, iv, dim, k, seen);
    }
    // Every interest of a user searches with the user's list.
    let per_query = seen.map(|s| {
        let mut l = Lists::new();
        for i in 0..s.len() {
            for _ in 0..interests {
                l.push(s.get(i).iter().copied());
            }
        }
        l
    });
    let (ids, scores) = top_k(uv, iv, dim, k, per_query.as_ref());
    merge_interests(&ids, &scores, uv.len() / (dim * interests).max(1), interests, k)
}

/// The top `k` of an item-to-item model for `users` users, in parallel: `fill(i, history, seen)`
/// writes user `i`'s known items (oldest first) and the items to leave out (none: keep all).
pub fn rank_neighbors(
    n: &ItemNeighbors,
    users: usize,
    k: usize,
    fill: impl Fn(usize, &mut Vec<u32>, &mut Vec<u32>) + Sync,
) -> (Vec<u32>, Vec<f32>) {
    let mut ids = vec![u32::MAX; users * k];
    let mut scores = vec![f32::NEG_INFINITY; users * k];
    if k == 0 {
        return (ids, scores);
    }
    ids.par_chunks_mut(k).zip(scores.par_chunks_mut(k)).enumerate().for_each_init(
        || (Scratch::default(), Vec::new(), Vec::new(), Vec::new()),
        |(scratch, history, seen, out), (i, (ids, scores))| {
            history.clear();
            seen.clear();
            fill(i, history, seen);
            seen.sort_unstable();
            n.recall(history, k, &|r| seen.binary_search(&r).is_err(), scratch, out);
            for (j, &(r, s)) in out.iter().enumerate() {
                ids[j] = r;
                scores[j] = s;
            }
        },
    );
    (ids, scores)
}

/// Users per evaluation chunk: each user's list is independent of the others', so chunks only
/// bound memory and let progress be reported.
const EVAL_CHUNK: usize = 2048;

/// Above this many items, evaluation scores a sample of users unless told otherwise: one user
/// then costs a pass over the whole corpus, and 10,000 users give HR@10 to about ±0.01.
pub const SAMPLE_ABOVE_ITEMS: usize = 100_000;
/// The seed of the test-user sample unless told otherwise: the same for every run of a
/// dataset, whatever its training seed, so that runs compare on the same users.
pub const DEFAULT_EVAL_SEED: u64 = 42;
/// Users scored by default on catalogues above [`SAMPLE_ABOVE_ITEMS`].
pub const DEFAULT_EVAL_USERS: usize = 10_000;

/// The users `stage` is evaluated on: every user with a target, or a seeded sample of `n` of
/// them (`None`: all on small catalogues, [`DEFAULT_EVAL_USERS`] above [`SAMPLE_ABOVE_ITEMS`]
/// items; `Some(0)`: all). The same seed gives the same users, so runs compare on one sample.
pub fn eval_users(p: &Prepared, stage: Stage, n: Option<usize>, seed: u64) -> Vec<usize> {
    let targets = p.targets(stage);
    let mut users: Vec<usize> = (0..p.n_users()).filter(|&u| !targets.get(u).is_empty()).collect();
    let n = match n {
        Some(n) => n,
        None if p.n_item_rows() > SAMPLE_ABOVE_ITEMS + 1 => DEFAULT_EVAL_USERS,
        None => 0,
    };
    if n > 0 && n < users.len() {
        needle_model::rng::Rng::new(seed).fork(7).shuffle(&mut users);
        users.truncate(n);
        users.sort_unstable();
    }
    users
}

/// Evaluates `stage`'s targets for every user that has one (or the given subset); `progress`
/// gets `(users scored, users)` after each chunk.
pub fn evaluate<S: Scorer + ?Sized>(
    model: &S,
    p: &Prepared,
    stage: Stage,
    ks: &[usize],
    keep_seen: bool,
    subset: Option<&[usize]>,
    progress: &mut dyn FnMut(usize, usize),
) -> Report {
    let targets = p.targets(stage);
    let users: Vec<usize> = match subset {
        Some(s) => s.iter().copied().filter(|&u| !targets.get(u).is_empty()).collect(),
        None => (0..p.n_users()).filter(|&u| !targets.get(u).is_empty()).collect(),
    };
    let kmax = ks.iter().copied().max().unwrap_or(10);
    let iv = model.item_vectors();
    let mut ranked = Vec::with_capacity(users.len() * kmax);
    for chunk in users.chunks(EVAL_CHUNK) {
        let q = Query { users: chunk, stage, k: kmax, keep_seen };
        ranked.extend(recall_against(model, &iv, p, &q).0);
        progress(ranked.len() / kmax, users.len());
    }
    let mut t = Lists::new();
    for &u in &users {
        t.push(targets.get(u).iter().copied());
    }
    score(&ranked, kmax, &t, ks, p.items.len() - 1)
}
