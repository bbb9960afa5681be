//! `needle export`, `needle index build|eval` and `needle eval --ann`: the offline side from a
//! trained run to a searchable item index, and how faithful that index is.

use anyhow::{bail, Context, Result};
use needle_eval::{format_table, score, Lists};
use needle_index::VectorSource;
use needle_index::{Index, IndexParams};
use needle_train::model::{merge_interests, Model};
use needle_train::run::{load_run, LoadedRun};
use needle_train::{Prepared, Stage};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

use needle_index::RUN_INDEX_FILE as INDEX_FILE;
const INDEX_INFO: &str = "index.toml";

/// What `index.toml` records next to `index.bin`.
#[derive(Serialize, Deserialize)]
struct IndexInfo {
    params: String,
    items: usize,
    dim: usize,
    build_seconds: f64,
    memory_bytes: usize,
}

/// Refuses the models that recall from neighbour lists rather than vectors.
fn has_vectors(model: &Model) -> Result<()> {
    if model.neighbors().is_some() {
        bail!(
            "this run is an item-to-item model (transitions or itemcf): it has no vectors to index; \
             `needle eval`, `needle recall` and `needle serve` use its neighbour lists directly"
        );
    }
    Ok(())
}

fn item_rows(model: &Model) -> Result<(Vec<u32>, Vec<f32>, usize)> {
    has_vectors(model)?;
    let (ids, vecs) = model.indexed_items();
    Ok((ids, vecs, model.dim()))
}

pub fn export(run: &Path, data_dir: Option<&Path>, out: &Path) -> Result<()> {
    let r = needle_api::Run::open(run, data_dir)?;
    let e = r.export(out)?;
    if e.dim == 0 {
        eprintln!("exported the neighbour lists of {} items (best first) to {}", e.items, e.files[0].display());
    } else {
        eprintln!("exported {} items and {} users (dim {}) to {}", e.items, e.users, e.dim, out.display());
    }
    Ok(())
}

pub fn build(
    run: &Path,
    data_dir: Option<&Path>,
    params: &IndexParams,
    synthetic_items: Option<usize>,
    out: Option<&Path>,
) -> Result<()> {
    let r = load_run(run, data_dir)?;
    let (ids, vecs, d) = item_rows(&r.model)?;
    let total = synthetic_items.unwrap_or(ids.len());
    if total < ids.len() {
        bail!("--synthetic-items {total} is fewer than the run's {} items", ids.len());
    }
    // Synthetic ids start past every vocabulary row, where the server looks for them.
    let padded = Padded::new(&ids, &vecs, d, total, r.model.item_rows() as u32)?;
    let t0 = Instant::now();
    let index = build_over(params, &padded, Some(&padded.ids))?;
    let secs = t0.elapsed().as_secs_f64();
    let path = out.map(Path::to_owned).unwrap_or_else(|| run.join(INDEX_FILE));
    index.save(&path)?;
    if out.is_none() {
        let info = IndexInfo {
            params: index.params().to_string(),
            items: index.len(),
            dim: d,
            build_seconds: secs,
            memory_bytes: index.memory_bytes(),
        };
        let info_path = run.join(INDEX_INFO);
        std::fs::write(&info_path, toml::to_string(&info)?)
            .with_context(|| format!("cannot write {}", info_path.display()))?;
    }
    eprintln!(
        "built {} over {} items in {secs:.2}s ({:.1} MB); saved {}",
        index.params(),
        index.len(),
        index.memory_bytes() as f64 / 1e6,
        path.display()
    );
    Ok(())
}

/// Builds an index over every row of `src`, with ids `ids` or the row numbers. The compressed
/// kinds stream the rows in blocks (at 10^8 rows the floats would not fit in memory); the other
/// kinds read them whole.
fn build_over(params: &IndexParams, src: &dyn VectorSource, ids: Option<&[u32]>) -> Result<Box<dyn Index>> {
    if let IndexParams::IvfPq(p) = params {
        let progress = needle_api::progress::BarProgress::default();
        let ix = needle_index::IvfPqIndex::build_from(p, src, ids, &progress)?;
        progress.finish();
        return Ok(Box::new(ix));
    }
    let mut all = vec![0.0f32; src.rows() * src.dim()];
    src.read(0, &mut all)?;
    let rows: Vec<u32>;
    let ids = match ids {
        Some(ids) => ids,
        None => {
            rows = (0..src.rows() as u32).collect();
            &rows
        }
    };
    Ok(needle_index::build(params, ids, &all, src.dim())?)
}

