//! Recall channels: several candidate sources for one request, mixed into one list.
//!
//! A production recall stage rarely trusts one model. Each channel proposes its own ranked
//! candidates — a two-tower run, an item-to-item run (transitions, item-CF), the items nearest
//! the user's newest items in a run's item-vector space, plain popularity, the catalogue's
//! newest items — and a merge rule
//! makes one de-duplicated list out of them, remembering which channels found each item.
//!
//! The channel file (TOML) is read by `needle eval --channels` (offline, over the test
//! targets) and by `needle serve --channels` (online), so both mix exactly the same way:
//!
//! ```toml
//! merge = "quota"          # or "rrf" (reciprocal rank fusion)
//!
//! [[channel]]
//! name = "youtubednn"
//! kind = "run"             # the run's own recall: user tower + index, or its neighbour lists
//! run = "runs/youtubednn"
//! quota = 50               # share of the k slots (relative); the weight under "rrf"
//!
//! [[channel]]
//! name = "similar"
//! kind = "similar"         # items nearest the user's `recent` newest items, by item vector
//! run = "runs/youtubednn"
//! recent = 3
//! quota = 20
//!
//! [[channel]]
//! name = "popular"
//! kind = "popularity"      # training counts of the first channel's run
//! quota = 10
//!
//! [[channel]]
//! name = "fresh"
//! kind = "newest"          # items published while serving, then by first training event
//! quota = 10
//! ```

use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The order of a `newest` channel over trained items: the rows with training events, latest
/// first event first, lower row first among equals. `needle eval` and `needle serve` both
/// rank by it.
pub fn newest_rows(first_seen: &[i64], item_counts: &[u64]) -> Vec<u32> {
    let mut rows: Vec<u32> = (1..first_seen.len()).filter(|&r| item_counts[r] > 0).map(|r| r as u32).collect();
    rows.sort_by(|&a, &b| first_seen[b as usize].cmp(&first_seen[a as usize]).then(a.cmp(&b)));
    rows
}

/// At most this many channels (each item's finders are a bit set).
pub const MAX_CHANNELS: usize = 64;

/// The constant of reciprocal rank fusion, `1 / (RRF_K + rank)`: 60, the value of the paper that
/// introduced it (Cormack et al., 2009), which damps the weight of the very first ranks.
pub const DEFAULT_RRF_K: f64 = 60.0;

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MergeRule {
    /// Each channel fills its share of the slots with its best items not yet taken; slots a
    /// channel cannot fill go to the others' next items, in turn.
    #[default]
    Quota,
    /// Every item scores `Σ quota / (rrf_k + rank)` over the channels that found it.
    Rrf,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// The run's own recall: a two-tower run's user tower searching its items, or an
    /// item-to-item run's neighbour lists.
    Run,
    /// The items nearest (by inner product of the run's item vectors) to the user's newest
    /// `recent` history items, each candidate scored by its best match.
    Similar,
    /// The most trained-on items.
    Popularity,
    /// The catalogue's newest items: those published while serving (newest first), then the
    /// trained items by the time of their first training event, latest first.
    Newest,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    pub name: String,
    pub kind: ChannelKind,
    /// The run the channel reads (`run` and `similar`); relative paths are taken from the
    /// current directory.
    pub run: Option<PathBuf>,
    /// Share of the k slots (`quota`), or weight (`rrf`); relative, so 50/30/20 and 5/3/2 mix alike.
    pub quota: f64,
    /// Newest history items a `similar` channel starts from.
    #[serde(default = "default_recent")]
    pub recent: usize,
}

