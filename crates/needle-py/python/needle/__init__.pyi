import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

PathLike = Union[str, os.PathLike[str]]
Features = Union[None, Sequence[str], Mapping[str, Optional[str]]]
Ids = Union[Sequence[int], Sequence[str], npt.NDArray[Any]]

__version__: str
DEFAULT_EVAL_SEED: int

class NeedleError(Exception): ...
class ConfigError(NeedleError, ValueError): ...
class DataError(NeedleError, ValueError): ...
class TrainError(NeedleError): ...
class Cancelled(TrainError): ...
class RunError(NeedleError): ...
class VectorIndexError(NeedleError, ValueError): ...
class FileError(NeedleError, OSError): ...
class InvalidArgument(NeedleError, ValueError): ...

class Dataset:
    """Interaction events with optional item and user tables."""
    @classmethod
    def from_pandas(
        cls,
        df: Any,
        user: str = "user_id",
        item: str = "item_id",
        time: str = "timestamp",
        rating: Optional[str] = None,
        items: Any = None,
        users: Any = None,
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
    ) -> Dataset: ...
    @classmethod
    def from_polars(
        cls, df: Any, user: str = "user_id", item: str = "item_id", time: str = "timestamp",
        rating: Optional[str] = None, items: Any = None, users: Any = None, **kw: Any
    ) -> Dataset: ...
    @classmethod
    def from_arrow(
        cls, table: Any, user: str = "user_id", item: str = "item_id", time: str = "timestamp",
        rating: Optional[str] = None, items: Any = None, users: Any = None, **kw: Any
    ) -> Dataset: ...
    @classmethod
    def from_schema(cls, path: PathLike, skip_bad_rows: bool = False) -> Dataset: ...
    @classmethod
    def builtin(cls, name: str, data_dir: Optional[PathLike] = None) -> Dataset: ...
    @property
    def name(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def n_users(self) -> int: ...
    @property
    def n_items(self) -> int: ...
    @property
    def n_events(self) -> int: ...
    @property
    def skipped_rows(self) -> int: ...
    def __len__(self) -> int: ...

def default_config(train_events: int) -> dict[str, Any]: ...
def train(
    config: Union[None, PathLike, Mapping[str, Any]] = None,
    data: Optional[Dataset] = None,
    out: Optional[PathLike] = None,
    *,
    quiet: bool = False,
    eval_seed: int = ...,
    data_dir: Optional[PathLike] = None,
    force: bool = False,
    tensorboard: Optional[PathLike] = None,
    tensorboard_every: int = 50,
) -> Run: ...

def tune(
    config: Union[PathLike, Mapping[str, Any]],
    data: Optional[Dataset] = None,
    out: Optional[PathLike] = None,
    *,
    budget: Union[int, float, str] = "30m",
    trials: Optional[int] = None,
    quiet: bool = False,
    eval_seed: int = ...,
    data_dir: Optional[PathLike] = None,
) -> Run: ...

class Run:
    """A trained model with its data."""
    stopped: bool
    @classmethod
    def open(cls, path: PathLike, data_dir: Optional[PathLike] = None) -> Run: ...
    @property
    def path(self) -> Path: ...
    @property
    def kind(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def training(self) -> dict[str, Any]: ...
    @property
    def metrics(self) -> dict[str, Any]: ...
    @property
    def user_ids(self) -> npt.NDArray[Any]: ...
    @property
    def item_ids(self) -> npt.NDArray[Any]: ...
    def evaluate(
        self,
        k: Union[int, Sequence[int]] = (10, 100),
        split: str = "test",
        *,
        users: Optional[int] = None,
        keep_seen: bool = False,
        seed: int = ...,
    ) -> dict[str, float]: ...
    def recall(
        self,
        users: Optional[Ids] = None,
        histories: Optional[Sequence[Ids]] = None,
        k: int = 100,
        *,
        filter: Optional[Ids] = None,
        exclude: Optional[Ids] = None,
        keep_seen: bool = False,
    ) -> Tuple[npt.NDArray[Any], npt.NDArray[np.float32]]: ...
    def similar_items(self, ids: Ids, k: int = 10) -> Tuple[npt.NDArray[Any], npt.NDArray[np.float32]]: ...
    def item_vectors(self) -> Tuple[npt.NDArray[Any], npt.NDArray[np.float32]]: ...
    def user_vectors(
        self, users: Optional[Ids] = None, histories: Optional[Sequence[Ids]] = None
    ) -> Tuple[npt.NDArray[Any], npt.NDArray[np.float32]]: ...
    def export(self, out: PathLike) -> list[Path]: ...

class Index:
    """An ANN index (inner product) over float32 vectors."""
    @classmethod
    def build(
        cls, vectors: npt.ArrayLike, ids: Optional[npt.ArrayLike] = None, kind: str = "hnsw", metric: str = "ip",
        **params: Any
    ) -> Index: ...
    @classmethod
    def open(cls, path: PathLike) -> Index: ...
    def save(self, path: PathLike) -> None: ...
    def search(
        self, queries: npt.ArrayLike, k: int = 10, filter: Optional[npt.ArrayLike] = None,
        effort: Optional[int] = None
    ) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
    def __len__(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def spec(self) -> str: ...
