//! The trained model behind one run, and the user/item vectors that evaluation, recall and
//! serving search with.

use crate::config::ModelKind;
use crate::{io, RunError, RunInfo};
use needle_model::checkpoint::{save, save_neighbors, Checkpoint};
use needle_model::deep::{CategoricalSpec, DeepSpec, DeepTwoTower, ItemBags};
use needle_model::fm::{FmSpec, FmTwoTower};
use needle_model::mind::{MindSpec, MindTwoTower};
use needle_model::neighbors::{ItemNeighbors, NeighborSpec};
use needle_model::seq::{SeqSpec, SeqTwoTower};
use needle_model::tower::{Tower, UserBatch, UserEvents};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
    Seq(Box<SeqTwoTower>),
    /// Transitions and item-CF: neighbour lists per item, no vectors. The vector methods below
    /// see a model of width 0; callers that need vectors ask [`Model::neighbors`] first.
    Neighbors(Box<ItemNeighbors>),
}

/// Calls `$body` with `$m` bound to the concrete tower of a neural model, `$pop` with the
/// counts of a popularity model, or `$nb` for a neighbour model; callers outside this crate get
/// generic code per tower type.
#[macro_export]
macro_rules! with_tower {
    ($model:expr, $m:ident => $body:expr, pop $counts:ident => $pop:expr, nb $n:ident => $nb:expr) => {
        match $model {
            $crate::Model::Popularity { counts: $counts } => $pop,
            $crate::Model::Neighbors($n) => $nb,
            $crate::Model::Deep($m) => $body,
            $crate::Model::Fm($m) => $body,
            $crate::Model::Mind($m) => $body,
            $crate::Model::Seq($m) => $body,
        }
    };
}

impl Model {
    pub fn dim(&self) -> usize {
        with_tower!(self, m => m.out_dim(), pop _c => 1, nb _n => 0)
    }

    /// The neighbour lists of a transitions or item-CF model.
    pub fn neighbors(&self) -> Option<&ItemNeighbors> {
        match self {
            Model::Neighbors(n) => Some(n),
            _ => None,
        }
    }

    /// Item table rows, padding row 0 included.
    pub fn item_rows(&self) -> usize {
        with_tower!(self, m => m.item_rows(), pop counts => counts.len(), nb n => n.item_rows())
    }

    /// Vectors per user (several for multi-interest models).
    pub fn interests(&self) -> usize {
        with_tower!(self, m => m.interests(), pop _c => 1, nb _n => 1)
    }

    /// `[item rows × dim]`, row 0 = padding.
    pub fn item_vectors(&self) -> Vec<f32> {
        with_tower!(self, m => m.all_item_vectors(), pop counts => counts.clone(), nb _n => Vec::new())
    }

    /// The rows and vectors of the real items (row 0, the padding, left out): what an item index
    /// holds.
    pub fn indexed_items(&self) -> (Vec<u32>, Vec<f32>) {
        let d = self.dim();
        if d == 0 {
            return (Vec::new(), Vec::new());
        }
        let all = self.item_vectors();
        ((1..(all.len() / d) as u32).collect(), all[d..].to_vec())
    }

    /// Whether the item tower reads item features, so that an item it was not trained on can
    /// be embedded from them ([`Model::item_vector_of`]).
    pub fn reads_item_features(&self) -> bool {
        with_tower!(self, m => m.item_vector_of(None, &[]).is_some(), pop _c => false, nb _n => false)
    }

    /// The vector of one item from its id row (`None` for an item the model was not trained
    /// on) and its feature value rows, one list per item feature in the model's order; `None`
    /// when the item tower reads ids only.
    pub fn item_vector_of(&self, id: Option<u32>, features: &[&[u32]]) -> Option<Vec<f32>> {
        with_tower!(self, m => m.item_vector_of(id, features), pop _c => None, nb _n => None)
    }

    /// The vector of item `row` as the index holds it.
    pub fn item_vector(&self, row: u32) -> Vec<f32> {
        with_tower!(self, m => one_item_vector(m.as_ref(), row), pop counts => vec![counts.get(row as usize).copied().unwrap_or(0.0)], nb _n => Vec::new())
    }