fn default_recent() -> usize {
    3
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelsConfig {
    #[serde(default)]
    pub merge: MergeRule,
    #[serde(default = "default_rrf_k")]
    pub rrf_k: f64,
    #[serde(rename = "channel")]
    pub channels: Vec<ChannelSpec>,
}

fn default_rrf_k() -> f64 {
    DEFAULT_RRF_K
}

impl ChannelsConfig {
    /// Reads and checks a channel file.
    pub fn read(path: &Path) -> Result<ChannelsConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let cfg: ChannelsConfig = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        cfg.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.channels.is_empty() {
            return Err("no [[channel]] given".into());
        }
        if self.channels.len() > MAX_CHANNELS {
            return Err(format!("{} channels; at most {MAX_CHANNELS}", self.channels.len()));
        }
        if !(self.rrf_k.is_finite() && self.rrf_k >= 0.0) {
            return Err(format!("rrf_k must be a finite number ≥ 0, got {}", self.rrf_k));
        }
        let mut names = HashSet::new();
        for c in &self.channels {
            if c.name.is_empty() {
                return Err("a channel has an empty name".into());
            }
            if !names.insert(c.name.as_str()) {
                return Err(format!("channel name `{}` is used twice", c.name));
            }
            if !(c.quota.is_finite() && c.quota > 0.0) {
                return Err(format!("channel `{}`: quota must be a positive number, got {}", c.name, c.quota));
            }
            match c.kind {
                ChannelKind::Run | ChannelKind::Similar if c.run.is_none() => {
                    return Err(format!("channel `{}` ({:?}) needs `run = \"DIR\"`", c.name, c.kind));
                }
                ChannelKind::Popularity | ChannelKind::Newest if c.run.is_some() => {
                    return Err(format!(
                        "channel `{}`: {:?} reads the first run's item counts and takes no `run`",
                        c.name, c.kind
                    ));
                }
                ChannelKind::Similar if c.recent == 0 => {
                    return Err(format!("channel `{}`: recent must be at least 1", c.name));
                }
                _ => {}
            }
        }
        if !self.channels.iter().any(|c| c.run.is_some()) {
            return Err("at least one channel must name a run (popularity counts come from it)".into());
        }
        Ok(())
    }

    /// The first run named by a channel: the one whose vocabulary, counts and store the mix uses.
    pub fn base_run(&self) -> &Path {
        self.channels.iter().find_map(|c| c.run.as_deref()).expect("validated: some channel names a run")
    }

    /// How many of `k` slots each channel fills under the quota rule: proportional to its quota,
    /// rounded by largest remainder (ties to the earlier channel), summing to `k`.
    pub fn shares(&self, k: usize) -> Vec<usize> {
        let total: f64 = self.channels.iter().map(|c| c.quota).sum();
        let exact: Vec<f64> = self.channels.iter().map(|c| k as f64 * c.quota / total).collect();
        let mut shares: Vec<usize> = exact.iter().map(|&x| x.floor() as usize).collect();
        let mut left = k - shares.iter().sum::<usize>().min(k);
        let mut order: Vec<usize> = (0..shares.len()).collect();
        order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())).then(a.cmp(&b)));
        for &c in order.iter().cycle().take(order.len() * 2) {
            if left == 0 {
                break;
            }
            shares[c] += 1;
            left -= 1;
        }
        shares
    }
}

/// One item of a mixed list.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mixed {
    pub item: u32,
    /// The channel's own score under `quota` (of the channel that placed it), the fused score
    /// under `rrf`.
    pub score: f32,
    /// Bit `c` set when channel `c`'s candidates held the item.
    pub found_by: u64,
}

/// Reusable buffers of [`mix`].
#[derive(Default)]
pub struct MixScratch {
    taken: HashSet<u32>,
    fused: Vec<(u32, f64, u64)>,
}

