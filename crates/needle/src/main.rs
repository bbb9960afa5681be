//! `needle`: train, evaluate and query two-tower retrieval models from the command line.

mod ann;
mod ann_scale;
mod bench;
mod channels_cmd;
mod commands;
mod crash;
mod data_cmd;
mod index_cmd;
mod interrupt;
mod metrics;
mod report;
mod serve_cmd;
mod tune_cmd;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "needle", version, about = "Deep-retrieval recommender: two-tower training, evaluation and recall")]
struct Cli {
    /// Worker threads (default: the config's `train.threads`, else all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Seed of the user sample that test evaluation scores on large catalogues (`--eval-users`,
    /// or 10,000 users above 100,000 items): fixed, so runs of one dataset are scored on the
    /// same users whatever their training seed. Recorded in metrics.json.
    #[arg(long, global = true, default_value_t = needle_train::model::DEFAULT_EVAL_SEED)]
    eval_seed: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model from a config and save it as a run directory; ends with a test evaluation.
    Train {
        /// The config; without one, needle picks the default for the log's size (and says
        /// which) and reads the data of --schema or --dataset.
        #[arg(long, required_unless_present_any = ["schema", "dataset"])]
        config: Option<PathBuf>,
        /// Without --config: a schema file describing the log to train on.
        #[arg(long, conflicts_with_all = ["config", "dataset"])]
        schema: Option<PathBuf>,
        /// Without --config: a built-in dataset to train on (ml-1m, ml-100k).
        #[arg(long, conflicts_with = "config")]
        dataset: Option<String>,
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
        /// Folder of the TensorBoard event files (default: OUT/tb); `tensorboard --logdir` reads it.
        #[arg(long)]
        tensorboard: Option<PathBuf>,
        /// Training steps between two points of the TensorBoard curves.
        #[arg(long, default_value_t = needle_api::tensorboard::DEFAULT_EVERY)]
        tensorboard_every: u64,
    },
    /// Search the config's [tune] space on validation within a time budget (successive
    /// halving); saves the best as a run in OUT with tune.md, tune.jsonl and best.toml, and
    /// evaluates it on test once. Run again with the same OUT to resume an interrupted tune.
    Tune {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Wall-time budget of the search, e.g. 30m or 90s.
        #[arg(long, value_parser = serve_cmd::parse_duration)]
        budget: std::time::Duration,
        /// Configurations to try (default: [tune] trials, else as many as fit the budget).
        #[arg(long)]
        trials: Option<usize>,
        #[arg(long)]
        out: PathBuf,
        /// No progress bar or per-epoch lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Evaluate a run on its test targets over the full item corpus; writes RUN/metrics.json.
    /// With --channels, every channel of a channel file alone and their mix instead.
    Eval {
        #[arg(long, required_unless_present = "channels", conflicts_with = "channels")]
        run: Option<PathBuf>,
        /// A channel file (TOML: `[[channel]]` entries and a merge rule; see the README).
        #[arg(long)]
        channels: Option<PathBuf>,
        /// With --channels: score the validation targets (where quotas are chosen) instead of
        /// the test targets.
        #[arg(long, requires = "channels")]
        valid: bool,
        /// With --channels: also write every row's metrics (HR, recall, NDCG, precision, MRR at
        /// each K) to this JSON file.
        #[arg(long, requires = "channels")]
        metrics: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Keep the user's known items in the ranking (by default they are excluded).
        #[arg(long)]
        keep_seen: bool,
        /// Cut-offs, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
        k: Vec<usize>,
        /// Retrieve through the run's ANN index (`needle index build`) instead of the exact
        /// scan; writes RUN/metrics_ann.json.
        #[arg(long)]
        ann: bool,
        /// Score a seeded sample of this many test users (0 = all). Default: all, or 10,000 on
        /// catalogues above 100,000 items.
        #[arg(long)]
        eval_users: Option<usize>,
    },
    /// Write every item's and every known user's vector as .npy (float32) with .tsv id lists.
    Export {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Output folder for item_embeddings.npy, items.tsv, user_embeddings.npy, users.tsv.
        #[arg(long)]
        out: PathBuf,
    },
    /// Build or measure the ANN index of a run.
    Index {
        #[command(subcommand)]
        cmd: IndexCmd,
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
        /// Print each item's score after it (`item:score`), as `/v1/recall` returns it.
        #[arg(long)]
        scores: bool,
    },
    /// Print a markdown table of several evaluated runs (quality at K = 10/50/100, time, memory);
    /// with --chart also draw their HR@K curves into a PNG.
    Report {
        /// Run directories, each with model.toml and metrics.json.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Also draw HR@K for K = 1..100 of every run (from RUN/hit_curve.json) into this PNG file.
        #[arg(long, value_name = "PATH")]
        chart: Option<PathBuf>,
    },
    /// Serve recall over HTTP: POST /v1/recall, POST /v1/events, GET /healthz, /metrics,
    /// /openapi.json, POST /admin/reload (or SIGHUP). Stops cleanly on SIGTERM / Ctrl-C.
    Serve(serve_cmd::ServeArgs),
    /// The store that serving reads item details and user histories from.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
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
enum IndexCmd {
    /// Build an index over the run's item vectors and save it as RUN/index.bin, or over any
    /// `.npy` vector file (--vectors, with --out).
    Build {
        #[arg(long, required_unless_present = "vectors", conflicts_with = "vectors")]
        run: Option<PathBuf>,
        /// A float32 `[rows, dim]` `.npy` file to index instead of a run's items; ids are row
        /// numbers. IVF-PQ streams it in blocks, so it may be larger than memory.
        #[arg(long, requires = "out")]
        vectors: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// `hnsw` (the default), `ivf`, `ivfpq` or `exact`; also a full spec such as
        /// `ivf:nlist=256,nprobe=64` or `ivfpq:nlist=16384,nprobe=32,refine=sq8`.
        #[arg(long, default_value = "hnsw")]
        kind: String,
        /// HNSW links per node.
        #[arg(long)]
        m: Option<usize>,
        /// HNSW candidate list while building.
        #[arg(long)]
        ef_construction: Option<usize>,
        /// HNSW candidate list while searching.
        #[arg(long)]
        ef_search: Option<usize>,
        /// IVF lists (0 = 4·√items).
        #[arg(long)]
        nlist: Option<usize>,
        /// IVF lists scanned per query.
        #[arg(long)]
        nprobe: Option<usize>,
        /// Pad the index to this many items with synthetic vectors drawn around the real ones
        /// (ids past the catalogue), to benchmark serving at a large catalogue's scale.
        #[arg(long)]
        synthetic_items: Option<usize>,
        /// Where to save the index (default RUN/index.bin).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Recall of the index against exact search, queries/s single-threaded and batched, build time, memory.
    Eval {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, value_delimiter = ',', default_value = "10,100")]
        k: Vec<usize>,
        /// Search effort to use instead of the built one (HNSW ef_search / IVF nprobe).
        #[arg(long)]
        effort: Option<usize>,
    },
    /// Check an index file's header, structure and checksum over every byte.
    Verify {
        /// The index file.
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Load item details and user profiles/histories (newest max_seq_len items) of a run's data.
    Load {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// `embedded` (RUN/store.redb), a `.redb` path, or `redis://HOST:PORT`.
        #[arg(long, default_value = "embedded")]
        store: String,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Parse a log once into a binary dataset (per-user time-ordered events, vocabularies,
    /// feature tables; checksummed, memory-mapped) that training, evaluation and serving read.
    Ingest {
        /// TOML schema of a CSV/TSV log.
        #[arg(long, conflicts_with = "dataset", required_unless_present = "dataset")]
        schema: Option<PathBuf>,
        /// Or a MovieLens release: ml-1m, ml-100k (found under --data-dir).
        #[arg(long)]
        dataset: Option<String>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Folder to write dataset.ndb into (default: beside the schema, S.ndb/).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Skip malformed rows (and count them) instead of stopping at the first one.
        #[arg(long)]
        skip_bad_rows: bool,
        #[arg(long)]
        quiet: bool,
    },
    /// Write a synthetic log (events, items and users as Parquet, or CSV with --csv, and
    /// schema.toml) with power-law popularity, drifting tastes, short-term sequences and
    /// correlated features; seeded.
    Synth {
        #[arg(long, default_value_t = 10_000)]
        users: u64,
        #[arg(long, default_value_t = 5_000)]
        items: u64,
        #[arg(long, default_value_t = 500_000)]
        events: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        /// CSV files instead of Parquet.
        #[arg(long)]
        csv: bool,
        /// This fraction of the catalogue never occurs in the log (new items, known only by
        /// their features).
        #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
        cold_items: f64,
        #[arg(long)]
        quiet: bool,
    },
    /// Print a binary dataset's counts, sizes, features and fingerprint, and verify its checksums.
    Info {
        /// Folder holding dataset.ndb.
        dir: PathBuf,
    },
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
    /// Load-test a running `needle serve`: POST /v1/recall for the run's users over keep-alive
    /// connections; prints requests/s and latency percentiles, optionally per time window, with
    /// reloads, malformed bursts, events, a load surge or a slow-header attack during the run.
    Serve(serve_cmd::BenchServeFlags),
    /// kill -9 at random moments while needle writes (train, index build, store load, events
    /// into a running server), then check each result is the old state, the new state or a
    /// clear error; prints a table and fails if anything loaded wrong or an acknowledged event
    /// was lost.
    Crash {
        /// Write paths to interrupt.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "train,index,store,events")]
        paths: Vec<crash::WritePath>,
        /// Kills per write path.
        #[arg(long, default_value_t = 100)]
        runs: usize,
        /// Scratch folder for the synthetic logs, runs and stores (reused when it holds them).
        #[arg(long)]
        work: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
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
        /// Instead: this config's model on ML-1M and on the config's own data, side by side,
        /// with the split of a step between batch assembly, forward + backward and optimizer.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// ANN indexes (exact, IVF, HNSW) on a synthetic clustered set or on exported vectors:
    /// build time, memory, recall@10/100 against exact search, queries/s.
    Ann {
        /// Items in the synthetic set.
        #[arg(long, default_value_t = 1_000_000)]
        items: usize,
        #[arg(long, default_value_t = 64)]
        dim: usize,
        /// Held-out queries.
        #[arg(long, default_value_t = 1000)]
        queries: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Noise norm around each cluster centre (1.0 ≈ 45° from the centre).
        #[arg(long, default_value_t = needle_ann_spread())]
        spread: f32,
        /// Also write base.npy and queries.npy here, for bench/ann_reference.py.
        #[arg(long)]
        write_npy: Option<PathBuf>,
        /// Catalogue-scale mode (implied above 2,000,000 items): the set is generated row by
        /// row and never held whole, ground truth is a streaming scan cached in --work, and
        /// only the compressed kinds (--kind) are built, saved and searched mapped.
        #[arg(long)]
        stream: bool,
        /// Index specs for --stream (repeatable).
        #[arg(long, default_value = "ivfpq")]
        kind: Vec<String>,
        /// Folder for --stream's index file and cached ground truth.
        #[arg(long, default_value = "bench-ann-work")]
        work: PathBuf,
        /// With --stream: search this index (built over the same set, e.g. WORK/ivfpq.idx)
        /// instead of building one.
        #[arg(long)]
        index: Option<PathBuf>,
        /// Use these vectors (`.npy`, float32 [n, dim]) instead of the synthetic set,
        /// e.g. item_embeddings.npy from `needle export`.
        #[arg(long)]
        vectors: Option<PathBuf>,
        /// Queries for --vectors (`.npy`); default: hold out --queries rows of the vectors.
        #[arg(long)]
        query_vectors: Option<PathBuf>,
    },
}

fn needle_ann_spread() -> f32 {
    ann::SYNTH_SPREAD
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    metrics::set_eval_seed(cli.eval_seed);
    match cli.cmd {
        Cmd::Train {
            config,
            schema,
            dataset,
            data_dir,
            out,
            download,
            force,
            skip_bad_rows,
            quiet,
            tensorboard,
            tensorboard_every,
        } => commands::train(
            commands::TrainData { config, schema, dataset, tensorboard, tensorboard_every },
            data_dir.as_deref(),
            &out,
            commands::TrainFlags { download, force, skip_bad_rows, quiet, threads: cli.threads },
        ),
        Cmd::Tune { config, data_dir, budget, trials, out, quiet } => tune_cmd::tune(tune_cmd::TuneArgs {
            config: &config,
            data_dir: data_dir.as_deref(),
            budget,
            trials,
            out: &out,
            quiet,
            threads: cli.threads,
        }),
        Cmd::Eval { run, channels, valid, metrics, data_dir, keep_seen, k, ann, eval_users } => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            match (run, channels) {
                (_, Some(file)) => {
                    if keep_seen || ann {
                        bail!("--channels evaluates with known items excluded and exact search; drop --keep-seen and --ann");
                    }
                    channels_cmd::eval_channels(
                        &file,
                        data_dir.as_deref(),
                        &k,
                        eval_users,
                        if valid { needle_train::Stage::Valid } else { needle_train::Stage::Test },
                        metrics.as_deref(),
                    )
                }
                (Some(run), None) => commands::eval(&run, data_dir.as_deref(), keep_seen, &k, ann, eval_users),
                (None, None) => unreachable!("clap requires --run or --channels"),
            }
        }
        Cmd::Export { run, data_dir, out } => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            index_cmd::export(&run, data_dir.as_deref(), &out)
        }
        Cmd::Index {
            cmd:
                IndexCmd::Build {
                    run,
                    vectors,
                    data_dir,
                    kind,
                    m,
                    ef_construction,
                    ef_search,
                    nlist,
                    nprobe,
                    synthetic_items,
                    out,
                },
        } => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            let mut params: needle_index::IndexParams = kind.parse()?;
            match &mut params {
                needle_index::IndexParams::Hnsw(p) => {
                    p.m = m.unwrap_or(p.m);
                    p.ef_construction = ef_construction.unwrap_or(p.ef_construction);
                    p.ef_search = ef_search.unwrap_or(p.ef_search);
                }
                needle_index::IndexParams::Ivf(p) => {
                    p.nlist = nlist.unwrap_or(p.nlist);
                    p.nprobe = nprobe.unwrap_or(p.nprobe);
                }
                needle_index::IndexParams::IvfPq(p) => {
                    p.nlist = nlist.unwrap_or(p.nlist);
                    p.nprobe = nprobe.unwrap_or(p.nprobe);
                }
                needle_index::IndexParams::Exact => {}
            }
            params.validate()?;
            match (run, vectors) {
                (_, Some(v)) => index_cmd::build_vectors(&v, &params, out.as_deref().context("--vectors needs --out")?),
                (Some(run), None) => {
                    index_cmd::build(&run, data_dir.as_deref(), &params, synthetic_items, out.as_deref())
                }
                (None, None) => bail!("give --run or --vectors"),
            }
        }
        Cmd::Index { cmd: IndexCmd::Verify { path } } => index_cmd::verify(&path),
        Cmd::Index { cmd: IndexCmd::Eval { run, data_dir, k, effort } } => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            index_cmd::eval(&run, data_dir.as_deref(), &k, effort)
        }
        Cmd::Recall { run, data_dir, users, k, keep_seen, scores } => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            commands::recall(&run, data_dir.as_deref(), &users, k, keep_seen, scores)
        }
        Cmd::Report { runs, chart } => {
            let tables = report::render(&runs)?;
            if let Some(path) = &chart {
                report::chart(&runs, path)?;
                eprintln!("chart written to {}", path.display());
            }
            print!("{tables}");
            Ok(())
        }
        Cmd::Serve(args) => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            serve_cmd::serve(args, cli.threads)
        }
        Cmd::Store { cmd: StoreCmd::Load { run, data_dir, store } } => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            serve_cmd::store_load(&run, data_dir.as_deref(), &store)
        }
        Cmd::Bench { cmd: BenchCmd::Serve(flags) } => serve_cmd::bench_serve(flags),
        Cmd::Data { cmd: DataCmd::Download { name, to } } => commands::download(&name, &to),
        Cmd::Data { cmd: DataCmd::Ingest { schema, dataset, data_dir, out, skip_bad_rows, quiet } } => {
            data_cmd::ingest(
                schema.as_deref(),
                dataset.as_deref(),
                data_dir.as_deref(),
                out.as_deref(),
                skip_bad_rows,
                quiet,
            )
        }
        Cmd::Data { cmd: DataCmd::Info { dir } } => data_cmd::info(&dir),
        Cmd::Data { cmd: DataCmd::Synth { users, items, events, seed, out, csv, cold_items, quiet } } => {
            let mut spec = needle_data::synth::SynthSpec::new(users, items, events, seed);
            spec.cold_items = cold_items;
            if csv {
                spec.format = needle_data::FileFormat::Csv;
            }
            data_cmd::synth(&spec, &out, quiet)
        }
        Cmd::Bench {
            cmd: BenchCmd::Ann { items, dim, queries, seed, spread, write_npy, stream, kind, work, index, vectors, .. },
        } if vectors.is_none() && (stream || items > 2_000_000) => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            ann_scale::bench_ann_stream(&ann_scale::StreamBench {
                items,
                dim,
                queries,
                seed,
                spread,
                kinds: &kind,
                index: index.as_deref(),
                work: &work,
                write_npy: write_npy.as_deref(),
            })
        }
        Cmd::Bench {
            cmd: BenchCmd::Ann { items, dim, queries, seed, spread, write_npy, vectors, query_vectors, .. },
        } => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            match vectors {
                Some(v) => ann::bench_ann_vectors(&v, query_vectors.as_deref(), queries, seed),
                None => ann::bench_ann(items, dim, queries, seed, spread, write_npy.as_deref()),
            }
        }
        Cmd::Bench { cmd: BenchCmd::Crash { paths, runs, work, seed } } => {
            crash::bench_crash(&paths, runs, &work, seed)
        }
        Cmd::Bench { cmd: BenchCmd::Train { data_dir, steps, small, config } } => {
            commands::init_threads(cli.threads.unwrap_or(0))?;
            match config {
                Some(c) => bench::train_at_scale(&c, data_dir.as_deref(), steps),
                None => bench::train(data_dir.as_deref(), steps, small),
            }
        }
    }
}
