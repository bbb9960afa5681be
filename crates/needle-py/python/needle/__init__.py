"""needle: the recall stage of a recommender, from Python.

Three lines from a DataFrame of events to a trained, evaluated model::

    import needle
    data = needle.Dataset.from_pandas(ratings, user="user_id", item="item_id", time="timestamp")
    run = needle.train(data=data, out="runs/seq")          # the default config for the log's size
    ids, scores = run.recall(users=[1, 2], k=100)           # numpy arrays, [2, 100]

Everything runs in needle's Rust core: tables cross over through the Arrow C data interface,
vectors come back as numpy arrays, and long work releases the GIL.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _needle
from ._errors import (
    Cancelled,
    ConfigError,
    DataError,
    FileError,
    InvalidArgument,
    NeedleError,
    RunError,
    TrainError,
    VectorIndexError,
)

__version__ = _needle.__version__
DEFAULT_EVAL_SEED = _needle.DEFAULT_EVAL_SEED

__all__ = [
    "Dataset",
    "Run",
    "Index",
    "train",
    "tune",
    "default_config",
    "NeedleError",
    "ConfigError",
    "DataError",
    "TrainError",
    "Cancelled",
    "RunError",
    "VectorIndexError",
    "FileError",
    "InvalidArgument",
]

PathLike = Union[str, "os.PathLike[str]"]
Features = Union[None, Sequence[str], Mapping[str, Optional[str]]]


def _feature_specs(features: Features) -> list:
    """`["genre"]` or `{"genres": "|"}` (column -> separator of a multi-valued field)."""
    if features is None:
        return []
    if isinstance(features, Mapping):
        return [(str(c), None if s is None else str(s)) for c, s in features.items()]
    if isinstance(features, str):
        return [(features, None)]
    return [(str(c), None) for c in features]


def _check_columns(role: str, have: Sequence[str], wanted: Iterable[Optional[str]]) -> None:
    have = [str(c) for c in have]
    for c in wanted:
        if c is not None and c not in have:
            raise DataError(f"{role}: column {c!r} not found (columns: {', '.join(have)})")


def _decode_dictionaries(table):
    """Categorical columns (Arrow dictionaries) as their values."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(field.type.value_type))
    return table


def _arrow_table(obj, role: str, columns: Sequence[str]):
    """A table holding `columns` of a pandas or Polars DataFrame or an Arrow table, for the
    Arrow C stream interface. Only those columns cross over."""
    kind = type(obj).__module__.split(".")[0]
    if kind == "pandas":
        import pyarrow as pa

        _check_columns(role, list(obj.columns), columns)
        return _decode_dictionaries(pa.Table.from_pandas(obj[list(columns)], preserve_index=False))
    if kind == "polars":
        import polars as pl

        _check_columns(role, obj.columns, columns)
        sel = obj.select(list(columns))
        cats = [c for c, t in sel.schema.items() if t in (pl.Categorical, pl.Enum)]
        if cats:
            sel = sel.with_columns([pl.col(c).cast(pl.Utf8) for c in cats])
        return sel
    if kind == "pyarrow":
        _check_columns(role, obj.schema.names, columns)
        return _decode_dictionaries(obj.select(list(columns)))
    raise InvalidArgument(
        f"{role}: expected a pandas or Polars DataFrame or a pyarrow Table, got {type(obj).__name__}"
    )


def _columns_of(obj) -> list:
    if type(obj).__module__.split(".")[0] == "pyarrow":
        return list(obj.schema.names)
    return [str(c) for c in obj.columns]


