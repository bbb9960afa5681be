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

/// Text configuration parsers. Selector modulo 3: 0 the training config (`configs/*.toml`), 1 a
/// dataset schema, 2 an index parameter string. Input that is not UTF-8 is rejected as the
/// readers reject it.
pub fn config_toml(data: &[u8]) -> bool {
    let (sel, body) = selector(data);
    let Ok(text) = std::str::from_utf8(body) else {
        return false;
    };
    match sel % 3 {
        0 => training_config(text),
        1 => schema(text),
        _ => index_params(text),
    }
}
