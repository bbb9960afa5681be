//! `needle bench train`: training throughput measured side by side in one process.

use crate::commands::read_config_str;
use anyhow::Result;
use needle_data::Vocab;
use needle_eval::Lists;
use needle_model::rng::Rng;
use needle_model::tower::Tower;
use needle_train::config::{LossKind, ModelConfig, TrainParams};
use needle_train::model::Model;
use needle_train::prepare::{prepare, Prepared};
use needle_train::run::load_data;
use needle_train::trainer::{build_model, targets_of, training_samples, Trainer};
use needle_train::Config;
use std::path::Path;
use std::time::Instant;

const DEFAULT_CONFIG: &str = include_str!("../../../configs/ml-1m/youtubednn.toml");

/// torch-rechub's YouTubeDNN example settings: embedding 16, user MLP 128-64-16, user id and
/// profile features, 3 popularity negatives per sample, batch 2048, history 50.
fn reference_config(base: &Config) -> Config {
    let mut c = base.clone();
    c.model = ModelConfig {
        dim: 16,
        hidden: vec![128, 64],
        user_features: ["user_id", "gender", "age", "occupation", "zip"].map(String::from).to_vec(),
        feature_dim: 16,
        example_age: false,
        max_seq_len: 50,
        ..ModelConfig::default()
    };
    c.train = TrainParams {
        batch_size: 2048,
        loss: LossKind::Sampled,
        negatives: 3,
        shared_negatives: false,
        ..TrainParams::default()
    };
    c
}

struct Timing {
    median_ms: f64,
    samples_per_sec: f64,
    touched_rows: usize,
    /// Mean ms per step assembling batches, in forward + backward, in the optimizer.
    phases_ms: [f64; 3],
    /// Samples/s over the timed steps with batches assembled in line, and over as many steps
    /// with batches assembled on the producer thread (as `needle train` does).
    inline_rate: f64,
    producer_rate: f64,
}

/// Times `steps` optimizer steps after 3 warm-up steps; reports the median step.
fn time_steps(cfg: &Config, p: &Prepared, steps: usize) -> Result<Timing> {
    let mut rng = Rng::new(cfg.train.seed);
    match build_model(cfg, p, &mut rng)? {
        Model::Deep(m) => time_tower(cfg, p, *m, steps, &mut rng),
        Model::Fm(m) => time_tower(cfg, p, *m, steps, &mut rng),
        Model::Mind(m) => time_tower(cfg, p, *m, steps, &mut rng),
        Model::Seq(m) => time_tower(cfg, p, *m, steps, &mut rng),
        Model::Popularity { .. } | Model::Neighbors(_) => {
            anyhow::bail!("{:?} is counted from the log in one pass and has no training step", cfg.model.kind)
        }
    }
}