class Dataset:
    """Interaction events (user, item, time, optional rating) with optional item and user tables.

    Build one with :meth:`from_pandas`, :meth:`from_polars`, :meth:`from_arrow`,
    :meth:`from_schema` or :meth:`builtin`. Ids may be strings or integers; times are integers
    (any monotone unit, e.g. Unix seconds) or datetimes (taken in seconds).
    """

    def __init__(self, native):
        self._native = native

    @classmethod
    def _from_table(
        cls,
        events,
        user: str,
        item: str,
        time: str,
        rating: Optional[str],
        event_user_features: Features,
        event_item_features: Features,
        items,
        item_id: Optional[str],
        item_title: Optional[str],
        item_features: Features,
        users,
        user_id: Optional[str],
        user_features: Features,
        name: str,
        skip_bad_rows: bool,
    ) -> "Dataset":
        euf, eif = _feature_specs(event_user_features), _feature_specs(event_item_features)
        cols = [user, item, time] + ([rating] if rating else []) + [c for c, _ in euf + eif]
        ev = _arrow_table(events, "events", cols)
        it = us = None
        itf = usf = []
        if items is not None:
            item_id = item_id or item
            if item_features is None:
                item_features = [c for c in _columns_of(items) if c not in (item_id, item_title)]
            itf = _feature_specs(item_features)
            it = _arrow_table(items, "items", [item_id] + ([item_title] if item_title else []) + [c for c, _ in itf])
        if users is not None:
            user_id = user_id or user
            if user_features is None:
                user_features = [c for c in _columns_of(users) if c != user_id]
            usf = _feature_specs(user_features)
            us = _arrow_table(users, "users", [user_id] + [c for c, _ in usf])
        native = _needle.Dataset._from_arrow(
            ev,
            user,
            item,
            time,
            rating,
            euf,
            eif,
            it,
            item_id,
            item_title,
            itf,
            us,
            user_id,
            usf,
            name,
            skip_bad_rows,
        )
        return cls(native)

    @classmethod
    def from_pandas(
        cls,
        df,
        user: str = "user_id",
        item: str = "item_id",
        time: str = "timestamp",
        rating: Optional[str] = None,
        items=None,
        users=None,
        *,
        item_id: Optional[str] = None,
        item_title: Optional[str] = None,
        item_features: Features = None,
        user_id: Optional[str] = None,
        user_features: Features = None,
        event_user_features: Features = None,
        event_item_features: Features = None,
        name: str = "dataframe",
        skip_bad_rows: bool = False,
    ) -> "Dataset":
        """A dataset from a pandas DataFrame of events (needs pyarrow).

        `user`, `item`, `time` and `rating` name the events' columns. `items` and `users` are
        optional DataFrames keyed by `item_id` / `user_id` (default: the events' column names);
        their other columns are categorical features unless `item_features` / `user_features`
        lists them; a list column is multi-valued, and so is a string column given a separator
        (a dict maps a column to it, e.g. ``{"genres": "|"}``); `item_title` names the items' display title. A missing column is
        a :class:`DataError` that names it and the columns there are. Rows with a null id or
        time are errors unless `skip_bad_rows` (then they are counted in ``skipped_rows``).
        """
        return cls._from_table(
            df, user, item, time, rating, event_user_features, event_item_features,
            items, item_id, item_title, item_features, users, user_id, user_features, name, skip_bad_rows,
        )

    @classmethod
    def from_polars(cls, df, user: str = "user_id", item: str = "item_id", time: str = "timestamp",
                    rating: Optional[str] = None, items=None, users=None, **kw) -> "Dataset":
        """A dataset from a Polars DataFrame of events; the arguments are those of
        :meth:`from_pandas`."""
        return cls.from_pandas(df, user, item, time, rating, items, users, **kw)

    @classmethod
    def from_arrow(cls, table, user: str = "user_id", item: str = "item_id", time: str = "timestamp",
                   rating: Optional[str] = None, items=None, users=None, **kw) -> "Dataset":
        """A dataset from a pyarrow Table of events; the arguments are those of
        :meth:`from_pandas`."""
        return cls.from_pandas(table, user, item, time, rating, items, users, **kw)

    @classmethod
    def from_schema(cls, path: PathLike, skip_bad_rows: bool = False) -> "Dataset":
        """A dataset described by a needle schema file (a CSV/TSV or Parquet log and optional
        tables), read through its binary dataset as ``needle train`` reads it."""
        return cls(_needle.Dataset.from_schema(os.fspath(path), skip_bad_rows))

    @classmethod
    def builtin(cls, name: str, data_dir: Optional[PathLike] = None) -> "Dataset":
        """A built-in dataset, ``"ml-1m"`` or ``"ml-100k"``, from `data_dir` (default
        ``$NEEDLE_DATA_DIR``, else ``./data``; ``needle data download`` fetches them)."""
        return cls(_needle.Dataset.builtin(name, None if data_dir is None else os.fspath(data_dir)))

    @property
    def name(self) -> str:
        return self._native.name

    @property
    def fingerprint(self) -> str:
        """A hash of the events in order: equal for equal logs, whatever they were read from."""
        return self._native.fingerprint

    @property
    def n_users(self) -> int:
        return self._native.n_users

    @property
    def n_items(self) -> int:
        return self._native.n_items

    @property
    def n_events(self) -> int:
        return self._native.n_events

    @property
    def skipped_rows(self) -> int:
        """Rows skipped as malformed (with ``skip_bad_rows=True``)."""
        return self._native.skipped_rows

    def __len__(self) -> int:
        return len(self._native)

    def __repr__(self) -> str:
        return repr(self._native)