/// Builds an index over the rows of a `.npy` file (ids = row numbers) and saves it at `out`.
/// IVF-PQ streams the file in blocks; the other kinds read it whole.
pub fn build_vectors(vectors: &Path, params: &IndexParams, out: &Path) -> Result<()> {
    let npy = needle_index::NpyFile::open(vectors)?;
    let t0 = Instant::now();
    let index = build_over(params, &npy, None)?;
    let secs = t0.elapsed().as_secs_f64();
    index.save(out)?;
    eprintln!(
        "built {} over {} rows of {} in {secs:.1}s ({:.1} MB); saved {}",
        index.params(),
        index.len(),
        vectors.display(),
        index.memory_bytes() as f64 / 1e6,
        out.display()
    );
    Ok(())
}

/// `needle index verify`: header, structure and the checksum over every byte.
pub fn verify(path: &Path) -> Result<()> {
    let t0 = Instant::now();
    let size = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    let index = needle_index::open(path, needle_index::Verify::Full)?;
    println!(
        "{}: ok — {} over {} vectors of dimension {}, {:.1} MB, checksum verified in {:.2}s",
        path.display(),
        index.params(),
        index.len(),
        index.dim(),
        size as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A run's item vectors padded to `total` rows with synthetic ones, for benchmarking serving at
/// a large catalogue's scale. Synthetic row `i` is a real item's vector (chosen by `i`'s own
/// seeded stream) plus Gaussian noise of about half its norm, rescaled to that norm, so the
/// padded catalogue keeps the real one's geometry and synthetic items neither crowd out nor
/// hide behind real ones. Rows are made on demand, so the padded set is never held whole. Their
/// ids follow the real ids; the server names them `synthetic-ID`.
struct Padded<'a> {
    real: &'a [f32],
    norms: Vec<f32>,
    d: usize,
    ids: Vec<u32>,
    rng: needle_model::rng::Rng,
}

impl<'a> Padded<'a> {
    fn new(ids: &[u32], real: &'a [f32], d: usize, total: usize, first: u32) -> Result<Self> {
        if ids.is_empty() || first as usize + total > u32::MAX as usize {
            bail!("cannot pad {} items to {total}", ids.len());
        }
        let mut all = Vec::with_capacity(total);
        all.extend_from_slice(ids);
        all.extend(first..first + (total - ids.len()) as u32);
        let norms = real.chunks_exact(d).map(|v| v.iter().map(|x| x * x).sum::<f32>().sqrt()).collect();
        Ok(Padded { real, norms, d, ids: all, rng: needle_model::rng::Rng::new(7) })
    }
}

impl VectorSource for Padded<'_> {
    fn dim(&self) -> usize {
        self.d
    }

    fn rows(&self) -> usize {
        self.ids.len()
    }

    fn read(&self, start: usize, out: &mut [f32]) -> needle_index::Result<()> {
        let (d, n_real) = (self.d, self.norms.len());
        let sigma = 0.5 / (d as f32).sqrt();
        for (i, v) in out.chunks_exact_mut(d).enumerate() {
            let row = start + i;
            if row < n_real {
                v.copy_from_slice(&self.real[row * d..(row + 1) * d]);
                continue;
            }
            let mut rng = self.rng.fork(row as u64);
            let src = rng.below(n_real);
            let norm = self.norms[src];
            for (x, &r) in v.iter_mut().zip(&self.real[src * d..(src + 1) * d]) {
                *x = r + rng.normal() * sigma * norm;
            }
            let new_norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
            v.iter_mut().for_each(|x| *x *= norm / new_norm);
        }
        Ok(())
    }
}

fn load_index(run: &Path, model_dim: usize) -> Result<(Box<dyn Index>, IndexInfo)> {
    let path = run.join(INDEX_FILE);
    if !path.exists() {
        bail!("{} has no index; build one with `needle index build --run {}`", run.display(), run.display());
    }
    let index = needle_index::open_for_serving(&path)?;
    let info_path = run.join(INDEX_INFO);
    let text = std::fs::read_to_string(&info_path).with_context(|| format!("cannot read {}", info_path.display()))?;
    let info: IndexInfo = toml::from_str(&text).with_context(|| format!("{} is not valid", info_path.display()))?;
    if index.dim() != model_dim {
        bail!("the index has dimension {} but the model's vectors have {model_dim}; rebuild it", index.dim());
    }
    Ok((index, info))
}

/// The user's known items, to keep out of the results.
fn seen(p: &Prepared, u: usize) -> Vec<u32> {
    let mut s: Vec<u32> = p.history(u, Stage::Test).collect();
    s.sort_unstable();
    s
}

fn test_users(p: &Prepared) -> Vec<usize> {
    (0..p.n_users()).filter(|&u| !p.test.get(u).is_empty()).collect()
}

/// The users `needle eval --ann` scores: the same sample as the exact evaluation.
fn sampled_test_users(r: &LoadedRun, n: Option<usize>) -> Vec<usize> {
    needle_train::model::eval_users(&r.prepared, Stage::Test, n, crate::metrics::eval_seed())
}

