//! `needle.Dataset`: interaction data from an Arrow table in memory (what pandas, Polars and
//! pyarrow hand over), a schema file, or a built-in dataset.

use crate::to_py;
use arrow_pyarrow::{FromPyArrow, Table};
use needle_api::{Column, DataConfig, EntityTable, FeatureColumn, Frame, InteractionsSchema, LoadOptions, Schema};
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

/// Where a dataset's events are.
pub(crate) enum Source {
    /// Parsed from tables in memory; a run trained on it keeps a binary copy in its folder.
    Memory(Arc<needle_api::Dataset>),
    /// Read through a `[data]` section (a schema file or a built-in dataset), as a config reads it.
    Config { data: DataConfig, data_dir: Option<PathBuf> },
}

/// Whether raw ids came from integer columns (so they go back to Python as integers).
#[derive(Clone, Copy, Default)]
pub(crate) struct IdTypes {
    pub user_int: bool,
    pub item_int: bool,
}

#[pyclass(module = "needle._needle", frozen)]
pub struct Dataset {
    pub(crate) source: Source,
    pub(crate) ids: IdTypes,
    name: String,
    fingerprint: String,
    counts: (usize, usize, usize),
    skipped: usize,
}

/// A feature spec from Python: `(column, separator or None)`.
type Feature = (String, Option<String>);

fn features(spec: Vec<Feature>) -> Vec<FeatureColumn> {
    spec.into_iter()
        .map(|(column, separator)| FeatureColumn { column: Column::Name(column), separator, name: None })
        .collect()
}

fn table(role: &str, t: &Bound<'_, PyAny>) -> PyResult<(Frame, Vec<(String, bool)>)> {
    let (batches, schema) = Table::from_pyarrow_bound(t)?.into_inner();
    let types = schema.fields().iter().map(|f| (f.name().clone(), f.data_type().is_integer())).collect();
    Ok((Frame::new(role, schema, batches).map_err(|e| to_py(e.into()))?, types))
}

fn is_int(types: &[(String, bool)], column: &str) -> bool {
    types.iter().any(|(n, int)| n == column && *int)
}

impl Dataset {
    fn of(source: Source, ds: &needle_api::Dataset, ids: IdTypes) -> Dataset {
        Dataset {
            name: ds.name.clone(),
            fingerprint: ds.fingerprint(),
            counts: (ds.user_ids.len(), ds.item_ids.len(), ds.events.len()),
            skipped: ds.report.skipped_total(),
            source,
            ids,
        }
    }
}

