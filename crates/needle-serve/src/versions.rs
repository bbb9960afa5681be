//! Several runs served side by side: each is a named version with a traffic weight, and every
//! user is routed to one version by a stable hash of their id, so a user sees one model for as
//! long as the weights stay as they are.
//!
//! A [`Versions`] value never changes; the server swaps a whole new one in for every change
//! (weights, a version added, reloaded or removed), so a request routes on one consistent
//! snapshot.

use crate::engine::Engine;
use crate::metrics::VersionStats;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One served run.
#[derive(Clone)]
pub struct Version {
    pub name: String,
    pub engine: Arc<Engine>,
    /// Share of traffic, relative to the other versions' weights; 0 = drained.
    pub weight: u32,
    /// Recall counts and latencies, kept across reloads of this version.
    pub stats: Arc<VersionStats>,
}

/// The versions being served, in the order they were added (the order routing walks).
#[derive(Clone)]
pub struct Versions {
    list: Vec<Version>,
    /// The weights before the last traffic change, for rollback.
    previous: Option<Vec<(String, u32)>>,
}

/// Why a change to the served versions was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum VersionError {
    /// No version has this name.
    Unknown(String),
    /// The change would leave the server in a state it must not be in.
    Refused(String),
}

impl std::fmt::Display for VersionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VersionError::Unknown(m) | VersionError::Refused(m) => f.write_str(m),
        }
    }
}

/// Version names go into metric labels and URLs.
pub fn check_name(name: &str) -> Result<(), VersionError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(VersionError::Refused(format!(
            "version name {name:?} must be 1 to 64 characters of letters, digits, '-', '_' or '.'"
        )))
    }
}

/// The routing hash of a user id: FNV-1a over the bytes, then a 64-bit finalizer, so that ids
/// differing only in their last characters (`u1`, `u2`, …) still spread over the whole range.
pub fn user_hash(id: &[u8]) -> u64 {
    needle_core::hash::fmix64(needle_core::hash::fnv1a64(needle_core::hash::FNV1A64_OFFSET, id))
}

impl Versions {
    /// One version with all the traffic.
    pub fn single(name: String, engine: Arc<Engine>) -> Versions {
        Versions { list: vec![Version { name, engine, weight: 1, stats: Arc::default() }], previous: None }
    }

    pub fn list(&self) -> &[Version] {
        &self.list
    }

    pub fn get(&self, name: &str) -> Option<&Version> {
        self.list.iter().find(|v| v.name == name)
    }

    /// The weights, by version, in routing order.
    pub fn weights(&self) -> Vec<(String, u32)> {
        self.list.iter().map(|v| (v.name.clone(), v.weight)).collect()
    }

    /// The weights a rollback returns to.
    pub fn previous_weights(&self) -> Option<&[(String, u32)]> {
        self.previous.as_deref()
    }

    /// The version with the largest share (the first of equals): what `/healthz` reports as
    /// the model, and what answers when a request cannot be routed by user.
    pub fn primary(&self) -> &Version {
        let mut best = &self.list[0];
        for v in &self.list[1..] {
            if v.weight > best.weight {
                best = v;
            }
        }
        best
    }

    /// The version that serves a routing key. Positions on the hash range are cut in routing
    /// order by cumulative weight, so a change of weights moves only the users whose position
    /// falls in a slice that changed owner.
    pub fn route(&self, key: u64) -> &Version {
        match slot(self.list.iter().map(|v| v.weight), key) {
            Some(i) => &self.list[i],
            // Unreachable while some version has a weight, which every constructor keeps.
            None => self.primary(),
        }
    }

    /// New weights: every version named gets its weight, the others 0. The current weights
    /// become the ones a rollback returns to.
    pub fn with_weights(&self, weights: &BTreeMap<String, u32>) -> Result<Versions, VersionError> {
        if let Some(name) = weights.keys().find(|n| self.get(n).is_none()) {
            return Err(VersionError::Unknown(format!("no version {name:?}; serving: {}", self.names())));
        }
        if weights.values().all(|&w| w == 0) {
            return Err(VersionError::Refused("the weights must give some version traffic".into()));
        }
        if weights.values().map(|&w| u64::from(w)).sum::<u64>() > u64::from(u32::MAX) {
            return Err(VersionError::Refused("the weights add up to more than 2^32 - 1".into()));
        }
        let mut next = self.clone();
        for v in &mut next.list {
            v.weight = weights.get(&v.name).copied().unwrap_or(0);
        }
        next.previous = Some(self.weights());
        Ok(next)
    }

    /// Back to the weights before the last change (and a second rollback undoes the first).
    /// Versions removed since get no weight; versions added since get 0.
    pub fn rolled_back(&self) -> Result<Versions, VersionError> {
        let Some(prev) = &self.previous else {
            return Err(VersionError::Refused("no earlier traffic split to roll back to".into()));
        };
        let weights: BTreeMap<String, u32> =
            prev.iter().filter(|(n, _)| self.get(n).is_some()).map(|(n, w)| (n.clone(), *w)).collect();
        self.with_weights(&weights).map_err(|e| {
            VersionError::Refused(format!("cannot roll back to {}: {e}", format_weights(prev.iter().cloned())))
        })
    }

    /// A new version, with no traffic until the weights give it some.
    pub fn with_added(&self, name: String, engine: Arc<Engine>) -> Result<Versions, VersionError> {
        check_name(&name)?;
        if self.get(&name).is_some() {
            return Err(VersionError::Refused(format!("version {name:?} exists; remove it first or reload it")));
        }
        let mut next = self.clone();
        next.list.push(Version { name, engine, weight: 0, stats: Arc::default() });
        Ok(next)
    }