pub fn eval(run: &Path, data_dir: Option<&Path>, ks: &[usize], effort: Option<usize>) -> Result<()> {
    let r = load_run(run, data_dir)?;
    has_vectors(&r.model)?;
    let (mut index, info) = load_index(run, r.model.dim())?;
    if let Some(e) = effort {
        index.set_search_effort(e);
    }
    let kmax = ks.iter().copied().max().unwrap_or(100);
    let users = test_users(&r.prepared);
    let uv = needle_train::model::user_vectors(&r.model, &r.prepared, &users, Stage::Test);
    let (ids, vecs, d) = item_rows(&r.model)?;
    let exact = needle_index::build(&IndexParams::Exact, &ids, &vecs, d)?;
    let truth = exact.search_batch(&uv, kmax)?;
    // Single-threaded, one query at a time: the serving situation.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let (got, single_secs) = pool.install(|| -> Result<_> {
        let mut out = Vec::with_capacity(users.len());
        let mut buf = Vec::new();
        let t0 = Instant::now();
        for q in uv.chunks_exact(d) {
            index.search(q, kmax, &mut buf)?;
            out.push(buf.clone());
        }
        Ok((out, t0.elapsed().as_secs_f64()))
    })?;
    let t0 = Instant::now();
    let batched = index.search_batch(&uv, kmax)?;
    let batch_secs = t0.elapsed().as_secs_f64();
    // Batched search may sum in another order (blocked products), so compare ids, not scores.
    let ids = |r: &[Vec<(u32, f32)>]| r.iter().map(|l| l.iter().map(|p| p.0).collect::<Vec<_>>()).collect::<Vec<_>>();
    let agree = needle_index::recall_at_k(&got, &batched, kmax);
    if ids(&batched) != ids(&got) {
        eprintln!("note: batched and one-at-a-time results overlap {agree:.4} (ties broken differently)");
    }
    let n_queries = uv.len() / d;
    println!(
        "{} over {} items (dim {}), {n_queries} queries (test users' vectors, {} per user)",
        info.params,
        info.items,
        info.dim,
        r.model.interests()
    );
    println!("| metric | value |\n|---|---|");
    for &k in ks {
        println!("| recall@{k} vs exact | {:.4} |", needle_index::recall_at_k(&truth, &got, k));
    }
    let n = n_queries as f64;
    println!("| queries/s, 1 thread, one at a time | {:.0} |", n / single_secs);
    println!("| queries/s, batched, {} threads | {:.0} |", rayon::current_num_threads(), n / batch_secs);
    println!("| build time s | {:.2} |", info.build_seconds);
    println!("| index memory MB | {:.2} |", info.memory_bytes as f64 / 1e6);
    Ok(())
}

/// Test metrics with retrieval through the run's index instead of the exact scan.
pub fn eval_ann(
    r: &LoadedRun,
    ks: &[usize],
    keep_seen: bool,
    eval_users: Option<usize>,
) -> Result<needle_eval::Report> {
    has_vectors(&r.model)?;
    let (index, info) = load_index(&r.dir, r.model.dim())?;
    let p = &r.prepared;
    let kmax = ks.iter().copied().max().unwrap_or(100);
    let users = sampled_test_users(r, eval_users);
    let uv = needle_train::model::user_vectors(&r.model, p, &users, Stage::Test);
    let d = r.model.dim();
    let ni = r.model.interests();
    let mut ids = vec![u32::MAX; users.len() * ni * kmax];
    let mut scores = vec![f32::NEG_INFINITY; users.len() * ni * kmax];
    let mut buf = Vec::new();
    let bar = needle_api::progress::count_bar(users.len() as u64, "test through the index");
    // Each interest vector is one query; a multi-interest user's lists merge by score below.
    for (q_i, q) in uv.chunks_exact(d).enumerate() {
        if q_i % (ni * 256) == 0 {
            bar.set_position((q_i / ni) as u64);
        }
        let u = users[q_i / ni];
        if keep_seen {
            index.search(q, kmax, &mut buf)?;
        } else {
            let s = seen(p, u);
            index.search_filtered(q, kmax, &|id| s.binary_search(&id).is_err(), &mut buf)?;
        }
        for (slot, &(id, score)) in buf.iter().enumerate().take(kmax) {
            ids[q_i * kmax + slot] = id;
            scores[q_i * kmax + slot] = score;
        }
    }
    bar.finish_and_clear();
    let ranked = if ni > 1 { merge_interests(&ids, &scores, users.len(), ni, kmax).0 } else { ids };
    let mut targets = Lists::new();
    for &u in &users {
        targets.push(p.test.get(u).iter().copied());
    }
    eprintln!("through index {}", info.params);
    Ok(score(&ranked, kmax, &targets, ks, p.items.len() - 1))
}

pub fn print_report(title: &str, report: &needle_eval::Report) {
    println!("{title}:\n{}", format_table(report));
}
