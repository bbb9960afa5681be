//! Text configuration: training configs, dataset schemas and index parameter strings.

use std::path::Path;
use std::str::FromStr;

use needle_data::Schema;
use needle_index::IndexParams;
use needle_run::Config;

use crate::selector;

/// A training config as `needle train` reads it: parsed, then validated. A valid config is also
/// written the way a run's manifest stores it and must read back as valid, with the same text,
/// or a trained run could not be opened again.
fn training_config(text: &str) -> bool {
    let Ok(mut cfg) = toml::from_str::<Config>(text) else {
        return false;
    };
    if cfg.validate().is_err() {
        return false;
    }
    cfg.resolve_paths(Path::new("/runs/fuzz"));
    let written = match toml::to_string_pretty(&cfg) {
        Ok(w) => w,
        Err(e) => panic!("a valid config cannot be written: {e}: {cfg:?}"),
    };
    let back: Config = match toml::from_str(&written) {
        Ok(c) => c,
        Err(e) => panic!("a written config does not parse: {e}\n{written}"),
    };
    if let Err(e) = back.validate() {
        panic!("a written config is no longer valid: {e}\n{written}");
    }
    assert_eq!(toml::to_string_pretty(&back).ok().as_deref(), Some(written.as_str()), "a config changed on rereading");
    true
}

/// A dataset schema as the loaders read it; a valid one must survive being written out again.
fn schema(text: &str) -> bool {
    let path = Path::new("fuzz.toml");
    let Ok(s) = Schema::from_toml(text, path) else {
        return false;
    };
    let written = match toml::to_string(&s) {
        Ok(w) => w,
        Err(e) => panic!("a valid schema cannot be written: {e}: {s:?}"),
    };
    match Schema::from_toml(&written, path) {
        Ok(back) => assert_eq!(back, s, "a schema changed through its own text"),
        Err(e) => panic!("a written schema is not valid: {e}\n{written}"),
    }
    true
}

/// An index parameter string (`needle index build --index ...`); what parses must print as a
/// string that parses to the same parameters.
fn index_params(text: &str) -> bool {
    let Ok(p) = IndexParams::from_str(text) else {
        return false;
    };
    let shown = p.to_string();
    match IndexParams::from_str(&shown) {
        Ok(back) => assert_eq!(back, p, "{shown:?} does not name the parameters it was printed from"),
        Err(e) => panic!("printed parameters {shown:?} do not parse: {e}"),
    }
    true
}

/// A channel file (`needle eval/serve --channels`): a valid one must share out any `k` exactly
/// and mix candidate lists into at most `k` distinct items, each found by some channel.
fn channels(text: &str) -> bool {
    use needle_run::channels::{mix, ChannelsConfig, MixScratch};
    let Ok(cfg) = toml::from_str::<ChannelsConfig>(text) else {
        return false;
    };
    if cfg.validate().is_err() {
        return false;
    }
    let n = cfg.channels.len();
    for k in [0, 1, 7, 100] {
        let shares = cfg.shares(k);
        assert_eq!(shares.iter().sum::<usize>(), k, "shares of {k} over {n} channels: {shares:?}");
    }
    // Overlapping candidate lists: channel c proposes items c, c + 1, ..., c + 9.
    let lists: Vec<Vec<(u32, f32)>> = (0..n as u32).map(|c| (c..c + 10).map(|i| (i, -(i as f32))).collect()).collect();
    let refs: Vec<&[(u32, f32)]> = lists.iter().map(Vec::as_slice).collect();
    let mut out = Vec::new();
    mix(&cfg, &refs, 8, &mut MixScratch::default(), &mut out);
    assert!(out.len() <= 8, "{} items for k = 8", out.len());
    let mut items: Vec<u32> = out.iter().map(|m| m.item).collect();
    items.sort_unstable();
    items.dedup();
    assert_eq!(items.len(), out.len(), "a mixed list repeats an item");
    assert!(out.iter().all(|m| m.found_by != 0), "an item no channel found");
    true
}

/// Text configuration parsers. Selector modulo 3: 0 the training config (`configs/*.toml`) and
/// the channel file, 1 a dataset schema, 2 an index parameter string. Input that is not UTF-8 is rejected as the
/// readers reject it.
pub fn config_toml(data: &[u8]) -> bool {
    let (sel, body) = selector(data);
    let Ok(text) = std::str::from_utf8(body) else {
        return false;
    };
    match sel % 3 {
        0 => {
            let training = training_config(text);
            channels(text) || training
        }
        1 => schema(text),
        _ => index_params(text),
    }
}
