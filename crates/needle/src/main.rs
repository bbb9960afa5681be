//! `needle`: train, evaluate and query two-tower retrieval models from the command line.

mod bench;
mod commands;
mod report;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "needle",
    version,
    about = "Deep-retrieval recommender: two-tower training, evaluation and recall"
)]
struct Cli {
    /// Worker threads (default: the config's `train.threads`, else all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model from a config and save it as a run directory; ends with a test evaluation.
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Folder holding the dataset (or its parent); default: $NEEDLE_DATA_DIR, else ./data.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Run directory to create.
        #[arg(long)]
        out: PathBuf,
        /// Download the dataset into the data folder first if it is not there.
        #[arg(long)]
        download: bool,
        /// Replace an existing run directory.
        #[arg(long)]
        force: bool,
        /// Skip malformed input rows (and count them) instead of stopping at the first one.
        #[arg(long)]
        skip_bad_rows: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Evaluate a run on its test targets over the full item corpus; writes RUN/metrics.json.
    Eval {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Keep the user's known items in the ranking (by default they are excluded).
        #[arg(long)]
        keep_seen: bool,
        /// Cut-offs, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
        k: Vec<usize>,
    },
    /// Print the top-K items for users: `user<TAB>item,item,...`, best first.
    Recall {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// `all`, or raw user ids separated by commas.
        #[arg(long, default_value = "all")]
        users: String,
        #[arg(long, default_value_t = 100)]
        k: usize,
        /// Keep the user's known items in the ranking.
        #[arg(long)]
        keep_seen: bool,
    },
    /// Print a markdown table of several evaluated runs (quality at K = 10/50/100, time, memory).
    Report {
        /// Run directories, each with model.toml and metrics.json.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
    /// Dataset utilities.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// Benchmarks that print a table.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Download a MovieLens dataset from GroupLens and verify its checksum.
    Download {
        /// `ml-1m` or `ml-100k`.
        name: String,
        #[arg(long, default_value = "data")]
        to: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Training throughput on ML-1M (reference and default configs) and step time against table size.
    Train {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Timed steps per measurement.
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Skip the 10^7-row table (it needs ~2 GB of memory).
        #[arg(long)]
        small: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train {
            config,
            data_dir,
            out,
            download,
            force,
            skip_bad_rows,
            quiet,
        } => commands::train(
            &config,
            data_dir.as_deref(),
            &out,
            commands::TrainFlags {
                download,
                force,
                skip_bad_rows,
                quiet,
                threads: cli.threads,
            },
        ),
        Cmd::Eval {
            run,
            data_dir,
            keep_seen,
            k,
        } => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            commands::eval(&run, data_dir.as_deref(), keep_seen, &k)
        }
        Cmd::Recall {
            run,
            data_dir,
            users,
            k,
            keep_seen,
        } => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            commands::recall(&run, data_dir.as_deref(), &users, k, keep_seen)
        }
        Cmd::Report { runs } => {
            print!("{}", report::render(&runs)?);
            Ok(())
        }
        Cmd::Data {
            cmd: DataCmd::Download { name, to },
        } => commands::download(&name, &to),
        Cmd::Bench {
            cmd:
                BenchCmd::Train {
                    data_dir,
                    steps,
                    small,
                },
        } => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            bench::train(data_dir.as_deref(), steps, small)
        }
    }
}
