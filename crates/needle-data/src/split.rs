//! Time-ordered train/valid/test splits. Retrieval models are evaluated on the future of
//! each user's history, so every split keeps per-user sequences sorted by time.

use crate::dataset::Dataset;
use crate::error::{DataError, Result};

/// How to divide events into train, validation and test.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SplitStrategy {
    /// Per user: last event -> test, second-to-last -> valid, rest -> train (users with two
    /// events: first train, last test; one event: train). The standard sequential-recall protocol.
    LeaveLastOut,
    /// Global cut points in time, so no training event is later than any test event
    /// (no leakage of future popularity). Fractions are of events.
    GlobalTime {
        /// Fraction of events (by time) for validation, in (0,1).
        valid_fraction: f64,
        /// Fraction of events (latest) for test, in (0,1).
        test_fraction: f64,
    },
}

/// Per-user item sequences in CSR form, indexed by dataset user key (users without events
/// have empty rows) so models can index by key without remapping.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sequences {
    /// Row pointers, `len = n_users + 1`.
    pub offsets: Vec<u32>,
    /// Item keys, per user in time order.
    pub items: Vec<u32>,
    /// Timestamps parallel to `items`.
    pub ts: Vec<i64>,
}

impl Sequences {
    fn range(&self, u: usize) -> std::ops::Range<usize> {
        match (self.offsets.get(u), u.checked_add(1).and_then(|e| self.offsets.get(e))) {
            (Some(&a), Some(&b)) if a <= b => a as usize..b as usize,
            _ => 0..0,
        }
    }

    /// Items of user `u` in time order (empty when out of range).
    pub fn items_of(&self, u: usize) -> &[u32] {
        self.items.get(self.range(u)).unwrap_or(&[])
    }

    /// Timestamps of user `u`, parallel to `items_of(u)`.
    pub fn ts_of(&self, u: usize) -> &[i64] {
        self.ts.get(self.range(u)).unwrap_or(&[])
    }

    /// Number of users (rows), including users with no events.
    pub fn num_users(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Number of events of user `u`.
    pub fn len_of(&self, u: usize) -> usize {
        self.range(u).len()
    }

    /// Total number of events.
    pub fn total(&self) -> usize {
        self.items.len()
    }
}

/// Result of [`split`]: three disjoint parts of the dataset's events.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Split {
    /// Training sequences.
    pub train: Sequences,
    /// Validation targets (for early stopping / tuning).
    pub valid: Sequences,
    /// Test targets.
    pub test: Sequences,
    /// Latest training timestamp (`i64::MIN` when train is empty); lets evaluation check
    /// or filter by what the model could have seen.
    pub train_max_ts: i64,
}

/// Appends one user's row at a time; offsets fit u32 because `split` checks the event count.
struct SeqBuilder(Sequences);

impl SeqBuilder {
    fn new(n_users: usize, cap: usize) -> Self {
        let mut offsets = Vec::with_capacity(n_users + 1);
        offsets.push(0);
        SeqBuilder(Sequences { offsets, items: Vec::with_capacity(cap), ts: Vec::with_capacity(cap) })
    }
    fn push(&mut self, item: u32, ts: i64) {
        self.0.items.push(item);
        self.0.ts.push(ts);
    }
    fn end_user(&mut self) {
        let n = u32::try_from(self.0.items.len()).unwrap_or(u32::MAX);
        self.0.offsets.push(n);
    }
}

/// Checks fractions before any work so a bad config fails fast with a clear message.
fn validate(strategy: &SplitStrategy) -> Result<()> {
    if let SplitStrategy::GlobalTime { valid_fraction: v, test_fraction: t } = *strategy {
        let ok = |x: f64| x > 0.0 && x < 1.0;
        if !ok(v) || !ok(t) {
            return Err(DataError::InvalidSplit(format!(
                "valid_fraction ({v}) and test_fraction ({t}) must both be in (0, 1)"
            )));
        }
        if v + t >= 1.0 {
            return Err(DataError::InvalidSplit(format!(
                "valid_fraction + test_fraction = {} must be below 1 to leave training data",
                v + t
            )));
        }
    }
    Ok(())
}

/// Timestamp at quantile `q` of the sorted timestamps (nearest-rank, floor).
fn quantile(sorted: &[i64], q: f64) -> i64 {
    let n = sorted.len();
    // Float-to-int `as` saturates, so no overflow is possible here.
    let idx = ((q * n as f64).floor() as usize).min(n.saturating_sub(1));
    sorted.get(idx).copied().unwrap_or(i64::MAX)
}

