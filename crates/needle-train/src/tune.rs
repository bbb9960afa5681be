//! `needle tune`: successive halving over the configurations a `[tune]` section declares, within
//! a time budget, on validation figures only.
//!
//! Trial 0 is the config as written; the others are distinct points of the declared grid in a
//! seeded order. Every trial trains for the first rung's epochs; the best `1/eta` (by the tune
//! metric's best epoch so far) continue to the next rung, and so on until one trial has had the
//! config's full `epochs`. Sessions of surviving trials stay in memory between rungs, so no
//! epoch is trained twice. Every validated epoch is appended to a log; a tune started again on
//! the same log replays it and goes on from where it stopped (training is deterministic for a
//! seed and thread count, so a resumed trial retrains exactly the epochs the log holds).

use crate::config::{Config, SelectMetric, TuneConfig};
use crate::trainer::{selected, session, AnySession, EpochLog, Trained};
use crate::{Prepared, TrainError};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// One configuration under trial.
pub struct Trial {
    pub id: usize,
    /// `section.key = value`, in space order; empty for trial 0, the config as written.
    pub params: Vec<(String, toml::Value)>,
    pub config: Config,
}

impl Trial {
    /// The changed values, e.g. `model.dim = 32, train.lr = 0.002` (`(as written)` for trial 0).
    pub fn label(&self) -> String {
        if self.params.is_empty() {
            return "(as written)".into();
        }
        self.params.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ")
    }
}

/// One line of `tune.jsonl`: a validated epoch of one trial.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrialEpoch {
    pub trial: usize,
    pub params: String,
    pub epoch: usize,
    pub valid_hr10: f64,
    pub valid_ndcg10: f64,
    pub seconds: f64,
    /// Training of this trial ended here (its epochs are spent or early stopping ended it).
    pub done: bool,
}

/// A line of `tune.jsonl`: the plan, once the number of trials is known, or an epoch.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LogLine {
    Plan { planned_trials: usize },
    Epoch(TrialEpoch),
}

/// What an earlier, interrupted run of the same tune left in its log.
#[derive(Clone, Debug, Default)]
pub struct Resumed {
    pub planned_trials: Option<usize>,
    pub epochs: Vec<TrialEpoch>,
}

impl Resumed {
    pub fn from_lines(lines: Vec<LogLine>) -> Self {
        let mut r = Resumed::default();
        for l in lines {
            match l {
                LogLine::Plan { planned_trials } => r.planned_trials = Some(planned_trials),
                LogLine::Epoch(e) => r.epochs.push(e),
            }
        }
        r
    }
}

/// A line of the leaderboard.
#[derive(Clone, Debug)]
pub struct TrialSummary {
    pub trial: usize,
    pub params: String,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub valid_hr10: f64,
    pub valid_ndcg10: f64,
    pub seconds: f64,
}

pub struct TuneOutcome {
    /// Every trial that ran, best first.
    pub board: Vec<TrialSummary>,
    pub metric: SelectMetric,
    /// The winner's config as `needle train` takes it: its values, `epochs` = its best epoch,
    /// no early stopping, `select` = the tune metric, no `[tune]`.
    pub best_config: Config,
    pub trained: Trained,
    pub trials_planned: usize,
    /// The rungs as `(trials, epochs)`.
    pub rungs: Vec<(usize, usize)>,
    /// The budget ran out before the last rung finished.
    pub out_of_time: bool,
}

/// Sets `section.key` of `base` to each value, and checks the result as `needle train` would.
pub fn apply(base: &Config, params: &[(String, toml::Value)]) -> Result<Config, String> {
    let mut v = toml::Value::try_from(base).map_err(|e| e.to_string())?;
    for (key, value) in params {
        let (section, field) = key.split_once('.').ok_or_else(|| format!("`{key}` is not `section.key`"))?;
        let table = v
            .get_mut(section)
            .and_then(toml::Value::as_table_mut)
            .ok_or_else(|| format!("the config has no [{section}] section to tune"))?;
        table.insert(field.to_owned(), value.clone());
    }
    let c: Config = v.try_into().map_err(|e: toml::de::Error| format!("{}: {}", keys(params), e.message()))?;
    c.validate().map_err(|e| format!("{}: {e}", keys(params)))?;
    Ok(c)
}

fn keys(params: &[(String, toml::Value)]) -> String {
    params.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ")
}