    /// The `interests × dim` vectors of one user from their events, through the one user window
    /// ([`UserBatch::set_user`]) that training and evaluation use.
    pub fn user_vector(&self, events: &UserEvents<'_>) -> Vec<f32> {
        with_tower!(self, m => one_user_vector(m.as_ref(), events), pop _c => vec![1.0], nb _n => Vec::new())
    }
}

fn one_item_vector<T: Tower>(m: &T, row: u32) -> Vec<f32> {
    let mut acts = T::ItemActs::default();
    m.item_forward(&[row], &mut acts);
    m.item_out(&acts).to_vec()
}

fn one_user_vector<T: Tower>(m: &T, events: &UserEvents<'_>) -> Vec<f32> {
    let mut batch = UserBatch::default();
    batch.reset(1, m.max_seq_len(), m.n_user_features());
    batch.set_user(0, events);
    let mut acts = T::UserActs::default();
    m.user_infer(&batch, &mut acts);
    m.user_out(&acts)[..m.interests() * m.out_dim()].to_vec()
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

/// The tower a run holds and its shapes, one variant per family of models: the `[tower]`
/// table of `model.toml`. Everything kind-specific about reading and writing a run is in this
/// file: [`Model`], [`TowerSpec`], [`load_model`] and [`save_model`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TowerSpec {
    /// Training counts; no parameters.
    Popularity,
    /// YouTubeDNN and DSSM.
    Deep(DeepSpec),
    Fm(FmSpec),
    Mind(MindSpec),
    Seq(SeqSpec),
    /// Transitions and item-CF.
    Neighbors(NeighborSpec),
}

impl TowerSpec {
    /// The family's name, as in `model.toml`.
    pub fn family(&self) -> &'static str {
        match self {
            TowerSpec::Popularity => "popularity",
            TowerSpec::Deep(_) => "deep",
            TowerSpec::Fm(_) => "fm",
            TowerSpec::Mind(_) => "mind",
            TowerSpec::Seq(_) => "seq",
            TowerSpec::Neighbors(_) => "neighbors",
        }
    }

    /// Newest history items the tower reads: the run's one length, which training, evaluation,
    /// the store and the server all use (`None` for popularity, which reads no history).
    pub fn max_seq_len(&self) -> Option<usize> {
        match self {
            TowerSpec::Popularity => None,
            TowerSpec::Deep(s) => Some(s.max_seq_len),
            TowerSpec::Fm(s) => Some(s.max_seq_len),
            TowerSpec::Mind(s) => Some(s.max_seq_len),
            TowerSpec::Seq(s) => Some(s.max_seq_len),
            TowerSpec::Neighbors(s) => Some(s.max_seq_len),
        }
    }

    /// Whether a run of `kind` holds this family of tower.
    pub fn fits(&self, kind: ModelKind) -> bool {
        matches!(
            (kind, self),
            (ModelKind::Popularity, TowerSpec::Popularity)
                | (ModelKind::Youtubednn | ModelKind::Dssm, TowerSpec::Deep(_))
                | (ModelKind::Fm, TowerSpec::Fm(_))
                | (ModelKind::Mind, TowerSpec::Mind(_))
                | (ModelKind::Sequential, TowerSpec::Seq(_))
                | (ModelKind::Transitions | ModelKind::Itemcf, TowerSpec::Neighbors(_))
        )
    }
}

/// Widths and lengths past this are not a recall model but a damaged manifest (and a tower built
/// from them would allocate terabytes before the checkpoint could be compared).
const MAX_WIDTH: usize = 1 << 14;

