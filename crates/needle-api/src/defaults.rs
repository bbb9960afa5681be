//! The config needle picks when none is given: the sequential model, with the values chosen on
//! MovieLens-1M for logs of more than about 2×10^5 training events and the values tuned on
//! MovieLens-100k below that (the size rule of `results/datasets.md`), and the loss chosen by
//! catalogue size (the full softmax up to its limit, sampled softmax with log-Q correction
//! above).

use needle_run::config::DataConfig;
use needle_run::Config;

/// Training events above which the larger sequential model is the default.
pub const LARGE_LOG_EVENTS: usize = 200_000;

/// `configs/ml-1m/sequential.toml` without its data, loss by catalogue size.
pub const SEQUENTIAL: &str = r#"
[model]
kind = "sequential"
dim = 128
max_seq_len = 200
blocks = 2
heads = 2
ffn = 128
user_features = []

[train]
epochs = 32
batch_size = 32
loss = "auto"
lr = 0.002
embedding_lr = 0.002
lr_schedule = "cosine"
temperature = 0.05
dropout = 0.2
input_dropout = 0.2
seed = 42
threads = 0
patience = 0
"#;

/// `configs/ml-100k/sequential-reg.toml` without its data, as changes to [`SEQUENTIAL`]: one
/// block of one head over the newest 50 items, a softer temperature, more input dropout, weight
/// decay, the epoch kept by validation NDCG@10.
fn sequential_small(cfg: &mut Config) {
    let (m, t) = (&mut cfg.model, &mut cfg.train);
    (m.max_seq_len, m.blocks, m.heads) = (50, 1, 1);
    (t.lr, t.embedding_lr, t.temperature) = (0.001, 0.005, 0.2);
    (t.input_dropout, t.weight_decay) = (0.3, 0.01);
    t.select = needle_run::config::SelectMetric::Ndcg10;
}

/// The default config for a log with `train_events` training events, reading `data`, and a line
/// that says which it is and why.
pub fn default_config(data: DataConfig, train_events: usize) -> (Config, String) {
    let mut cfg: Config = toml::from_str(&format!("[data]\ndataset = \"ml-1m\"\n{SEQUENTIAL}"))
        .expect("the built-in default config parses");
    let name = if train_events > LARGE_LOG_EVENTS {
        "sequential (the values of configs/ml-1m/sequential.toml)"
    } else {
        sequential_small(&mut cfg);
        "sequential-reg (the values of configs/ml-100k/sequential-reg.toml)"
    };
    cfg.data = data;
    let why = format!(
        "config: none given; picked {name} for {train_events} training events (the larger model above {LARGE_LOG_EVENTS}), loss by catalogue size"
    );
    (cfg, why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use needle_run::config::LossKind;

    /// The defaults are the shipped configs' values, but for the loss (chosen by catalogue size
    /// here, where the shipped ones name the full softmax their catalogues resolve to anyway) and
    /// the threads (all cores here).
    #[test]
    fn defaults_match_the_shipped_configs() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        for (events, file) in [(LARGE_LOG_EVENTS + 1, "ml-1m/sequential.toml"), (1000, "ml-100k/sequential-reg.toml")] {
            let shipped = crate::read_config(&root.join(file)).unwrap();
            let (mut cfg, why) = default_config(shipped.data.clone(), events);
            assert!(why.contains(file), "{why}");
            assert_eq!(cfg.train.loss, LossKind::Auto);
            assert_eq!(cfg.train.threads, 0);
            cfg.train.loss = shipped.train.loss;
            cfg.train.threads = shipped.train.threads;
            assert_eq!(cfg, shipped, "{file}");
        }
        assert_eq!(LossKind::Auto.resolve(needle_run::config::FULL_SOFTMAX_MAX_ITEMS).name(), "full");
    }
}