#[pymethods]
impl Dataset {
    /// Reads tables that export the Arrow C stream interface (`__arrow_c_stream__`: pyarrow
    /// tables, Polars DataFrames). The `needle.Dataset.from_*` functions call this.
    #[staticmethod]
    #[pyo3(signature = (events, user, item, time, rating=None, user_features=vec![], item_features=vec![],
        items=None, item_id=None, item_title=None, item_table_features=vec![],
        users=None, user_id=None, user_table_features=vec![], name="dataframe".to_owned(), skip_bad_rows=false))]
    #[allow(clippy::too_many_arguments)]
    fn _from_arrow(
        py: Python<'_>,
        events: &Bound<'_, PyAny>,
        user: String,
        item: String,
        time: String,
        rating: Option<String>,
        user_features: Vec<Feature>,
        item_features: Vec<Feature>,
        items: Option<&Bound<'_, PyAny>>,
        item_id: Option<String>,
        item_title: Option<String>,
        item_table_features: Vec<Feature>,
        users: Option<&Bound<'_, PyAny>>,
        user_id: Option<String>,
        user_table_features: Vec<Feature>,
        name: String,
        skip_bad_rows: bool,
    ) -> PyResult<Dataset> {
        let (events, types) = table("events", events)?;
        let ids = IdTypes { user_int: is_int(&types, &user), item_int: is_int(&types, &item) };
        let side = |role: &str, t: Option<&Bound<'_, PyAny>>, id: Option<String>, title: Option<String>, feats| {
            let Some(t) = t else { return Ok((None, None)) };
            let (frame, _) = table(role, t)?;
            let spec = EntityTable {
                path: role.into(),
                format: None,
                delimiter: ",".into(),
                header: true,
                id: Column::Name(id.unwrap_or_else(|| if role == "items" { item.clone() } else { user.clone() })),
                title: title.map(Column::Name),
                features: features(feats),
            };
            PyResult::Ok((Some(frame), Some(spec)))
        };
        let (item_frame, item_spec) = side("items", items, item_id, item_title, item_table_features)?;
        let (user_frame, user_spec) = side("users", users, user_id, None, user_table_features)?;
        let schema = Schema {
            name: Some(name.clone()),
            interactions: InteractionsSchema {
                path: "events".into(),
                format: None,
                delimiter: ",".into(),
                header: true,
                user: Column::Name(user),
                item: Column::Name(item),
                timestamp: Column::Name(time),
                rating: rating.map(Column::Name),
            },
            user_features: features(user_features),
            item_features: features(item_features),
            items: item_spec,
            users: user_spec,
        };
        let opts = LoadOptions { skip_bad_rows };
        let ds = py
            .detach(|| {
                needle_api::load_frames(
                    &name,
                    &schema,
                    &events,
                    item_frame.as_ref(),
                    user_frame.as_ref(),
                    &opts,
                    &mut |_, _| {},
                )
            })
            .map_err(|e| to_py(e.into()))?;
        if ds.events.is_empty() {
            return Err(crate::raise("DataError", "the events table has no usable rows".into()));
        }
        let ds = Arc::new(ds);
        Ok(Dataset::of(Source::Memory(ds.clone()), &ds, ids))
    }

    /// A dataset described by a schema file (CSV/TSV or Parquet log, optional tables), read
    /// through its binary dataset as `needle train` reads it.
    #[staticmethod]
    #[pyo3(signature = (path, skip_bad_rows=false))]
    fn from_schema(py: Python<'_>, path: PathBuf, skip_bad_rows: bool) -> PyResult<Dataset> {
        let path = std::path::absolute(&path).map_err(|e| crate::invalid(format!("{}: {e}", path.display())))?;
        let mut data = DataConfig::from_source(None, Some(path), None);
        data.skip_bad_rows = skip_bad_rows;
        Dataset::through(py, data, None)
    }

    /// A built-in dataset (`ml-1m`, `ml-100k`) from `data_dir` (default `$NEEDLE_DATA_DIR`, else
    /// `./data`).
    #[staticmethod]
    #[pyo3(signature = (name, data_dir=None))]
    fn builtin(py: Python<'_>, name: String, data_dir: Option<PathBuf>) -> PyResult<Dataset> {
        Dataset::through(py, DataConfig::from_source(Some(name), None, None), data_dir)
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// A hash of the events (user, item, time in order): equal for equal logs, whatever they
    /// were read from; a run records it and refuses other data.
    #[getter]
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    #[getter]
    fn n_users(&self) -> usize {
        self.counts.0
    }

    #[getter]
    fn n_items(&self) -> usize {
        self.counts.1
    }

    #[getter]
    fn n_events(&self) -> usize {
        self.counts.2
    }

    /// Rows skipped as malformed (with `skip_bad_rows`).
    #[getter]
    fn skipped_rows(&self) -> usize {
        self.skipped
    }

    fn __len__(&self) -> usize {
        self.counts.2
    }

    fn __repr__(&self) -> String {
        let from = match &self.source {
            Source::Memory(_) => "in memory".to_owned(),
            Source::Config { data, .. } => match (&data.dataset, &data.schema) {
                (Some(n), _) => format!("built-in {n}"),
                (_, Some(p)) => format!("schema {}", p.display()),
                _ => "binary".to_owned(),
            },
        };
        format!(
            "Dataset({:?}: {} events, {} users, {} items; {from})",
            self.name, self.counts.2, self.counts.0, self.counts.1
        )
    }
}

impl Dataset {
    /// Loads `data` now, so a bad schema or a missing file fails here and not at training.
    fn through(py: Python<'_>, data: DataConfig, data_dir: Option<PathBuf>) -> PyResult<Dataset> {
        let (probe, _) = needle_api::default_config(data.clone(), 0);
        let ds = py.detach(|| needle_api::load_dataset(&probe, data_dir.as_deref())).map_err(to_py)?;
        Ok(Dataset::of(Source::Config { data, data_dir }, &ds, IdTypes::default()))
    }
}