/// Mixes the channels' ranked candidates (`lists[c]`: `(item, score)`, best first, no
/// duplicates within a list) into at most `k` distinct items, best first.
pub fn mix(cfg: &ChannelsConfig, lists: &[&[(u32, f32)]], k: usize, scratch: &mut MixScratch, out: &mut Vec<Mixed>) {
    debug_assert_eq!(lists.len(), cfg.channels.len());
    out.clear();
    let finders = |item: u32| -> u64 {
        lists.iter().enumerate().filter(|(_, l)| l.iter().any(|&(i, _)| i == item)).fold(0, |m, (c, _)| m | 1 << c)
    };
    match cfg.merge {
        MergeRule::Quota => {
            let taken = &mut scratch.taken;
            taken.clear();
            let shares = cfg.shares(k);
            let mut next = vec![0usize; lists.len()];
            // Each channel's share first, then round robin over what is left.
            for (c, list) in lists.iter().enumerate() {
                let mut placed = 0;
                while placed < shares[c] && next[c] < list.len() {
                    let (item, score) = list[next[c]];
                    next[c] += 1;
                    if taken.insert(item) {
                        out.push(Mixed { item, score, found_by: 0 });
                        placed += 1;
                    }
                }
            }
            let mut active = true;
            while out.len() < k && active {
                active = false;
                for (c, list) in lists.iter().enumerate() {
                    while next[c] < list.len() && out.len() < k {
                        let (item, score) = list[next[c]];
                        next[c] += 1;
                        active = true;
                        if taken.insert(item) {
                            out.push(Mixed { item, score, found_by: 0 });
                            break;
                        }
                    }
                }
            }
        }
        MergeRule::Rrf => {
            let fused = &mut scratch.fused;
            fused.clear();
            for (c, list) in lists.iter().enumerate() {
                let w = cfg.channels[c].quota;
                for (rank, &(item, _)) in list.iter().enumerate() {
                    fused.push((item, w / (cfg.rrf_k + rank as f64 + 1.0), 1 << c));
                }
            }
            fused.sort_unstable_by_key(|&(item, _, _)| item);
            let mut w = 0;
            for r in 0..fused.len() {
                if w > 0 && fused[w - 1].0 == fused[r].0 {
                    fused[w - 1].1 += fused[r].1;
                    fused[w - 1].2 |= fused[r].2;
                } else {
                    fused[w] = fused[r];
                    w += 1;
                }
            }
            fused.truncate(w);
            fused.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            out.extend(fused.iter().take(k).map(|&(item, s, found_by)| Mixed { item, score: s as f32, found_by }));
            return;
        }
    }
    for m in out.iter_mut() {
        m.found_by = finders(m.item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(merge: &str, quotas: &[f64]) -> ChannelsConfig {
        let mut text = format!("merge = \"{merge}\"\n");
        for (c, q) in quotas.iter().enumerate() {
            text += &format!("[[channel]]\nname = \"c{c}\"\nkind = \"run\"\nrun = \"r{c}\"\nquota = {q}\n");
        }
        let cfg: ChannelsConfig = toml::from_str(&text).unwrap();
        cfg.validate().unwrap();
        cfg
    }

    #[test]
    fn shares_are_proportional_and_sum_to_k() {
        let c = cfg("quota", &[50.0, 30.0, 20.0]);
        assert_eq!(c.shares(100), vec![50, 30, 20]);
        assert_eq!(c.shares(10), vec![5, 3, 2]);
        let c = cfg("quota", &[1.0, 1.0, 1.0]);
        assert_eq!(c.shares(10), vec![4, 3, 3]);
        assert_eq!(c.shares(1), vec![1, 0, 0]);
        for k in 0..50 {
            assert_eq!(c.shares(k).iter().sum::<usize>(), k);
        }
    }

    #[test]
    fn quota_fills_shares_then_takes_the_rest_in_turn() {
        let c = cfg("quota", &[1.0, 1.0]);
        let a = [(1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6)];
        // b repeats a's best: the duplicate is skipped, not counted against b's share.
        let b = [(1, 0.5), (7, 0.4), (8, 0.3)];
        let mut out = Vec::new();
        mix(&c, &[&a, &b], 4, &mut MixScratch::default(), &mut out);
        let items: Vec<u32> = out.iter().map(|m| m.item).collect();
        assert_eq!(items, vec![1, 2, 7, 8]);
        assert_eq!(out[0].found_by, 0b11);
        assert_eq!(out[2].found_by, 0b10);
        assert_eq!(out[2].score, 0.4);
        // A short channel's slots go to the other one.
        let short = [(9, 0.1)];
        mix(&c, &[&a, &short], 4, &mut MixScratch::default(), &mut out);
        let items: Vec<u32> = out.iter().map(|m| m.item).collect();
        assert_eq!(items, vec![1, 2, 9, 3]);
        // Never more than the distinct candidates.
        mix(&c, &[&short, &short], 5, &mut MixScratch::default(), &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn rrf_sums_reciprocal_ranks_weighted_by_quota() {
        let c = cfg("rrf", &[2.0, 1.0]);
        let a = [(1, 0.0), (2, 0.0)];
        let b = [(2, 0.0), (3, 0.0)];
        let mut out = Vec::new();
        mix(&c, &[&a, &b], 3, &mut MixScratch::default(), &mut out);
        let k = DEFAULT_RRF_K;
        let expect =
            [(2, 2.0 / (k + 2.0) + 1.0 / (k + 1.0), 0b11), (1, 2.0 / (k + 1.0), 0b01), (3, 1.0 / (k + 2.0), 0b10)];
        assert_eq!(out.len(), 3);
        for (m, (item, s, f)) in out.iter().zip(expect) {
            assert_eq!((m.item, m.found_by), (item, f));
            assert!((m.score as f64 - s).abs() < 1e-6);
        }
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let bad =
            |text: &str| toml::from_str::<ChannelsConfig>(text).map_err(|e| e.to_string()).and_then(|c| c.validate());
        assert!(bad("merge = \"quota\"\nchannel = []").unwrap_err().contains("no [[channel]]"));
        let e = bad("[[channel]]\nname = \"a\"\nkind = \"run\"\nquota = 1").unwrap_err();
        assert!(e.contains("needs `run"), "{e}");
        let e = bad("[[channel]]\nname = \"a\"\nkind = \"run\"\nrun = \"r\"\nquota = 0").unwrap_err();
        assert!(e.contains("positive"), "{e}");
        let e =
            bad("[[channel]]\nname = \"a\"\nkind = \"run\"\nrun = \"r\"\nquota = 1\n[[channel]]\nname = \"a\"\nkind = \"popularity\"\nquota = 1")
                .unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = bad("[[channel]]\nname = \"p\"\nkind = \"popularity\"\nquota = 1").unwrap_err();
        assert!(e.contains("at least one channel must name a run"), "{e}");
        let e = bad("[[channel]]\nname = \"a\"\nkind = \"vectors\"\nrun = \"r\"\nquota = 1").unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
    }

    #[test]
    fn newest_rows_put_the_latest_first_event_first_and_skip_untrained_rows() {
        // Row 0 is padding; row 3 has no training event; rows 1 and 4 tie.
        let first = [0, 500, 900, 0, 500];
        let counts = [0, 2, 1, 0, 7];
        assert_eq!(newest_rows(&first, &counts), vec![2, 1, 4]);
    }
}