/// Every user's events ordered by timestamp with a stable sort, so equal timestamps keep file
/// order: the order [`split`] cuts, and the order of a user's whole log.
///
/// Errors with [`DataError::TooLarge`] when the events do not fit u32 offsets.
pub fn time_ordered(ds: &Dataset) -> Result<Sequences> {
    if u32::try_from(ds.events.len()).is_err() {
        return Err(DataError::TooLarge { what: "events" });
    }
    let n_users = ds.user_ids.len();

    // Counting sort by user keeps file order within a user; events with keys outside the
    // dataset (only possible for hand-built datasets) are ignored rather than panicking.
    let mut starts = vec![0usize; n_users + 1];
    for e in &ds.events {
        if let Some(c) = starts.get_mut(e.user as usize + 1) {
            *c += 1;
        }
    }
    for u in 0..n_users {
        let prev = starts.get(u).copied().unwrap_or(0);
        if let Some(c) = starts.get_mut(u + 1) {
            *c += prev;
        }
    }
    let total = starts.last().copied().unwrap_or(0);
    // Scatter straight into the output arrays (12 bytes per event), then order each user's
    // run in place through a scratch buffer as long as the longest run.
    let mut items = vec![0u32; total];
    let mut ts = vec![0i64; total];
    let mut fill = starts.clone();
    for e in &ds.events {
        if let Some(pos) = fill.get_mut(e.user as usize) {
            if let (Some(i), Some(t)) = (items.get_mut(*pos), ts.get_mut(*pos)) {
                (*i, *t) = (e.item, e.ts);
                *pos += 1;
            }
        }
    }
    drop(fill);
    let mut scratch: Vec<(i64, u32)> = Vec::new();
    let mut offsets = Vec::with_capacity(n_users + 1);
    offsets.push(0u32);
    for u in 0..n_users {
        let (a, b) = (starts.get(u).copied().unwrap_or(0), starts.get(u + 1).copied().unwrap_or(0));
        if let (Some(is), Some(tss)) = (items.get_mut(a..b), ts.get_mut(a..b)) {
            if tss.windows(2).any(|w| w[0] > w[1]) {
                scratch.clear();
                scratch.extend(tss.iter().copied().zip(is.iter().copied()));
                // `sort_by_key` is stable: ties keep file order.
                scratch.sort_by_key(|&(t, _)| t);
                for ((t, i), &(st, si)) in tss.iter_mut().zip(is.iter_mut()).zip(&scratch) {
                    (*t, *i) = (st, si);
                }
            }
        }
        offsets.push(u32::try_from(b).unwrap_or(u32::MAX));
    }
    Ok(Sequences { offsets, items, ts })
}

/// Splits `ds` by `strategy`, cutting each user's [`time_ordered`] events.
///
/// Errors with [`DataError::InvalidSplit`] for fractions outside (0,1) or summing to >= 1.
pub fn split(ds: &Dataset, strategy: &SplitStrategy) -> Result<Split> {
    validate(strategy)?;
    let seqs = time_ordered(ds)?;
    let n_users = ds.user_ids.len();
    let total = seqs.total();

    let (t_valid, t_test) = match *strategy {
        SplitStrategy::LeaveLastOut => (i64::MAX, i64::MAX),
        SplitStrategy::GlobalTime { valid_fraction, test_fraction } => {
            let mut all = seqs.ts.clone();
            all.sort_unstable();
            (quantile(&all, 1.0 - valid_fraction - test_fraction), quantile(&all, 1.0 - test_fraction))
        }
    };

    let mut train = SeqBuilder::new(n_users, total);
    let mut valid = SeqBuilder::new(n_users, n_users);
    let mut test = SeqBuilder::new(n_users, n_users);
    let mut train_max_ts = i64::MIN;
    for u in 0..n_users {
        let (items, times) = (seqs.items_of(u), seqs.ts_of(u));
        let n = items.len();
        for (k, (&item, &ts)) in items.iter().zip(times).enumerate() {
            let part = match *strategy {
                SplitStrategy::LeaveLastOut => match (n, n - 1 - k) {
                    (1, _) => 0,
                    (_, 0) => 2,
                    (n, 1) if n >= 3 => 1,
                    _ => 0,
                },
                SplitStrategy::GlobalTime { .. } => {
                    if ts >= t_test {
                        2
                    } else if ts >= t_valid {
                        1
                    } else {
                        0
                    }
                }
            };
            match part {
                0 => {
                    train.push(item, ts);
                    train_max_ts = train_max_ts.max(ts);
                }
                1 => valid.push(item, ts),
                _ => test.push(item, ts),
            }
        }
        train.end_user();
        valid.end_user();
        test.end_user();
    }
    Ok(Split { train: train.0, valid: valid.0, test: test.0, train_max_ts })
}
