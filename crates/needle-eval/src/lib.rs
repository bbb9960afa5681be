//! Full-corpus retrieval metrics: hit rate, recall, NDCG, precision and MRR at several
//! cut-offs, over ranked lists from the exact top-K of `needle-core` (re-exported here as
//! [`top_k`]).

pub use needle_core::topk::top_k;
pub use needle_core::Lists;
use serde::Serialize;

/// Metrics at one cut-off, averaged over users.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct AtK {
    pub k: usize,
    pub hit_rate: f64,
    pub recall: f64,
    pub ndcg: f64,
    pub precision: f64,
    pub mrr: f64,
}

/// Everything one evaluation measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub users: usize,
    pub items: usize,
    pub at: Vec<AtK>,
    /// `hit_curve[j]` = HR@(j+1), for plotting HR against K.
    pub hit_curve: Vec<f64>,
}

impl Report {
    /// Flat `metric@k` map, e.g. `hit_rate@10`, plus `users` and `items`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for a in &self.at {
            m.insert(format!("hit_rate@{}", a.k), a.hit_rate.into());
            m.insert(format!("recall@{}", a.k), a.recall.into());
            m.insert(format!("ndcg@{}", a.k), a.ndcg.into());
            m.insert(format!("precision@{}", a.k), a.precision.into());
            m.insert(format!("mrr@{}", a.k), a.mrr.into());
        }
        m.insert("users".into(), self.users.into());
        m.insert("items".into(), self.items.into());
        serde_json::Value::Object(m)
    }

    pub fn get(&self, k: usize) -> Option<&AtK> {
        self.at.iter().find(|a| a.k == k)
    }
}

/// Scores ranked lists (`[users × kmax]`, as from [`top_k`]) against each user's targets.
/// Users with no target are skipped.
pub fn score(ranked: &[u32], kmax: usize, targets: &Lists, ks: &[usize], n_items: usize) -> Report {
    let mut at: Vec<AtK> = ks.iter().map(|&k| AtK { k, ..Default::default() }).collect();
    let mut hit_curve = vec![0.0f64; kmax];
    let mut users = 0usize;
    for u in 0..targets.len() {
        let t = targets.get(u);
        if t.is_empty() {
            continue;
        }
        users += 1;
        let row = &ranked[u * kmax..(u + 1) * kmax];
        let ranks: Vec<usize> = row.iter().enumerate().filter(|(_, id)| t.contains(id)).map(|(r, _)| r).collect();
        if let Some(&first) = ranks.first() {
            for h in hit_curve.iter_mut().skip(first) {
                *h += 1.0;
            }
        }
        for a in at.iter_mut() {
            let k = a.k.min(kmax);
            let hits: Vec<usize> = ranks.iter().copied().filter(|&r| r < k).collect();
            if hits.is_empty() {
                continue;
            }
            let dcg: f64 = hits.iter().map(|&r| 1.0 / ((r + 2) as f64).log2()).sum();
            let idcg: f64 = (0..t.len().min(a.k)).map(|r| 1.0 / ((r + 2) as f64).log2()).sum();
            a.hit_rate += 1.0;
            a.recall += hits.len() as f64 / t.len() as f64;
            a.precision += hits.len() as f64 / a.k as f64;
            a.ndcg += dcg / idcg;
            a.mrr += 1.0 / (hits[0] + 1) as f64;
        }
    }
    let n = users.max(1) as f64;
    for a in at.iter_mut() {
        a.hit_rate /= n;
        a.recall /= n;
        a.precision /= n;
        a.ndcg /= n;
        a.mrr /= n;
    }
    hit_curve.iter_mut().for_each(|h| *h /= n);
    Report { users, items: n_items, at, hit_curve }
}

/// Prints a report as an aligned text table.
pub fn format_table(r: &Report) -> String {
    let mut s = format!("users {}  items {}\n", r.users, r.items);
    s.push_str(&format!("{:>6} {:>9} {:>9} {:>9} {:>10} {:>9}\n", "K", "HR", "Recall", "NDCG", "Precision", "MRR"));
    for a in &r.at {
        s.push_str(&format!(
            "{:>6} {:>9.4} {:>9.4} {:>9.4} {:>10.5} {:>9.4}\n",
            a.k, a.hit_rate, a.recall, a.ndcg, a.precision, a.mrr
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_follow_their_definitions() {
        // Two users, kmax 3. User 0's target at rank 1 (0-based); user 1 has two targets, one at rank 0.
        let ranked = vec![5, 7, 9, 1, 2, 3];
        let mut t = Lists::new();
        t.push([7]);
        t.push([1, 8]);
        t.push([]); // a user without a target is skipped
        let r = score(&ranked, 3, &t, &[1, 3], 10);
        assert_eq!(r.users, 2);
        let a1 = r.get(1).unwrap();
        assert_eq!(a1.hit_rate, 0.5);
        assert_eq!(a1.recall, 0.25);
        assert_eq!(a1.precision, 0.5);
        assert_eq!(a1.mrr, 0.5);
        assert!((a1.ndcg - 0.5).abs() < 1e-12);
        let a3 = r.get(3).unwrap();
        assert_eq!(a3.hit_rate, 1.0);
        assert_eq!(a3.recall, 0.75);
        assert!((a3.mrr - 0.75).abs() < 1e-12);
        let ndcg_u0 = 1.0 / 3f64.log2();
        let ndcg_u1 = 1.0 / (1.0 + 1.0 / 3f64.log2());
        assert!((a3.ndcg - (ndcg_u0 + ndcg_u1) / 2.0).abs() < 1e-12);
        assert_eq!(r.hit_curve, vec![0.5, 1.0, 1.0]);
        assert_eq!(r.to_json()["hit_rate@3"], 1.0);
    }
}
