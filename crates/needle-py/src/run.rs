//! `needle.train` and `needle.Run`: training into a run directory, and what a run answers.

use crate::dataset::{Dataset, IdTypes, Source};
use crate::{invalid, to_py};
use numpy::{IntoPyArray, PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which raw ids are integers, recorded beside a run trained on a table in memory.
const ID_TYPES_FILE: &str = "id_types.json";

/// A config from a file or from JSON of the same keys; a JSON config without `data` reads the
/// dataset given to training.
fn config(path: Option<PathBuf>, json: Option<String>) -> PyResult<Option<needle_api::Config>> {
    match (path, json) {
        (Some(p), None) => Ok(Some(needle_api::read_config(&p).map_err(to_py)?)),
        (None, Some(text)) => {
            let mut v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| crate::raise("ConfigError", format!("config is not valid: {e}")))?;
            let obj = v.as_object_mut().ok_or_else(|| crate::raise("ConfigError", "a config is a dict".into()))?;
            // Stands in until the dataset's own `[data]` replaces it.
            obj.entry("data").or_insert_with(|| serde_json::json!({ "dataset": "ml-1m" }));
            let mut cfg: needle_api::Config = serde_json::from_value(v)
                .map_err(|e| crate::raise("ConfigError", format!("config is not valid: {e}")))?;
            let cwd = std::env::current_dir().unwrap_or_default();
            cfg.resolve_paths(&cwd);
            cfg.validate().map_err(|e| crate::raise("ConfigError", format!("config: {e}")))?;
            Ok(Some(cfg))
        }
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(invalid("give a config file or a dict, not both")),
    }
}

/// Progress bars, notes and epoch lines on stderr, or nothing at all when quiet.
fn bars(quiet: bool) -> needle_api::progress::Bars {
    if quiet {
        needle_api::progress::Bars::silent()
    } else {
        needle_api::progress::Bars::new(false)
    }
}

/// A file error as the library reports it (`needle.FileError`, naming the path).
fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> PyErr + '_ {
    move |source| to_py(needle_api::Error::Io { path: path.to_owned(), source })
}

/// `out` created if missing, as an absolute path (a run names its own data folder by it).
fn run_dir(out: &Path) -> PyResult<PathBuf> {
    std::fs::create_dir_all(out).map_err(file_error(out))?;
    std::path::absolute(out).map_err(file_error(out))
}

/// Training's observer: [`bars`], and Ctrl-C, read from Python's signal handlers at most every
/// 50 ms, as a request to stop.
fn observer(quiet: bool) -> needle_api::progress::Bars {
    let last = Cell::new(Instant::now());
    let stopped = Cell::new(false);
    bars(quiet).stopping_on(move || {
        if !stopped.get() && last.get().elapsed() >= Duration::from_millis(50) {
            last.set(Instant::now());
            // A KeyboardInterrupt raised by the handler is the stop request; it is not re-raised.
            stopped.set(Python::attach(|py| py.check_signals().is_err()));
        }
        stopped.get()
    })
}

/// Trains into `out`; the `needle.train` function calls this.
#[pyfunction]
#[pyo3(signature = (out, config_path=None, config_json=None, data=None, quiet=false,
    eval_seed=needle_api::DEFAULT_EVAL_SEED, data_dir=None, force=false, tensorboard=None,
    tensorboard_every=needle_api::tensorboard::DEFAULT_EVERY))]