/// The space as `(section.key, values)`, model keys first.
fn axes(space: &TuneConfig) -> Vec<(String, &[toml::Value])> {
    let model = space.model.iter().map(|(k, v)| (format!("model.{k}"), v.as_slice()));
    let train = space.train.iter().map(|(k, v)| (format!("train.{k}"), v.as_slice()));
    model.chain(train).collect()
}

/// Points in the declared grid (saturating).
pub fn grid_size(space: &TuneConfig) -> usize {
    axes(space).iter().fold(1usize, |n, (_, v)| n.saturating_mul(v.len()))
}

/// Up to `n` trials: the config as written, then distinct valid grid points in a seeded order.
/// Each trial's `[train] select` is the tune metric, so its early stopping and best epoch follow
/// what the trials are ranked by.
pub fn trials(base: &Config, n: usize) -> Result<Vec<Trial>, String> {
    let space = base.tune.clone().unwrap_or_default();
    let axes = axes(&space);
    if let Some((k, _)) = axes.iter().find(|(_, v)| v.is_empty()) {
        return Err(format!("[tune] {k} lists no values"));
    }
    let mut root = base.clone();
    root.tune = None;
    root.train.select = space.metric;
    let first = apply(&root, &[])?;
    // A key no value of which gives a valid config is a mistake (a typo, or a key the kind
    // does not read), not a part of the space to skip.
    for (k, vals) in &axes {
        let errors: Vec<String> = vals.iter().filter_map(|v| apply(&root, &[(k.clone(), v.clone())]).err()).collect();
        if errors.len() == vals.len() {
            return Err(format!("[tune] {k}: no value gives a valid config ({})", errors[0]));
        }
    }
    let mut out = vec![Trial { id: 0, params: Vec::new(), config: first }];
    let g = grid_size(&space);
    // A seeded permutation of the grid, drawn lazily so a huge grid costs only what is used.
    let mut rng = needle_model::rng::Rng::new(space.seed);
    let mut seen = std::collections::HashSet::new();
    let mut attempts = 0usize;
    while out.len() < n && seen.len() < g && attempts < 50 * n.max(1) + g.min(100_000) {
        attempts += 1;
        let point = rng.below(g);
        if !seen.insert(point) {
            continue;
        }
        let mut rest = point;
        let params: Vec<(String, toml::Value)> = axes
            .iter()
            .map(|(k, vals)| {
                let v = vals[rest % vals.len()].clone();
                rest /= vals.len();
                (k.clone(), v)
            })
            .collect();
        let Ok(config) = apply(&root, &params) else { continue };
        if out.iter().any(|t| t.config == config) {
            continue;
        }
        out.push(Trial { id: out.len(), params, config });
    }
    Ok(out)
}

/// Successive-halving rungs for `n` trials: `(trials, epochs)` per rung. Every rung keeps the
/// best `1/eta` of the one before and trains `eta` times the epochs, the first at least
/// `min_epochs`, the last at `max_epochs`; there are only as many rungs as that allows (so the
/// last rung may train several trials in full, and the best of them wins).
pub fn rungs(n: usize, max_epochs: usize, eta: usize, min_epochs: usize) -> Vec<(usize, usize)> {
    let (n, eta, max_epochs) = (n.max(1), eta.max(2), max_epochs.max(1));
    let min_epochs = min_epochs.clamp(1, max_epochs);
    let mut s = 0u32;
    let at = |level: u32| ((max_epochs as f64) / (eta as f64).powi(level as i32)).round() as usize;
    while at(s + 1) >= min_epochs && n.div_ceil(eta.pow(s)) > 1 {
        s += 1;
    }
    let mut prev = 0;
    (0..=s)
        .map(|i| {
            let count = n.div_ceil(eta.pow(i));
            let e = at(s - i).max(if i == 0 { min_epochs } else { prev + 1 }).min(max_epochs);
            prev = e;
            (count, e)
        })
        .collect()
}

/// Epochs the rungs train in all.
pub fn rung_epochs(r: &[(usize, usize)]) -> usize {
    let mut prev = 0;
    r.iter()
        .map(|&(c, e)| {
            let n = c * e.saturating_sub(prev);
            prev = e;
            n
        })
        .sum()
}

/// Where one trial stands.
struct State<'a> {
    records: Vec<EpochLog>,
    done: bool,
    session: Option<Box<dyn AnySession + 'a>>,
    /// Epochs the live session has trained (it replays logged ones before training new ones).
    ran: usize,
}