def default_config(train_events: int) -> dict:
    """The config needle picks for a log of `train_events` training events when none is given
    (without its ``data`` section): the sequential model with the values chosen on MovieLens-1M
    above 200,000 events, those tuned on MovieLens-100k below."""
    text, _why = _needle.default_config(int(train_events))
    return json.loads(text)


def _call_args(config, data, out, quiet: bool, what: str, expected: str, none_ok: bool):
    """What :func:`train` and :func:`tune` hand to the extension: the output folder (a new
    temporary one, said on stderr, when None), the config as a file path or as JSON, and the
    dataset's native object."""
    if out is None:
        out = tempfile.mkdtemp(prefix=f"needle-{what}-")
        if not quiet:
            print(f"{what}: {out}", file=sys.stderr)
    path = js = None
    if isinstance(config, Mapping):
        js = json.dumps(dict(config))
    elif isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
    elif config is not None or not none_ok:
        raise InvalidArgument(f"config must be {expected}, not {type(config).__name__}")
    if data is not None and not isinstance(data, Dataset):
        raise InvalidArgument(f"data must be a needle.Dataset, not {type(data).__name__}")
    return os.fspath(out), path, js, None if data is None else data._native


def train(
    config: Union[None, PathLike, Mapping[str, Any]] = None,
    data: Optional[Dataset] = None,
    out: Optional[PathLike] = None,
    *,
    quiet: bool = False,
    eval_seed: int = DEFAULT_EVAL_SEED,
    data_dir: Optional[PathLike] = None,
    force: bool = False,
    tensorboard: Optional[PathLike] = None,
    tensorboard_every: int = 50,
) -> "Run":
    """Trains a model and returns the saved :class:`Run`.

    `config` is a config file path, a dict of the same sections (``{"model": {...}, "train":
    {...}}``), or None for the default of the log's size (see :func:`default_config`; needle says
    which it picked). `data` is a :class:`Dataset`; without one the config's ``[data]`` is read.
    The run is written to `out` (default: a new temporary folder), which must not hold a run
    unless `force`. A run trained on a DataFrame keeps a binary copy of its data inside `out`,
    so :meth:`Run.open` works on it later.

    Progress bars go to stderr (none with `quiet`). Ctrl-C stops training cleanly: the run of
    the best epoch so far is saved and returned (``run.stopped`` is then True). The test
    targets are scored once at the end (``run.metrics``). TensorBoard event files go to
    `tensorboard` (default ``out/tb``): the loss, learning rate and samples/s every
    `tensorboard_every` steps, each epoch's validation HR@10 and NDCG@10, and the config.
    """
    out, path, js, native_data = _call_args(config, data, out, quiet, "run", "a path, a dict or None", True)
    native, stopped = _needle.train(
        out,
        path,
        js,
        native_data,
        quiet,
        int(eval_seed),
        None if data_dir is None else os.fspath(data_dir),
        force,
        None if tensorboard is None else os.fspath(tensorboard),
        int(tensorboard_every),
    )
    return Run(native, stopped=stopped)


_NO_ROW = np.iinfo(np.uint32).max