#[allow(clippy::too_many_arguments)]
pub fn train(
    py: Python<'_>,
    out: PathBuf,
    config_path: Option<PathBuf>,
    config_json: Option<String>,
    data: Option<&Dataset>,
    quiet: bool,
    eval_seed: u64,
    data_dir: Option<PathBuf>,
    force: bool,
    tensorboard: Option<PathBuf>,
    tensorboard_every: u64,
) -> PyResult<(Run, bool)> {
    let cfg = config(config_path, config_json)?;
    if out.join("model.toml").exists() && !force {
        return Err(crate::raise(
            "FileError",
            format!("{} already holds a run; pass force=True to replace it", out.display()),
        ));
    }
    let out = run_dir(&out)?;
    let (cfg, prepared, data_dir, ids) = load(py, cfg, data, &out, data_dir, quiet)?;
    let tb_dir = tensorboard.unwrap_or_else(|| out.join(needle_api::tensorboard::RUN_DIR));
    let trained = py.detach(|| {
        let mut obs = observer(quiet);
        let mut board = needle_api::tensorboard::Board::new(&mut obs, &tb_dir, tensorboard_every);
        board.config(&cfg);
        needle_api::train(&cfg, &prepared, &out, eval_seed, &mut board)
    });
    let trained = trained.map_err(to_py)?;
    if trained.stopped && !quiet {
        eprintln!(
            "stopped after {} epochs; saved the best of them (epoch {})",
            trained.info.training.epochs_run, trained.info.training.best_epoch
        );
    }
    drop(prepared);
    keep_id_types(&out, ids)?;
    let run = Run::load(py, &out, data_dir.as_deref())?;
    Ok((run, trained.stopped))
}

/// Records beside a run which raw ids were integers, so they go back to Python as integers.
fn keep_id_types(out: &Path, ids: IdTypes) -> PyResult<()> {
    if ids.user_int || ids.item_int {
        let text = serde_json::json!({ "user_int": ids.user_int, "item_int": ids.item_int }).to_string();
        let path = out.join(ID_TYPES_FILE);
        std::fs::write(&path, text).map_err(file_error(&path))?;
    }
    Ok(())
}

/// Tunes into `out`; the `needle.tune` function calls this.
#[pyfunction]
#[pyo3(signature = (out, budget_secs, config_path=None, config_json=None, data=None, trials=None, quiet=false,
    eval_seed=needle_api::DEFAULT_EVAL_SEED, data_dir=None))]
#[allow(clippy::too_many_arguments)]
pub fn tune(
    py: Python<'_>,
    out: PathBuf,
    budget_secs: f64,
    config_path: Option<PathBuf>,
    config_json: Option<String>,
    data: Option<&Dataset>,
    trials: Option<usize>,
    quiet: bool,
    eval_seed: u64,
    data_dir: Option<PathBuf>,
) -> PyResult<Run> {
    let origin = config_path.as_ref().map_or("(a dict)".to_owned(), |p| p.display().to_string());
    let cfg = config(config_path, config_json)?.ok_or_else(|| invalid("tuning needs a config with a [tune] space"))?;
    if !(budget_secs.is_finite() && budget_secs > 0.0) {
        return Err(invalid(format!("budget must be a positive number of seconds, not {budget_secs}")));
    }
    needle_api::tune_check(&cfg, trials, &out).map_err(to_py)?;
    let out = run_dir(&out)?;
    let (cfg, prepared, data_dir, ids) = load(py, Some(cfg), data, &out, data_dir, quiet)?;
    let metric = cfg.tune.as_ref().map_or("ndcg@10", |t| t.metric.name());
    let opts = needle_api::TuneOptions {
        out: &out,
        budget: Duration::from_secs_f64(budget_secs),
        trials,
        threads: rayon::current_num_threads(),
        eval_seed,
        origin: &origin,
    };
    let tuned = py.detach(|| {
        // Asked once per epoch: Python's handlers run then, and a Ctrl-C ends the search.
        let mut bar = needle_api::progress::TuneBar::new(quiet, metric)
            .stopping_on(|| Python::attach(|py| py.check_signals().is_err()));
        let mut obs = bars(quiet);
        let tb_dir = out.join(needle_api::tensorboard::RUN_DIR);
        let mut board = needle_api::tensorboard::TuneBoard::new(&mut bar, &tb_dir);
        let t = needle_api::tune(&cfg, &prepared, &opts, &mut board, &mut obs);
        bar.finish();
        t
    });
    let tuned = tuned.map_err(to_py)?;
    if !quiet {
        eprintln!("{}", tuned.summary());
    }
    drop(prepared);
    keep_id_types(&out, ids)?;
    Run::load(py, &out, data_dir.as_deref())
}