impl State<'_> {
    fn best(&self, metric: SelectMetric) -> (f64, usize) {
        let mut best = (f64::NEG_INFINITY, 0);
        for r in &self.records {
            let s = selected(metric, r);
            if s > best.0 {
                best = (s, r.epoch);
            }
        }
        best
    }
}

/// The most trials a budget alone may plan.
const MAX_BUDGET_TRIALS: usize = 1000;

/// What the tuner reports as it goes.
pub trait TuneObserver {
    /// The number of trials and the rungs, once known; `short` when the budget is too small for a
    /// search.
    fn planned(
        &mut self,
        trials: usize,
        rungs: &[(usize, usize)],
        short: Option<&BudgetShort>,
    ) -> Result<(), TrainError>;
    /// A newly trained and validated epoch (not called for epochs replayed from the log).
    fn epoch(&mut self, rec: &TrialEpoch, best: (f64, usize)) -> Result<(), TrainError>;
}

/// Fewer trials than this (when the space has them) are not much of a search.
const SEARCH_TRIALS: usize = 3;

/// A budget that fits fewer than [`SEARCH_TRIALS`] trials, priced by the first epoch.
#[derive(Clone, Debug)]
pub struct BudgetShort {
    /// Seconds the first epoch took.
    pub epoch_secs: f64,
    /// Trials a search would plan.
    pub trials: usize,
    /// The budget, in seconds, those trials need.
    pub needed_secs: f64,
}

