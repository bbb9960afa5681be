//! `needle.Index`: an ANN index over any float32 vectors, built, searched, saved and opened
//! (memory-mapped) from numpy arrays without copying them into Python objects.

use crate::{invalid, to_py};
use needle_api::index::{self as ix, IndexParams};
use numpy::{IntoPyArray, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use rayon::prelude::*;
use std::path::PathBuf;

#[pyclass(module = "needle._needle", frozen)]
pub struct Index {
    inner: Box<dyn ix::Index>,
}

fn index_err(e: ix::IndexError) -> PyErr {
    to_py(needle_api::Error::Index(e))
}

#[pymethods]
impl Index {
    /// Builds an index of `spec` (`hnsw:m=16,ef_search=128`, `ivfsq8`, `ivfpq:m=16`, `exact`,
    /// `ivf`) over `vectors` (`[n, d]`, C-contiguous float32) with `ids` (uint32, default
    /// `0..n`).
    #[staticmethod]
    #[pyo3(signature = (vectors, spec, ids=None))]
    fn _build(
        py: Python<'_>,
        vectors: PyReadonlyArray2<'_, f32>,
        spec: &str,
        ids: Option<PyReadonlyArray1<'_, u32>>,
    ) -> PyResult<Index> {
        let params: IndexParams = spec.parse().map_err(index_err)?;
        let [n, dim] = [vectors.shape()[0], vectors.shape()[1]];
        let data = vectors.as_slice().map_err(|e| invalid(format!("vectors: {e}")))?;
        let owned_ids: Vec<u32>;
        let ids = match &ids {
            Some(a) => {
                let s = a.as_slice().map_err(|e| invalid(format!("ids: {e}")))?;
                if s.len() != n {
                    return Err(invalid(format!("{} ids for {n} vectors", s.len())));
                }
                s
            }
            None => {
                let n32 = u32::try_from(n).map_err(|_| invalid("more than 2^32 vectors"))?;
                owned_ids = (0..n32).collect();
                &owned_ids
            }
        };
        if data.iter().any(|v| !v.is_finite()) {
            return Err(invalid("vectors hold NaN or infinite values"));
        }
        let inner = py.detach(|| ix::build(&params, ids, data, dim)).map_err(index_err)?;
        Ok(Index { inner })
    }

    /// Opens a saved index, memory-mapped and checked against its checksum.
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Index> {
        let inner = py.detach(|| ix::open(&path, ix::Verify::Full)).map_err(index_err)?;
        Ok(Index { inner })
    }

    /// Writes the index to `path` (a temporary file, then a rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path)).map_err(index_err)
    }

    /// The `k` best ids and scores of each query (`[m, d]`), `[m, k]` each, padded with
    /// `u32::MAX` / `-inf`; `allowed` limits results to those ids. Queries run in parallel.
    #[pyo3(signature = (queries, k, allowed=None, effort=None))]
    fn _search<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
        allowed: Option<PyReadonlyArray1<'py, u32>>,
        effort: Option<usize>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        if k == 0 {
            return Err(invalid("k must be at least 1"));
        }
        let dim = self.inner.dim();
        if queries.shape()[1] != dim {
            return Err(invalid(format!("queries have {} dimensions, the index {dim}", queries.shape()[1])));
        }
        let q = queries.as_slice().map_err(|e| invalid(format!("queries: {e}")))?;
        let allowed = match &allowed {
            Some(a) => Some(
                ix::Allowed::new(a.as_slice().map_err(|e| invalid(format!("allowed: {e}")))?.to_vec())
                    .map_err(index_err)?,
            ),
            None => None,
        };
        let m = queries.shape()[0];
        let mut ids = vec![u32::MAX; m * k];
        let mut scores = vec![f32::NEG_INFINITY; m * k];
        py.detach(|| {
            ids.par_chunks_mut(k).zip(scores.par_chunks_mut(k)).zip(q.par_chunks(dim)).try_for_each_init(
                Vec::new,
                |buf, ((ids, scores), query)| {
                    match &allowed {
                        Some(a) => {
                            ix::search_among(&*self.inner, query, k, a, &|_| true, buf)?;
                        }
                        None => {
                            let opts = ix::SearchOptions { effort, ..Default::default() };
                            self.inner.search_with(query, k, &opts, buf)?
                        }
                    }
                    for (j, &(id, s)) in buf.iter().take(k).enumerate() {
                        ids[j] = id;
                        scores[j] = s;
                    }
                    Ok::<_, ix::IndexError>(())
                },
            )
        })
        .map_err(index_err)?;
        Ok((ids.into_pyarray(py).reshape([m, k])?.into_any(), scores.into_pyarray(py).reshape([m, k])?.into_any()))
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// The index's kind and parameters, as `Index.build` takes them.
    #[getter]
    fn spec(&self) -> String {
        self.inner.params().to_string()
    }

    #[getter]
    fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes()
    }

    fn __repr__(&self) -> String {
        format!("Index({}, {} vectors of {} dimensions)", self.inner.params(), self.inner.len(), self.inner.dim())
    }
}
