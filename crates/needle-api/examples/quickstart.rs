//! needle from Rust: train a config, reopen the run, evaluate it and recall for two users.
//!
//! cargo run --release -p needle-api --example quickstart -- CONFIG DATA_DIR OUT

use needle_api::{read_config, train, Data, EvalOptions, Run, Silent, Stage, DEFAULT_EVAL_SEED};
use std::path::Path;

fn main() -> Result<(), needle_api::Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, config, data_dir, out] = &args[..] else {
        eprintln!("usage: quickstart CONFIG DATA_DIR OUT");
        std::process::exit(2);
    };
    let (data_dir, out) = (Path::new(data_dir), Path::new(out));
    let cfg = read_config(Path::new(config))?;
    let data = Data::load(&cfg, Some(data_dir), &mut |_, _| {})?;
    let trained = train(&cfg, &data, out, DEFAULT_EVAL_SEED, &mut Silent)?;
    println!(
        "trained {} epochs; test HR@10 {:.4}",
        trained.epochs.len(),
        trained.test.get(10).map_or(0.0, |a| a.hit_rate)
    );

    let run = Run::open(out, Some(data_dir))?;
    let report = run.evaluate(Stage::Test, &[10, 100], &EvalOptions::default(), &mut Silent)?;
    println!(
        "reopened: HR@10 {:.4}, HR@100 {:.4}",
        report.get(10).unwrap().hit_rate,
        report.get(100).unwrap().hit_rate
    );
    let top = run.recall_users(&["1", "2"], 5, false)?;
    for (q, user) in ["1", "2"].iter().enumerate() {
        println!("user {user}: {:?}", top.items(q));
    }
    let by_history = run.recall_histories(&[vec!["50", "181"]], 5, false)?;
    println!("history [50, 181]: {:?}", by_history.items(0));
    let items = run.item_vectors()?;
    println!("{} item vectors of dimension {}", items.ids.len(), items.dim);
    Ok(())
}