/// Runs the tune. `resumed` is what an earlier run of the same tune logged (empty for a new
/// one); `trials_wanted` overrides `[tune] trials` and the logged plan.
pub fn tune(
    base: &Config,
    p: &Prepared,
    budget: Duration,
    trials_wanted: Option<usize>,
    resumed: &Resumed,
    obs: &mut dyn TuneObserver,
) -> Result<TuneOutcome, TrainError> {
    let logged = resumed.epochs.as_slice();
    let start = Instant::now();
    let space = base.tune.clone().unwrap_or_default();
    let metric = space.metric;
    let wanted = trials_wanted.or(resumed.planned_trials).or((space.trials > 0).then_some(space.trials));
    // Without a count, the budget decides; no budget on this machine class trains more than
    // a thousand trials.
    let cap = wanted.unwrap_or(MAX_BUDGET_TRIALS).min(grid_size(&space).saturating_add(1));
    let all = trials(base, cap).map_err(TrainError::Config)?;
    for r in logged {
        match all.get(r.trial) {
            Some(t) if t.label() == r.params => {}
            _ => {
                return Err(TrainError::Config(format!(
                    "the tune log has trial {} as `{}`, which this config does not produce; it belongs to another tune (use another --out)",
                    r.trial, r.params
                )))
            }
        }
    }
    let mut states: Vec<State> = all
        .iter()
        .map(|t| {
            let records: Vec<EpochLog> = logged
                .iter()
                .filter(|r| r.trial == t.id)
                .map(|r| EpochLog {
                    epoch: r.epoch,
                    loss: f64::NAN,
                    valid_hr10: r.valid_hr10,
                    valid_ndcg10: r.valid_ndcg10,
                    seconds: r.seconds,
                    samples_per_sec: f64::NAN,
                })
                .collect();
            let done = logged.iter().any(|r| r.trial == t.id && r.done);
            State { records, done, session: None, ran: 0 }
        })
        .collect();
    // A counted model's one pass is its only epoch.
    let max_epochs = if base.model.kind.is_counted() { 1 } else { base.train.epochs.max(1) };
    let eta = space.eta.max(2);
    let min_epochs = space.min_epochs;
    let mut epoch_secs: Vec<f64> = logged.iter().map(|r| r.seconds).collect();

    // Without a trial count, the first epoch of trial 0 prices an epoch and sets how many
    // trials fit in 90% of the budget.
    let mut short = None;
    let n = match wanted {
        Some(n) => n.clamp(1, all.len()),
        None => {
            let mut out_of_time = false;
            advance(&all, p, &mut states, 0, 1, metric, budget, start, &mut epoch_secs, &mut out_of_time, obs)?;
            let per_epoch = mean(&epoch_secs).max(1e-3);
            let room = budget.as_secs_f64() * 0.9 - start.elapsed().as_secs_f64();
            let n = (1..=all.len())
                .rev()
                .find(|&n| rung_epochs(&rungs(n, max_epochs, eta, min_epochs)) as f64 * per_epoch <= room)
                .unwrap_or(1);
            let search = SEARCH_TRIALS.min(all.len());
            if n < search {
                let epochs = rung_epochs(&rungs(search, max_epochs, eta, min_epochs));
                short = Some(BudgetShort {
                    epoch_secs: per_epoch,
                    trials: search,
                    needed_secs: (epochs as f64 * per_epoch + start.elapsed().as_secs_f64()) / 0.9,
                });
            }
            n
        }
    };
    let plan = rungs(n, max_epochs, eta, min_epochs);
    obs.planned(n, &plan, short.as_ref())?;
    let mut alive: Vec<usize> = (0..n).collect();
    let mut out_of_time = false;
    'rungs: for (ri, &(_, epochs)) in plan.iter().enumerate() {
        for &i in &alive {
            advance(&all, p, &mut states, i, epochs, metric, budget, start, &mut epoch_secs, &mut out_of_time, obs)?;
            if out_of_time {
                break 'rungs;
            }
        }
        if let Some(&(keep, _)) = plan.get(ri + 1) {
            alive.sort_by(|&a, &b| states[b].best(metric).0.total_cmp(&states[a].best(metric).0).then(a.cmp(&b)));
            for &dropped in &alive[keep.min(alive.len())..] {
                // Its memory goes now; it will not train again.
                states[dropped].session = None;
            }
            alive.truncate(keep);
        }
    }

    let mut board: Vec<TrialSummary> = states
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.records.is_empty())
        .map(|(i, s)| {
            let (_, best_epoch) = s.best(metric);
            let b = &s.records[best_epoch.saturating_sub(1).min(s.records.len() - 1)];
            TrialSummary {
                trial: i,
                params: all[i].label(),
                epochs_run: s.records.len(),
                best_epoch,
                valid_hr10: b.valid_hr10,
                valid_ndcg10: b.valid_ndcg10,
                seconds: s.records.iter().map(|r| r.seconds).sum(),
            }
        })
        .collect();
    let score = |t: &TrialSummary| metric.pick(t.valid_hr10, t.valid_ndcg10);
    board.sort_by(|a, b| score(b).total_cmp(&score(a)).then(a.trial.cmp(&b.trial)));
    let winner =
        board.first().ok_or_else(|| TrainError::Config("the budget ended before any trial trained an epoch".into()))?;
    let (w, best_epoch) = (winner.trial, winner.best_epoch);

    let mut best_config = all[w].config.clone();
    // The winner's rates followed a schedule over the full epochs; stopping at the best epoch
    // must not squeeze it.
    best_config.train.schedule_epochs = best_config.train.schedule_span();
    best_config.train.epochs = best_epoch;
    best_config.train.patience = 0;
    // A live session holds the best epoch's model; otherwise (a resumed tune whose winner
    // finished in the log) the winner is trained again to its best epoch.
    let trained = match states[w].session.take() {
        Some(s) if states[w].ran >= best_epoch => s.finish()?,
        _ => {
            let mut s = session(&best_config, p)?;
            while s.epoch(&mut crate::observe::Silent)?.is_some() {}
            s.finish()?
        }
    };
    Ok(TuneOutcome { board, metric, best_config, trained, trials_planned: n, rungs: plan, out_of_time })
}

/// The mean epoch time so far (0 before the first epoch).
fn mean(secs: &[f64]) -> f64 {
    if secs.is_empty() {
        0.0
    } else {
        secs.iter().sum::<f64>() / secs.len() as f64
    }
}