/// Where training reads its data: a config alone, or a dataset (with a config, or the default
/// for its size); a dataset held in memory is first kept in `out/data`. Says the data's notes
/// on stderr unless `quiet`.
fn load(
    py: Python<'_>,
    cfg: Option<needle_api::Config>,
    data: Option<&Dataset>,
    out: &Path,
    data_dir: Option<PathBuf>,
    quiet: bool,
) -> PyResult<(needle_api::Config, needle_api::Data, Option<PathBuf>, IdTypes)> {
    let mut data_dir = data_dir;
    let mut ids = IdTypes::default();
    let like = cfg.as_ref().map(|c| c.data.clone());
    let data_cfg = match data {
        Some(d) => {
            ids = d.ids;
            match &d.source {
                Source::Memory(ds) => {
                    let like = like.unwrap_or_else(|| needle_api::DataConfig::from_source(None, None, None));
                    py.detach(|| needle_api::keep_with_run(ds, out, &like)).map_err(to_py)?
                }
                Source::Config { data, data_dir: dir } => {
                    data_dir = data_dir.or_else(|| dir.clone());
                    match &like {
                        Some(l) => needle_api::DataConfig {
                            dataset: data.dataset.clone(),
                            schema: data.schema.clone(),
                            binary: data.binary.clone(),
                            skip_bad_rows: data.skip_bad_rows || l.skip_bad_rows,
                            ..l.clone()
                        },
                        None => data.clone(),
                    }
                }
            }
        }
        None => like.ok_or_else(|| invalid("give data (a needle.Dataset) or a config that names its data"))?,
    };
    let stderr = |lines: &[String]| {
        if !quiet {
            lines.iter().for_each(|l| eprintln!("{l}"));
        }
    };
    let (cfg, prepared) = match cfg {
        Some(mut cfg) => {
            cfg.data = data_cfg;
            let d = py.detach(|| needle_api::Data::load(&cfg, data_dir.as_deref(), &mut |_, _| {})).map_err(to_py)?;
            (cfg, d)
        }
        None => py
            .detach(|| needle_api::Data::load_default(data_cfg, data_dir.as_deref(), &mut |_, _| {}))
            .map_err(to_py)?,
    };
    stderr(&prepared.notes);
    Ok((cfg, prepared, data_dir, ids))
}

/// The default config for a log of `train_events` training events, as a JSON string, and a line
/// saying which it is.
#[pyfunction]
pub fn default_config(train_events: usize) -> PyResult<(String, String)> {
    let (cfg, why) = needle_api::default_config(needle_api::DataConfig::from_source(None, None, None), train_events);
    let mut v = serde_json::to_value(&cfg).map_err(|e| invalid(e.to_string()))?;
    if let Some(o) = v.as_object_mut() {
        o.remove("data");
    }
    Ok((v.to_string(), why))
}

#[pyclass(module = "needle._needle", frozen)]
pub struct Run {
    inner: needle_api::Run,
    ids: IdTypes,
}

/// Lists as numpy arrays: item rows (`u32::MAX` pads) and scores, `[n, k]`.
type Lists<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>);

fn lists<'py>(py: Python<'py>, k: usize, rows: Vec<u32>, scores: Vec<f32>) -> PyResult<Lists<'py>> {
    let n = rows.len() / k.max(1);
    let rows = rows.into_pyarray(py).reshape([n, k])?.into_any();
    let scores = scores.into_pyarray(py).reshape([n, k])?.into_any();
    Ok((rows, scores))
}