class Run:
    """A trained model with the data it was trained on: evaluation, recall, vectors, export.

    Open a saved one with :meth:`Run.open`; :func:`train` returns one.
    """

    def __init__(self, native, stopped: bool = False):
        self._native = native
        self.stopped = stopped
        self._items = None
        self._raw_items = None
        self._users = None

    @classmethod
    def open(cls, path: PathLike, data_dir: Optional[PathLike] = None) -> "Run":
        """Opens the run in `path` with its data (refusing data other than what it was trained on)."""
        return cls(_needle.Run.open(os.fspath(path), None if data_dir is None else os.fspath(data_dir)))

    @property
    def path(self) -> Path:
        return Path(self._native.path)

    @property
    def kind(self) -> str:
        """The model kind: ``sequential``, ``youtubednn``, ``dssm``, ``fm``, ``mind``, ..."""
        return self._native.kind

    @property
    def dim(self) -> int:
        return self._native.dim

    @property
    def config(self) -> dict:
        """The config the run was trained with."""
        return json.loads(self._native._config_json())

    @property
    def training(self) -> dict:
        """How training went: ``epochs_run``, ``best_epoch``, ``seconds``, ``samples_per_sec``, ..."""
        return json.loads(self._native._training_json())

    @property
    def metrics(self) -> dict:
        """The test metrics written at the end of training (``metrics.json``)."""
        p = self.path / "metrics.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def _raw_item_ids(self) -> list:
        """Raw item ids by item row, as the extension holds them (row 0, padding, is "")."""
        if self._raw_items is None:
            self._raw_items = self._native._item_ids()
        return self._raw_items

    def _item_ids(self) -> np.ndarray:
        if self._items is None:
            raw = self._raw_item_ids()
            if self._native.item_ids_are_int:
                ids = np.array([int(s) if s else -1 for s in raw], dtype=np.int64)
            else:
                ids = np.array([s if s else None for s in raw], dtype=object)
            self._items = ids
        return self._items

    def _user_ids(self) -> np.ndarray:
        if self._users is None:
            raw = self._native._user_ids()
            if self._native.user_ids_are_int:
                self._users = np.array([int(s) for s in raw], dtype=np.int64)
            else:
                self._users = np.array(raw, dtype=object)
        return self._users

    def _ids_of(self, rows: np.ndarray) -> np.ndarray:
        """Item ids of item rows; padding (no item) as -1, or None for string ids."""
        table = self._item_ids()
        pad = rows == _NO_ROW
        safe = np.where(pad, 0, rows)
        ids = table[safe]
        if pad.any():
            ids[pad] = -1 if table.dtype != object else None
        return ids

    @staticmethod
    def _raw(ids) -> list:
        return [str(i) for i in ids]

    @property
    def user_ids(self) -> np.ndarray:
        """Every user of the dataset, in dataset order."""
        return self._user_ids()

    @property
    def item_ids(self) -> np.ndarray:
        """Every item of the model's vocabulary."""
        return self._item_ids()[1:]

    def evaluate(
        self,
        k: Union[int, Sequence[int]] = (10, 100),
        split: str = "test",
        *,
        users: Optional[int] = None,
        keep_seen: bool = False,
        seed: int = DEFAULT_EVAL_SEED,
    ) -> dict:
        """HR, recall, NDCG, precision and MRR at each cut-off over the full item corpus, on the
        held-out ``"test"`` or ``"valid"`` targets: ``{"hit_rate@10": ..., "ndcg@10": ...,
        ..., "users": n}``, keyed as in ``metrics.json``. Known items are excluded unless `keep_seen`; `users` scores a seeded
        sample of that many users (default: all on catalogues up to 100,000 items)."""
        ks = [int(k)] if isinstance(k, (int, np.integer)) else [int(x) for x in k]
        return self._native._evaluate(ks, split, users, keep_seen, int(seed))

    def recall(
        self,
        users=None,
        histories=None,
        k: int = 100,
        *,
        filter=None,
        exclude=None,
        keep_seen: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The top `k` items for known `users` (ids; None: every user) from their history, or for
        explicit `histories` (lists of item ids, oldest first). Returns ``(ids, scores)``, each
        ``[n, k]``: item ids as given at training (int64 or str) and float32 scores, best first;
        a row shorter than `k` is padded with -1 (None for str ids) and -inf.

        Known items (a user's history, or the history given) are left out unless `keep_seen`.
        `exclude` is a collection of item ids never to return; `filter` one of the only item
        ids that may be returned (each ranks deeper lists, so a narrow filter costs a full ranking).
        """
        if (users is None) + (histories is None) == 0:
            raise InvalidArgument("give users or histories, not both")
        k = int(k)
        if k < 1:
            raise InvalidArgument("k must be at least 1")
        allowed = banned = None
        depth = k
        if filter is not None:
            allowed = set(self._raw(filter))
            depth = len(self._item_ids()) - 1
        if exclude is not None:
            banned = set(self._raw(exclude))
            depth = min(len(self._item_ids()) - 1, max(depth, k + len(banned)))
        depth = max(depth, 1)

        def rank(d):
            if histories is not None:
                return self._native._recall_histories([self._raw(h) for h in histories], d, keep_seen)
            if users is None:
                return self._native._recall_all(d, keep_seen)
            if isinstance(users, (str, int, np.integer)):
                raise InvalidArgument("users is a list of user ids")
            return self._native._recall_users(self._raw(users), d, keep_seen)

        rows, scores = rank(depth)
        if allowed is None and banned is None:
            return self._ids_of(rows), scores
        keep = np.ones(rows.shape, dtype=bool)
        raw = self._raw_item_ids()
        keep_row = np.array(
            [(allowed is None or r in allowed) and (banned is None or r not in banned) for r in raw], dtype=bool
        )
        keep &= np.where(rows == _NO_ROW, False, keep_row[np.where(rows == _NO_ROW, 0, rows)])
        out_rows = np.full((rows.shape[0], k), _NO_ROW, dtype=np.uint32)
        out_scores = np.full((rows.shape[0], k), -np.inf, dtype=np.float32)
        for i in range(rows.shape[0]):
            r = rows[i][keep[i]][:k]
            out_rows[i, : len(r)] = r
            out_scores[i, : len(r)] = scores[i][keep[i]][:k]
        return self._ids_of(out_rows), out_scores

    def similar_items(self, ids, k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
        """The `k` items most like each of `ids` (itself left out): ``(ids, scores)``, ``[n, k]``."""
        rows, scores = self._native._similar_items(self._raw(ids), int(k))
        return self._ids_of(rows), scores

    def item_vectors(self) -> Tuple[np.ndarray, np.ndarray]:
        """Every item's vector, as an index holds them: ``(ids, vectors)`` with vectors
        ``[n_items, dim]`` float32, bit-identical to ``needle export``."""
        ids, vecs = self._native._item_vectors()
        return self._cast_items(ids), vecs

    def user_vectors(self, users=None, histories=None) -> Tuple[np.ndarray, np.ndarray]:
        """Vectors of known `users` (None: all) from their history, or of explicit `histories`:
        ``(ids, vectors)``, ``[n, dim]`` (``[n, interests, dim]`` for MIND)."""
        if histories is not None:
            if users is not None:
                raise InvalidArgument("give users or histories, not both")
            _, vecs = self._native._history_vectors([self._raw(h) for h in histories])
            return np.arange(len(histories)), vecs
        ids, vecs = self._native._user_vectors(None if users is None else self._raw(users))
        if self._native.user_ids_are_int:
            return np.array([int(s) for s in ids], dtype=np.int64), vecs
        return np.array(ids, dtype=object), vecs

    def _cast_items(self, ids) -> np.ndarray:
        if self._native.item_ids_are_int:
            return np.array([int(s) for s in ids], dtype=np.int64)
        return np.array(ids, dtype=object)

    def export(self, out: PathLike) -> list:
        """Writes ``item_embeddings.npy``/``items.tsv`` and ``user_embeddings.npy``/``users.tsv``
        (``item_neighbors.tsv`` for item-to-item models) into `out`, as ``needle export`` does."""
        return [Path(p) for p in self._native.export(os.fspath(out))]

    def __repr__(self) -> str:
        m = self.metrics
        score = f"; test HR@10 {m['hit_rate@10']:.4f} NDCG@10 {m['ndcg@10']:.4f}" if "hit_rate@10" in m else ""
        stopped = ", stopped early" if self.stopped else ""
        return (
            f"Run({self.kind} on {self._native.dataset}: {len(self._user_ids())} users, "
            f"{len(self._item_ids()) - 1} items, dim {self.dim}{score}{stopped}; {self.path})"
        )


class Index:
    """An approximate nearest-neighbour index (inner product) over any float32 vectors.

    ``Index.build(vectors, ids=None, kind="hnsw", **params)``; kinds: ``hnsw`` (m,
    ef_construction, ef_search), ``ivfsq8`` and ``ivfpq`` (nlist, nprobe, m, rerank), ``ivf``
    (nlist, nprobe) and ``exact``. For cosine similarity, L2-normalise the vectors first.
    """

    def __init__(self, native):
        self._native = native

    @classmethod
    def build(cls, vectors, ids=None, kind: str = "hnsw", metric: str = "ip", **params) -> "Index":
        """Builds an index over `vectors` (``[n, d]``; float32 C-contiguous arrays are used in
        place) with integer `ids` in ``[0, 2**32 - 1)`` (default ``0..n``)."""
        if metric not in ("ip", "inner_product"):
            raise InvalidArgument(f"metric {metric!r}: only the inner product (\"ip\"); L2-normalise vectors for cosine")
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2:
            raise InvalidArgument(f"vectors must be 2-d [n, dim], not {v.ndim}-d")
        native_ids = None
        if ids is not None:
            a = np.asarray(ids)
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise InvalidArgument("ids must be a 1-d array of integers")
            if a.size and (a.min() < 0 or a.max() >= _NO_ROW):
                raise InvalidArgument("ids must lie in [0, 2**32 - 1)")
            native_ids = np.ascontiguousarray(a, dtype=np.uint32)
        spec = kind + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")
        return cls(_needle.Index._build(v, spec, native_ids))

    @classmethod
    def open(cls, path: PathLike) -> "Index":
        """Opens a saved index, memory-mapped, after checking its checksum."""
        return cls(_needle.Index.open(os.fspath(path)))

    def save(self, path: PathLike) -> None:
        """Saves the index to `path` (written to a temporary file, then renamed)."""
        self._native.save(os.fspath(path))

    def search(self, queries, k: int = 10, filter=None, effort: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """The `k` best ``(ids, scores)`` of each query (``[m, d]``, or one ``[d]`` vector),
        ``[m, k]`` each, padded with -1 / -inf. `filter` is an array of the only ids that may be
        returned; `effort` overrides the search breadth (ef_search or nprobe)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        allowed = None
        if filter is not None:
            allowed = np.ascontiguousarray(np.asarray(filter), dtype=np.uint32)
        rows, scores = self._native._search(q, int(k), allowed, effort)
        ids = rows.astype(np.int64)
        ids[rows == _NO_ROW] = -1
        return ids, scores

    def __len__(self) -> int:
        return len(self._native)

    @property
    def dim(self) -> int:
        return self._native.dim

    @property
    def spec(self) -> str:
        """Kind and parameters, e.g. ``hnsw:m=16,ef_construction=200,ef_search=128,seed=42``."""
        return self._native.spec

    def __repr__(self) -> str:
        return repr(self._native)


def _seconds(budget: Union[int, float, str]) -> float:
    """`90`, `"90s"`, `"30m"`, `"2h"` as seconds."""
    if isinstance(budget, (int, float)):
        return float(budget)
    text = str(budget).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise InvalidArgument(f"budget {budget!r} is not a duration such as 90, '90s', '30m' or '2h'") from None


def tune(
    config: Union[PathLike, Mapping[str, Any]],
    data: Optional[Dataset] = None,
    out: Optional[PathLike] = None,
    *,
    budget: Union[int, float, str] = "30m",
    trials: Optional[int] = None,
    quiet: bool = False,
    eval_seed: int = DEFAULT_EVAL_SEED,
    data_dir: Optional[PathLike] = None,
) -> "Run":
    """Searches the config's ``[tune]`` space on validation within `budget` (seconds, or
    ``"90s"``, ``"30m"``, ``"2h"``) by successive halving, and returns the winner as a
    :class:`Run` in `out`, scored on test once; ``out/tune.md`` is the leaderboard and
    ``out/best.toml`` the winner's config. Every validated epoch is logged in
    ``out/tune.jsonl``: after a Ctrl-C (:class:`Cancelled`) or a crash, the same call resumes.
    `config` and `data` are as for :func:`train`, but a config (with ``[tune]``) is required.
    """
    out, path, js, native_data = _call_args(
        config, data, out, quiet, "tune", "a path or a dict with a [tune] section", False
    )
    native = _needle.tune(
        out,
        _seconds(budget),
        path,
        js,
        native_data,
        trials,
        quiet,
        int(eval_seed),
        None if data_dir is None else os.fspath(data_dir),
    )
    return Run(native)