/// Trains trial `i` until it has `epochs` validated epochs or is done, replaying logged epochs
/// into a new session first. Sets `out_of_time` and returns when the next epoch would end past
/// the budget.
#[allow(clippy::too_many_arguments)]
fn advance<'a>(
    all: &'a [Trial],
    p: &'a Prepared,
    states: &mut [State<'a>],
    i: usize,
    epochs: usize,
    metric: SelectMetric,
    budget: Duration,
    start: Instant,
    epoch_secs: &mut Vec<f64>,
    out_of_time: &mut bool,
    obs: &mut dyn TuneObserver,
) -> Result<(), TrainError> {
    loop {
        let st = &mut states[i];
        if st.done || st.records.len() >= epochs {
            return Ok(());
        }
        let est = st.records.last().map_or_else(|| mean(epoch_secs), |r| r.seconds);
        // Replayed epochs cost time too.
        let to_replay = st.records.len().saturating_sub(st.ran) as f64 * est;
        if start.elapsed().as_secs_f64() + est + to_replay > budget.as_secs_f64() {
            *out_of_time = true;
            return Ok(());
        }
        let s = match &mut st.session {
            Some(s) => s,
            slot => {
                st.ran = 0;
                slot.insert(session(&all[i].config, p)?)
            }
        };
        let Some(rec) = s.epoch(&mut crate::observe::Silent)? else {
            st.done = true;
            return Ok(());
        };
        st.ran += 1;
        if st.ran <= st.records.len() {
            continue;
        }
        let done = s.is_done();
        epoch_secs.push(rec.seconds);
        st.records.push(rec.clone());
        st.done = done;
        let line = TrialEpoch {
            trial: i,
            params: all[i].label(),
            epoch: rec.epoch,
            valid_hr10: rec.valid_hr10,
            valid_ndcg10: rec.valid_ndcg10,
            seconds: rec.seconds,
            done,
        };
        let best = st.best(metric);
        obs.epoch(&line, best)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rungs_cut_the_trials_by_eta_and_grow_the_epochs_to_the_full_count() {
        assert_eq!(rungs(27, 20, 3, 1), vec![(27, 1), (9, 2), (3, 7), (1, 20)]);
        assert_eq!(rung_epochs(&rungs(27, 20, 3, 1)), 27 + 9 + 3 * 5 + 13);
        // Two epochs at least before the first cut: one rung fewer, three trials trained in full.
        assert_eq!(rungs(27, 20, 3, 2), vec![(27, 2), (9, 7), (3, 20)]);
        assert_eq!(rungs(4, 6, 2, 1), vec![(4, 2), (2, 3), (1, 6)]);
        assert_eq!(rungs(1, 5, 3, 2), vec![(1, 5)]);
        assert_eq!(rungs(5, 1, 3, 2), vec![(5, 1)]);
        for n in 1..60 {
            for e in 1..25 {
                for min in 1..4 {
                    let r = rungs(n, e, 3, min);
                    assert_eq!(r[0].0, n);
                    assert!(r[0].1 >= min.min(e), "n {n} e {e} min {min}: {r:?}");
                    assert_eq!(r.last().unwrap().1, e, "n {n} e {e}: {r:?}");
                    assert!(r.windows(2).all(|w| w[0].1 < w[1].1 && w[0].0 > w[1].0), "n {n} e {e}: {r:?}");
                }
            }
        }
    }

    #[test]
    fn trials_start_with_the_config_as_written_then_distinct_valid_grid_points() {
        let cfg: Config = toml::from_str(
            "[data]\ndataset = \"ml-1m\"\n[model]\nmax_seq_len = 2\n[tune]\nmetric = \"hr@10\"\n\
             [tune.model]\nrecent = [0, 2, 3]\n[tune.train]\nlr = [0.001, 0.01]\n",
        )
        .unwrap();
        let t = trials(&cfg, 100).unwrap();
        // 6 grid points: recent 3 > max_seq_len is invalid (2 points), and (0, 0.001) is the
        // config as written.
        assert_eq!(t.len(), 4, "{:?}", t.iter().map(Trial::label).collect::<Vec<_>>());
        assert!(t[0].params.is_empty() && t[0].config.tune.is_none());
        assert!(t.iter().all(|x| x.config.train.select == SelectMetric::Hr10));
        for (i, a) in t.iter().enumerate() {
            assert!(t[i + 1..].iter().all(|b| b.config != a.config));
            assert!(a.config.model.recent <= 2);
        }
        let again = trials(&cfg, 100).unwrap();
        assert_eq!(t.iter().map(Trial::label).collect::<Vec<_>>(), again.iter().map(Trial::label).collect::<Vec<_>>());
        // A prefix does not depend on how many trials are asked for.
        assert_eq!(trials(&cfg, 2).unwrap()[1].label(), t[1].label());
        // Unknown keys are errors that name the key.
        let bad: Config = toml::from_str("[data]\ndataset = \"ml-1m\"\n[tune.train]\nlearning_rate = [0.1]\n").unwrap();
        let err = trials(&bad, 10).err().unwrap();
        assert!(err.contains("train.learning_rate"), "{err}");
        assert!(apply(&bad, &[("train.learning_rate".into(), toml::Value::Float(0.1))])
            .unwrap_err()
            .contains("learning_rate"));
    }
}