fn vectors<'py>(py: Python<'py>, v: needle_api::Vectors) -> PyResult<(Vec<String>, Bound<'py, PyAny>)> {
    let n = v.ids.len();
    let arr = PyArray1::from_vec(py, v.data);
    let arr =
        if v.per_id > 1 { arr.reshape([n, v.per_id, v.dim])?.into_any() } else { arr.reshape([n, v.dim])?.into_any() };
    Ok((v.ids, arr))
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

impl Run {
    fn load(py: Python<'_>, dir: &Path, data_dir: Option<&Path>) -> PyResult<Run> {
        let inner = py.detach(|| needle_api::Run::open(dir, data_dir)).map_err(to_py)?;
        let ids = match std::fs::read_to_string(dir.join(ID_TYPES_FILE)) {
            Ok(text) => {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                IdTypes { user_int: v["user_int"] == true, item_int: v["item_int"] == true }
            }
            // Runs trained from files: ids that are all decimal integers were integers.
            Err(_) => IdTypes {
                user_int: all_integers(inner.user_ids().iter().map(String::as_str)),
                item_int: all_integers(inner.item_ids().into_iter().skip(1)),
            },
        };
        Ok(Run { inner, ids })
    }
}

/// Whether every id is an integer in canonical decimal form (so it survives int → str → int).
fn all_integers<'a>(mut ids: impl Iterator<Item = &'a str>) -> bool {
    ids.all(|s| s.parse::<i64>().is_ok_and(|v| v.to_string() == s))
}

#[pymethods]
impl Run {
    #[staticmethod]
    #[pyo3(signature = (path, data_dir=None))]
    fn open(py: Python<'_>, path: PathBuf, data_dir: Option<PathBuf>) -> PyResult<Run> {
        Run::load(py, &path, data_dir.as_deref())
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.dir().to_path_buf()
    }

    #[getter]
    fn kind(&self) -> String {
        // The config's own spelling of the kind (`youtubednn`, `sequential`, ...).
        serde_json::to_value(self.inner.info().config.model.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    #[getter]
    fn dataset(&self) -> &str {
        self.inner.dataset_name()
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.model().dim()
    }

    #[getter]
    fn interests(&self) -> usize {
        self.inner.model().interests()
    }

    #[getter]
    fn user_ids_are_int(&self) -> bool {
        self.ids.user_int
    }

    #[getter]
    fn item_ids_are_int(&self) -> bool {
        self.ids.item_int
    }

    /// The run's config as JSON.
    fn _config_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.info().config).map_err(|e| invalid(e.to_string()))
    }