/// The tables a manifest declares, `(name, rows, width)`, and every other size it gives.
pub(crate) fn declared_shapes(info: &RunInfo) -> (Vec<(String, usize, usize)>, Vec<usize>) {
    let item_rows =
        |items: usize, hash: Option<needle_model::embedding::RowHash>| hash.map_or(items, |h| h.table_rows());
    let feats = |fs: &[CategoricalSpec], prefix: &str| {
        fs.iter().map(|f| (format!("{prefix}.{}", f.name), f.rows, f.dim)).collect::<Vec<_>>()
    };
    let (mut tables, mut sizes) = (Vec::new(), Vec::new());
    match &info.tower {
        TowerSpec::Deep(d) => {
            tables.push(("item_emb".to_owned(), item_rows(d.items, d.item_hash), d.dim));
            tables.extend(feats(&d.user_features, "user_feat"));
            tables.extend(feats(&d.item_features, "item_feat"));
            sizes.extend([d.dim, d.out_dim, d.recent, d.max_seq_len]);
            sizes.extend(d.hidden.iter().chain(d.item_hidden.iter().flatten()));
        }
        TowerSpec::Fm(f) => {
            tables.push(("item_v".to_owned(), item_rows(f.items, f.item_hash), f.k));
            tables.extend(feats(&f.user_features, "user_feat"));
            tables.extend(feats(&f.item_features, "item_feat"));
            sizes.extend([f.k, f.max_seq_len]);
        }
        TowerSpec::Mind(m) => {
            tables.push(("item_emb".to_owned(), item_rows(m.items, m.item_hash), m.dim));
            tables.extend(feats(&m.user_features, "user_feat"));
            tables.extend(feats(&m.item_features, "item_feat"));
            sizes.extend([m.dim, m.interests, m.routing_iters, m.max_seq_len]);
            sizes.extend(&m.hidden);
        }
        TowerSpec::Seq(s) => {
            tables.push(("items".to_owned(), item_rows(s.items, s.item_hash), s.dim));
            sizes.extend([s.dim, s.ffn, s.max_seq_len, s.blocks, s.heads]);
        }
        TowerSpec::Popularity | TowerSpec::Neighbors(_) => {}
    }
    (tables, sizes)
}

/// Hidden widths followed by the output width, for each MLP a manifest declares.
fn dense_chains(info: &RunInfo) -> Vec<Vec<usize>> {
    match &info.tower {
        TowerSpec::Deep(d) => {
            let mut chains = vec![d.hidden.iter().copied().chain([d.out_dim]).collect()];
            if let Some(h) = &d.item_hidden {
                chains.push(h.iter().copied().chain([d.out_dim]).collect());
            }
            chains
        }
        TowerSpec::Mind(m) => vec![m.hidden.iter().copied().chain([m.out_dim()]).collect()],
        _ => Vec::new(),
    }
}

/// Refuses a manifest whose shapes cannot belong to the checkpoint beside it, before anything
/// is allocated from them: every table it declares is saved in the checkpoint, so together they
/// cannot be larger than the file.
fn check_declared_shapes(info: &RunInfo, weights: &Path) -> Result<(), RunError> {
    let (tables, sizes) = declared_shapes(info);
    let bad =
        |why: String| RunError::Invalid(format!("{}: {why}; the run is damaged, train it again", weights.display()));
    if let Some(s) = sizes.iter().chain(tables.iter().map(|t| &t.2)).find(|&&s| s > MAX_WIDTH) {
        return Err(bad(format!("model.toml declares a width or length of {s}")));
    }
    let file = std::fs::metadata(weights).map_err(io(weights))?.len() as u128;
    let mut floats: u128 = tables.iter().map(|(_, rows, width)| *rows as u128 * *width as u128).sum();
    // The dense layers between hidden widths are saved too.
    for chain in dense_chains(info) {
        floats += chain.windows(2).map(|w| w[0] as u128 * w[1] as u128).sum::<u128>();
    }
    if floats * 4 > file {
        return Err(bad(format!(
            "model.toml declares tables of {floats} parameters, more than the {file}-byte checkpoint holds"
        )));
    }
    Ok(())
}