fn time_tower<T: Tower>(cfg: &Config, p: &Prepared, model: T, steps: usize, rng: &mut Rng) -> Result<Timing> {
    let mut samples = training_samples(cfg, p, rng);
    rng.shuffle(&mut samples);
    let mut trainer = Trainer::new(cfg, p, model)?;
    let b = cfg.train.batch_size;
    let mut times = Vec::with_capacity(steps);
    let mut touched = Vec::with_capacity(steps);
    let mut batches = samples.chunks_exact(b).cycle();
    let mut warm = [0.0; 3];
    for i in 0..steps + 3 {
        if i == 3 {
            warm = trainer.phase_seconds();
        }
        let batch = batches.next().ok_or_else(|| anyhow::anyhow!("fewer samples than one batch"))?;
        let t0 = Instant::now();
        let loss = trainer.step(batch, rng);
        anyhow::ensure!(loss.is_finite(), "loss diverged during the benchmark");
        if i >= 3 {
            // Per target: a sequential model's sample is a window of many.
            times.push(t0.elapsed().as_secs_f64() / targets_of(cfg, batch) as f64);
            touched.push(trainer.touched_item_rows());
        }
    }
    let total = trainer.phase_seconds();
    // Whole passes over the same steps, in line and with the producer thread, alternated twice
    // so that neither order nor a warm-up favours one; the faster pass of each counts.
    let n = (steps * b).min(samples.len() / b * b);
    let targets = targets_of(cfg, &samples[..n]) as f64;
    let (mut inline_rate, mut producer_rate) = (0.0f64, 0.0f64);
    for _ in 0..2 {
        let t0 = Instant::now();
        for chunk in samples[..n].chunks(b) {
            anyhow::ensure!(trainer.step(chunk, rng).is_finite(), "loss diverged during the benchmark");
        }
        inline_rate = inline_rate.max(targets / t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        trainer.epoch(&samples[..n], b, rng, |_, _, loss| {
            anyhow::ensure!(loss.is_finite(), "loss diverged during the benchmark");
            Ok(())
        })?;
        producer_rate = producer_rate.max(targets / t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    // The median step's seconds per target; its step time is quoted for a batch of the mean size.
    let per_target = times[times.len() / 2];
    let mean_batch = targets / (n / b).max(1) as f64;
    touched.sort_unstable();
    let phases_ms = [0, 1, 2].map(|k| (total[k] - warm[k]) * 1e3 / steps as f64);
    Ok(Timing {
        median_ms: per_target * mean_batch * 1e3,
        samples_per_sec: 1.0 / per_target,
        touched_rows: touched[touched.len() / 2],
        phases_ms,
        inline_rate,
        producer_rate,
    })
}

/// A synthetic log over a table of `rows` items, 60 events per user, with power-law
/// popularity over `active` distinct items scattered across the table. With `active` fixed,
/// every table size sees the same number of distinct rows per step, so any difference in step
/// time comes from the table size itself.
fn synthetic(rows: usize, active: usize, users: usize, rng: &mut Rng) -> Prepared {
    let per_user = 60;
    let mut train = Lists::new();
    let mut counts = vec![0u64; rows + 1];
    let mut ts = Vec::with_capacity(users * per_user);
    for _ in 0..users {
        let mut seq = Vec::with_capacity(per_user);
        for t in 0..per_user {
            // Power law over ranks: a few items are hot, most are cold.
            let rank = ((active as f64).powf(rng.uniform() as f64) as usize).clamp(1, active);
            // Spread ranks over the table (a multiplicative hash; a bijection when active == rows).
            let r = if active == rows { rank } else { (rank * 2_654_435_761) % rows + 1 };
            seq.push(r as u32);
            counts[r] += 1;
            ts.push(t as i64);
        }
        train.push(seq);
    }
    let mut empty = Lists::new();
    (0..users).for_each(|_| empty.push([]));
    Prepared {
        items: Vocab::new(),
        users: Vocab::new(),
        user_feature_names: Vec::new(),
        user_feature_vocabs: Vec::new(),
        user_feats: Vec::new(),
        item_features: Vec::new(),
        item_bags: Vec::new(),
        train,
        train_ts: ts,
        valid: empty.clone(),
        valid_ts: Vec::new(),
        test: empty,
        item_counts: counts,
        cold_rows: 0,
        unembedded_items: 0,
        item_hash: None,
        train_min_ts: 0,
        train_max_ts: per_user as i64,
        user_raw: (0..users).map(|u| u.to_string()).collect(),
    }
}

pub fn train(data_dir: Option<&Path>, steps: usize, small: bool) -> Result<()> {
    let steps = steps.max(1);
    let default = read_config_str(DEFAULT_CONFIG, "configs/ml-1m/youtubednn.toml")?;
    let reference = reference_config(&default);
    let (ds, split) = load_data(&default, data_dir)?;
    println!("training step benchmark, {} threads, median of {steps} steps\n", rayon::current_num_threads());
    println!("| workload | item rows | rows touched / step | batch | ms / step | samples / s |");
    println!("|---|---|---|---|---|---|");
    let p_ref = prepare(&ds, &split, &reference)?;
    let t = time_steps(&reference, &p_ref, steps)?;
    println!(
        "| ML-1M, reference settings (emb 16, MLP 128-64-16, 3 sampled negatives/sample) | {} | {} | {} | {:.2} | {:.0} |",
        p_ref.n_item_rows(),
        t.touched_rows,
        reference.train.batch_size,
        t.median_ms,
        t.samples_per_sec
    );
    let p_def = prepare(&ds, &split, &default)?;
    let t = time_steps(&default, &p_def, steps)?;
    println!(
        "| ML-1M, default config (emb 64, MLP 256-64, full softmax) | {} | {} | {} | {:.2} | {:.0} |",
        p_def.n_item_rows(),
        t.touched_rows,
        default.train.batch_size,
        t.median_ms,
        t.samples_per_sec
    );
    let mut synth = reference.clone();
    synth.model.user_features.clear();
    // The same 10^4 active items in a 10^4-row and a 10^7-row table isolate the cost of the
    // table size; the power law over all 10^7 rows shows a realistic spread of touched rows.
    let mut cases = vec![(10_000, 10_000, "10^4 active items")];
    if !small {
        cases.push((10_000_000, 10_000, "10^4 active items"));
        cases.push((10_000_000, 10_000_000, "power law over all rows"));
    }
    for (rows, active, what) in cases {
        let p = synthetic(rows, active, 20_000, &mut Rng::new(7));
        let t = time_steps(&synth, &p, steps)?;
        println!(
            "| synthetic, reference settings without user features, {what} | {rows} | {} | {} | {:.2} | {:.0} |",
            t.touched_rows, synth.train.batch_size, t.median_ms, t.samples_per_sec
        );
    }
    Ok(())
}

/// `needle bench train --config C`: the config's model and training settings on ML-1M and on
/// the config's own (large) dataset, in one process, with where a step's time goes.
pub fn train_at_scale(config: &Path, data_dir: Option<&Path>, steps: usize) -> Result<()> {
    let steps = steps.max(1);
    let big = crate::commands::read_config(config)?;
    let t0 = Instant::now();
    let (ds, split) = load_data(&big, data_dir)?;
    let p_big = prepare(&ds, &split, &big)?;
    drop((ds, split));
    let ready = t0.elapsed().as_secs_f64();
    // The same model on ML-1M, with as many of its profile features as the config reads.
    let mut small = big.clone();
    small.data = read_config_str(DEFAULT_CONFIG, "configs/ml-1m/youtubednn.toml")?.data;
    let ml_features = ["gender", "age", "occupation", "zip"];
    small.model.user_features = ml_features.iter().take(big.model.user_features.len()).map(|s| s.to_string()).collect();
    small.model.max_items = 0;
    let (ds, split) = load_data(&small, data_dir)?;
    let p_small = prepare(&ds, &split, &small)?;
    println!(
        "training step at scale, {} threads, median of {steps} steps; {} loaded and prepared in {ready:.1}s\n",
        rayon::current_num_threads(),
        config.display()
    );
    println!("| data | item rows | training events | rows touched / step | batch | ms / step | samples / s | assemble ms | forward + backward ms | optimizer ms | samples / s, all steps, in line | samples / s, all steps, producer thread |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rates = Vec::new();
    for (name, cfg, p) in [("ML-1M", &small, &p_small), ("config's data", &big, &p_big)] {
        let t = time_steps(cfg, p, steps)?;
        println!(
            "| {name} | {} | {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |",
            p.n_item_rows(),
            p.train.items.len(),
            t.touched_rows,
            cfg.train.batch_size,
            t.median_ms,
            t.samples_per_sec,
            t.phases_ms[0],
            t.phases_ms[1],
            t.phases_ms[2],
            t.inline_rate,
            t.producer_rate
        );
        rates.push((t.samples_per_sec, t.producer_rate));
    }
    if let [(a, pa), (b, pb)] = rates[..] {
        println!(
            "\nsamples/s on the config's data: {:.0}% of ML-1M's (median step), {:.0}% over all steps with the producer thread",
            100.0 * b / a,
            100.0 * pb / pa
        );
    }
    Ok(())
}
