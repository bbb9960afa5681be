//! The trained model behind one run, and the user/item vectors that evaluation, recall and
//! serving search with.

use needle_model::deep::DeepTwoTower;
use needle_model::fm::FmTwoTower;
use needle_model::mind::MindTwoTower;
use needle_model::neighbors::ItemNeighbors;
use needle_model::seq::SeqTwoTower;
use needle_model::tower::{Tower, UserBatch, UserEvents};

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

    /// Newest history items the user tower reads: the model's own length, the one every reader
    /// of the run uses. Item-to-item and popularity models read the whole history.
    pub fn max_seq_len(&self) -> Option<usize> {
        with_tower!(self, m => Some(m.max_seq_len()), pop _c => None, nb _n => None)
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