/// Rebuilds the model of a run from its manifest and checkpoint.
pub fn load_model(info: &RunInfo, dir: &Path, item_counts: &[u64]) -> Result<Model, RunError> {
    let path = dir.join(crate::MANIFEST_FILE);
    let weights = dir.join(crate::WEIGHTS_FILE);
    if !info.tower.fits(info.kind) {
        return Err(RunError::Invalid(format!(
            "{}: a {:?} run cannot hold a {} tower",
            path.display(),
            info.kind,
            info.tower.family()
        )));
    }
    if !info.kind.is_counted() {
        check_declared_shapes(info, &weights)?;
    }
    let rng = &mut needle_model::rng::Rng::new(0);
    Ok(match info.tower.clone() {
        TowerSpec::Popularity => Model::Popularity { counts: item_counts.iter().map(|&c| c as f32).collect() },
        TowerSpec::Deep(spec) => {
            let ckpt = Checkpoint::read(&weights)?;
            let bags = read_bags(&ckpt, &spec.item_features, spec.items, &weights)?;
            let mut m = DeepTwoTower::new(spec, bags, rng).map_err(RunError::Invalid)?;
            ckpt.fill(&mut m)?;
            Model::Deep(Box::new(m))
        }
        TowerSpec::Fm(spec) => {
            let ckpt = Checkpoint::read(&weights)?;
            let bags = read_bags(&ckpt, &spec.item_features, spec.items, &weights)?;
            let mut m = FmTwoTower::new(spec, bags, rng).map_err(RunError::Invalid)?;
            ckpt.fill(&mut m)?;
            Model::Fm(Box::new(m))
        }
        TowerSpec::Mind(spec) => {
            let ckpt = Checkpoint::read(&weights)?;
            let bags = read_bags(&ckpt, &spec.item_features, spec.items, &weights)?;
            let mut m = MindTwoTower::new(spec, bags, rng).map_err(RunError::Invalid)?;
            ckpt.fill(&mut m)?;
            Model::Mind(Box::new(m))
        }
        TowerSpec::Seq(spec) => {
            let ckpt = Checkpoint::read(&weights)?;
            let mut m = SeqTwoTower::new(spec, rng).map_err(RunError::Invalid)?;
            ckpt.fill(&mut m)?;
            Model::Seq(Box::new(m))
        }
        TowerSpec::Neighbors(spec) => {
            if info.kind.neighbor_kind() != Some(spec.kind) || spec.items != item_counts.len() {
                return Err(RunError::Invalid(format!(
                    "{}: the neighbour lists ({:?} over {} item rows) do not belong to a {:?} run over {} item rows",
                    path.display(),
                    spec.kind,
                    spec.items,
                    info.kind,
                    item_counts.len()
                )));
            }
            Model::Neighbors(Box::new(Checkpoint::read(&weights)?.neighbors(spec, item_counts.to_vec())?))
        }
    })
}

/// Saves a model's parameters to `ckpt` (popularity has none) and returns its tower's shapes
/// for the manifest.
pub(crate) fn save_model(model: &Model, ckpt: &Path) -> Result<TowerSpec, RunError> {
    Ok(match model {
        Model::Popularity { .. } => TowerSpec::Popularity,
        Model::Deep(m) => {
            save(m.as_ref(), ckpt)?;
            TowerSpec::Deep(m.spec.clone())
        }
        Model::Fm(m) => {
            save(m.as_ref(), ckpt)?;
            TowerSpec::Fm(m.spec.clone())
        }
        Model::Mind(m) => {
            save(m.as_ref(), ckpt)?;
            TowerSpec::Mind(m.spec.clone())
        }
        Model::Seq(m) => {
            save(m.as_ref(), ckpt)?;
            TowerSpec::Seq(m.spec.clone())
        }
        Model::Neighbors(n) => {
            save_neighbors(n, ckpt)?;
            TowerSpec::Neighbors(n.spec.clone())
        }
    })
}

/// Reads and checks the item → feature-value bags saved with a model.
fn read_bags(
    ckpt: &Checkpoint,
    features: &[CategoricalSpec],
    items: usize,
    path: &Path,
) -> Result<Vec<ItemBags>, RunError> {
    let mut bags = Vec::with_capacity(features.len());
    for f in features {
        let b = ItemBags {
            offsets: ckpt.u32_tensor(&format!("item_bags.{}.offsets", f.name))?,
            keys: ckpt.u32_tensor(&format!("item_bags.{}.keys", f.name))?,
        };
        let consistent = b.offsets.len() == items + 1
            && b.offsets.windows(2).all(|w| w[0] <= w[1])
            && b.offsets.last().copied() == Some(b.keys.len() as u32)
            && b.keys.iter().all(|&k| (k as usize) < f.rows);
        if !consistent {
            return Err(RunError::Invalid(format!("{}: item_bags.{} are inconsistent", path.display(), f.name)));
        }
        bags.push(b);
    }
    Ok(bags)
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
