//! needle's Python extension (`needle._needle`): the library API of `needle-api` behind pyo3.
//! Tables come in through the Arrow C stream interface without a copy to Python objects,
//! arrays go out as numpy, and long work runs with the GIL released. The names users see, their
//! documentation and the DataFrame conversions live in the `needle` package beside it
//! (`python/needle/`).

mod dataset;
mod index;
mod run;

use pyo3::prelude::*;
use pyo3::types::PyType;

/// A needle error as the Python exception of its kind (classes in `needle._errors`), with the
/// message the CLI prints.
pub(crate) fn to_py(e: needle_api::Error) -> PyErr {
    use needle_api::Error as E;
    let kind = match &e {
        E::Config(_) => "ConfigError",
        E::Data(_) => "DataError",
        E::Train(needle_api::TrainError::Config(_)) => "ConfigError",
        E::Train(needle_api::TrainError::Load(_) | needle_api::TrainError::Data(_)) => "DataError",
        E::Train(needle_api::TrainError::Cancelled | needle_api::TrainError::Stopped(_)) => "Cancelled",
        E::Train(needle_api::TrainError::Run(_)) => "RunError",
        E::Train(needle_api::TrainError::Io { .. }) => "FileError",
        E::Train(_) => "TrainError",
        E::Run(_) => "RunError",
        E::Index(_) => "VectorIndexError",
        E::Io { .. } => "FileError",
        E::Invalid(_) => "InvalidArgument",
    };
    raise(kind, e.to_string())
}

/// A `needle._errors` exception of class `kind`.
pub(crate) fn raise(kind: &str, msg: String) -> PyErr {
    Python::attach(|py| {
        let class =
            py.import("needle._errors").and_then(|m| m.getattr(kind)).and_then(|c| Ok(c.cast_into::<PyType>()?));
        match class {
            Ok(c) => PyErr::from_type(c, msg),
            Err(e) => e,
        }
    })
}

/// An argument out of range: `needle.InvalidArgument` (a `ValueError`).
pub(crate) fn invalid(msg: impl Into<String>) -> PyErr {
    raise("InvalidArgument", msg.into())
}

#[pymodule]
fn _needle(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<dataset::Dataset>()?;
    m.add_class::<run::Run>()?;
    m.add_class::<index::Index>()?;
    m.add_function(wrap_pyfunction!(run::train, m)?)?;
    m.add_function(wrap_pyfunction!(run::tune, m)?)?;
    m.add_function(wrap_pyfunction!(run::default_config, m)?)?;
    m.add("DEFAULT_EVAL_SEED", needle_api::DEFAULT_EVAL_SEED)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