    /// A version's engine replaced (a reload); its weight and counters stay.
    pub fn with_engine(&self, name: &str, engine: Arc<Engine>) -> Result<Versions, VersionError> {
        let mut next = self.clone();
        let v = next
            .list
            .iter_mut()
            .find(|v| v.name == name)
            .ok_or_else(|| VersionError::Unknown(format!("no version {name:?}; serving: {}", self.names())))?;
        v.engine = engine;
        Ok(next)
    }

    /// Without a drained version; returns the removed one. Some version always has traffic, so
    /// the last one can never be drained, and never removed.
    pub fn without(&self, name: &str) -> Result<(Versions, Version), VersionError> {
        let Some(at) = self.list.iter().position(|v| v.name == name) else {
            return Err(VersionError::Unknown(format!("no version {name:?}; serving: {}", self.names())));
        };
        if self.list[at].weight > 0 {
            return Err(VersionError::Refused(format!(
                "version {name:?} still has traffic (weight {}); drain it first by giving it weight 0 in POST /admin/traffic",
                self.list[at].weight
            )));
        }
        let mut next = self.clone();
        let removed = next.list.remove(at);
        Ok((next, removed))
    }

    /// The longest history any version reads (what the store keeps per user).
    pub fn max_seq_len(&self) -> usize {
        self.list.iter().map(|v| v.engine.max_seq_len).max().unwrap_or(0)
    }

    fn names(&self) -> String {
        self.list.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// The slot of `key` when the 64-bit range is cut into consecutive pieces of these relative
/// sizes; `None` when they are all zero.
pub fn slot(weights: impl Iterator<Item = u32> + Clone, key: u64) -> Option<usize> {
    let total: u64 = weights.clone().map(u64::from).sum();
    let point = ((u128::from(key) * u128::from(total)) >> 64) as u64;
    let mut upto = 0u64;
    for (i, w) in weights.enumerate() {
        upto += u64::from(w);
        if point < upto {
            return Some(i);
        }
    }
    None
}

/// `a=90, b=10`.
pub fn format_weights(w: impl IntoIterator<Item = (String, u32)>) -> String {
    w.into_iter().map(|(n, w)| format!("{n}={w}")).collect::<Vec<_>>().join(", ")
}

/// Parses `a=90,b=10` (the `--traffic` flag).
pub fn parse_weights(s: &str) -> Result<BTreeMap<String, u32>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, w) = part.split_once('=').ok_or_else(|| format!("{part:?} is not NAME=WEIGHT"))?;
        let w: u32 = w.trim().parse().map_err(|_| format!("weight of {name:?} is not a whole number: {w:?}"))?;
        if out.insert(name.trim().to_owned(), w).is_some() {
            return Err(format!("version {name:?} is named twice"));
        }
    }
    if out.is_empty() {
        return Err("no weights given (e.g. a=90,b=10)".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(weights: &[u32], users: usize) -> Vec<usize> {
        let mut counts = vec![0; weights.len()];
        for u in 0..users {
            counts[slot(weights.iter().copied(), user_hash(format!("u{u}").as_bytes())).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn the_hash_spreads_sequential_ids_evenly() {
        let c = shares(&[1; 10], 100_000);
        // 10,000 expected per decile; a binomial sd is ~95.
        assert!(c.iter().all(|&n| (9_500..=10_500).contains(&n)), "{c:?}");
        assert_eq!(user_hash(b"u1"), user_hash(b"u1"));
        assert_ne!(user_hash(b"u1"), user_hash(b"u2"));
    }

    #[test]
    fn weights_split_traffic_in_proportion() {
        let c = shares(&[90, 10], 10_000);
        assert!((800..=1_200).contains(&c[1]), "{c:?}");
        let c = shares(&[0, 1], 1_000);
        assert_eq!(c, vec![0, 1_000]);
        assert_eq!(slot([0u32, 0].into_iter(), 7), None);
        assert_eq!(slot([5u32].into_iter(), u64::MAX), Some(0));
    }

    #[test]
    fn changing_weights_moves_only_the_users_whose_slice_changed_owner() {
        let before: Vec<_> =
            (0..10_000).map(|u| slot([90u32, 10].into_iter(), user_hash(format!("u{u}").as_bytes()))).collect();
        let after: Vec<_> =
            (0..10_000).map(|u| slot([80u32, 20].into_iter(), user_hash(format!("u{u}").as_bytes()))).collect();
        // Everyone on the 10% version stays there; about a ninth of the others move to it.
        assert!(before.iter().zip(&after).all(|(b, a)| *b != Some(1) || *a == Some(1)));
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert!((800..=1_200).contains(&moved), "{moved}");
    }

    #[test]
    fn names_and_weights_are_checked() {
        assert!(check_name("v2.1-canary_b").is_ok());
        for bad in ["", "a b", "a/b", "a\"b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let w = parse_weights("a=90, b=10").unwrap();
        assert_eq!(w.into_iter().collect::<Vec<_>>(), vec![("a".into(), 90), ("b".into(), 10)]);
        assert!(parse_weights("a=90,a=10").unwrap_err().contains("twice"));
        assert!(parse_weights("a").unwrap_err().contains("NAME=WEIGHT"));
        assert!(parse_weights("a=-1").unwrap_err().contains("whole number"));
        assert!(parse_weights("").is_err());
    }
}