    /// The run's training summary (epochs run, best epoch, seconds, samples/s, peak RSS) as JSON.
    fn _training_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.info().training).map_err(|e| invalid(e.to_string()))
    }

    /// Raw user ids in dataset order.
    fn _user_ids(&self) -> Vec<String> {
        self.inner.user_ids().to_vec()
    }

    /// Raw item ids by item row (row 0, padding, is "").
    fn _item_ids(&self) -> Vec<String> {
        self.inner.item_ids().into_iter().map(str::to_owned).collect()
    }

    #[pyo3(signature = (ks, split, users=None, keep_seen=false, seed=needle_api::DEFAULT_EVAL_SEED))]
    fn _evaluate<'py>(
        &self,
        py: Python<'py>,
        ks: Vec<usize>,
        split: &str,
        users: Option<usize>,
        keep_seen: bool,
        seed: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let stage = match split {
            "test" => needle_api::Stage::Test,
            "valid" | "validation" => needle_api::Stage::Valid,
            other => return Err(invalid(format!("split must be \"test\" or \"valid\", not {other:?}"))),
        };
        let opts = needle_api::EvalOptions { keep_seen, users, seed };
        let report = py.detach(|| self.inner.evaluate(stage, &ks, &opts, &mut needle_api::Silent)).map_err(to_py)?;
        let d = PyDict::new(py);
        for a in &report.at {
            d.set_item(format!("hit_rate@{}", a.k), a.hit_rate)?;
            d.set_item(format!("recall@{}", a.k), a.recall)?;
            d.set_item(format!("ndcg@{}", a.k), a.ndcg)?;
            d.set_item(format!("precision@{}", a.k), a.precision)?;
            d.set_item(format!("mrr@{}", a.k), a.mrr)?;
        }
        d.set_item("users", report.users)?;
        d.set_item("items", report.items)?;
        Ok(d)
    }

    #[pyo3(signature = (users, k, keep_seen=false))]
    fn _recall_users<'py>(
        &self,
        py: Python<'py>,
        users: Vec<String>,
        k: usize,
        keep_seen: bool,
    ) -> PyResult<Lists<'py>> {
        let (rows, scores) = py
            .detach(|| {
                let r = self.inner.recall_users(&strs(&users), k, keep_seen)?;
                Ok::<_, needle_api::Error>((r.rows, r.scores))
            })
            .map_err(to_py)?;
        lists(py, k, rows, scores)
    }

    #[pyo3(signature = (k, keep_seen=false))]
    fn _recall_all<'py>(&self, py: Python<'py>, k: usize, keep_seen: bool) -> PyResult<Lists<'py>> {
        let n = self.inner.user_ids().len();
        let (rows, scores) = py
            .detach(|| {
                let all: Vec<usize> = (0..n).collect();
                let r = self.inner.recall(&all, k, keep_seen)?;
                Ok::<_, needle_api::Error>((r.rows, r.scores))
            })
            .map_err(to_py)?;
        lists(py, k, rows, scores)
    }

    #[pyo3(signature = (histories, k, keep_seen=false))]
    fn _recall_histories<'py>(
        &self,
        py: Python<'py>,
        histories: Vec<Vec<String>>,
        k: usize,
        keep_seen: bool,
    ) -> PyResult<Lists<'py>> {
        let (rows, scores) = py
            .detach(|| {
                let h: Vec<Vec<&str>> = histories.iter().map(|h| strs(h)).collect();
                let r = self.inner.recall_histories(&h, k, keep_seen)?;
                Ok::<_, needle_api::Error>((r.rows, r.scores))
            })
            .map_err(to_py)?;
        lists(py, k, rows, scores)
    }

    fn _similar_items<'py>(&self, py: Python<'py>, items: Vec<String>, k: usize) -> PyResult<Lists<'py>> {
        let (rows, scores) = py
            .detach(|| {
                let r = self.inner.similar_items(&strs(&items), k)?;
                Ok::<_, needle_api::Error>((r.rows, r.scores))
            })
            .map_err(to_py)?;
        lists(py, k, rows, scores)
    }

    fn _item_vectors<'py>(&self, py: Python<'py>) -> PyResult<(Vec<String>, Bound<'py, PyAny>)> {
        let v = py.detach(|| self.inner.item_vectors()).map_err(to_py)?;
        vectors(py, v)
    }

    #[pyo3(signature = (users=None))]
    fn _user_vectors<'py>(
        &self,
        py: Python<'py>,
        users: Option<Vec<String>>,
    ) -> PyResult<(Vec<String>, Bound<'py, PyAny>)> {
        let v = py
            .detach(|| {
                let pos = match &users {
                    Some(u) => self.inner.users(&strs(u))?,
                    None => (0..self.inner.user_ids().len()).collect(),
                };
                self.inner.user_vectors(&pos)
            })
            .map_err(to_py)?;
        vectors(py, v)
    }

    fn _history_vectors<'py>(
        &self,
        py: Python<'py>,
        histories: Vec<Vec<String>>,
    ) -> PyResult<(Vec<String>, Bound<'py, PyAny>)> {
        let v = py
            .detach(|| {
                let h: Vec<Vec<&str>> = histories.iter().map(|h| strs(h)).collect();
                self.inner.history_vectors(&h)
            })
            .map_err(to_py)?;
        vectors(py, v)
    }

    /// Writes the run's vectors as `needle export` does; returns the files written.
    fn export(&self, py: Python<'_>, out: PathBuf) -> PyResult<Vec<PathBuf>> {
        Ok(py.detach(|| self.inner.export(&out)).map_err(to_py)?.files)
    }
}
