"""The epoch's data: checked, held as dense arrays, cut into chunks; drained from fit's iterators.

``(x, y, sample_weight)`` is a triple of nested structures (``base.nest``). The checks here
refuse bad data before any work, with a message naming the problem and the fix; a backend
converts each leaf its own way (``as_dense(..., convert=...)``), NumPy by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import nest
from .checks import summary

__all__ = [
    "Chunks",
    "as_dense",
    "check_data",
    "check_data_bytes",
    "concatenate",
    "dense_bytes",
    "drain",
    "to_numpy",
]

_PARTS = ("inputs", "targets", "sample weights")


def as_dense(data: tuple[Any, Any, Any], max_bytes: int, convert: Callable[[str, Any], Any] | None = None) -> tuple:
    """``(x, y, sample_weight)`` with every leaf dense (``convert(where, leaf)``; default
    :func:`to_numpy`), refused above ``max_bytes`` before anything is converted."""
    check_data_bytes(sum(dense_bytes(leaf) for leaf in nest.leaves(data)), max_bytes)
    convert = convert or to_numpy

    def part(what: str, structure: Any) -> Any:
        return nest.map_with_paths(lambda path, leaf: None if leaf is None else convert(f"{what}{path}", leaf),
                                   structure)

    return tuple(None if structure is None else part(what, structure)
                 for what, structure in zip(_PARTS, data, strict=True))


def to_numpy(where: str, leaf: Any) -> np.ndarray:
    """A leaf as a dense NumPy array: scipy.sparse densified, framework arrays through
    ``__array__``; ragged or non-numeric data refused."""
    if hasattr(leaf, "toarray") and hasattr(leaf, "nnz"):  # scipy.sparse
        return leaf.toarray()
    if hasattr(leaf, "detach"):  # a torch tensor, possibly on a device
        leaf = leaf.detach().cpu()
    try:
        array = np.asarray(leaf)
    except (TypeError, ValueError) as exc:
        reason = summary(exc)
    else:
        if array.dtype != object:
            return array
        reason = "rows of different lengths or mixed types"
    raise TypeError(
        f"The {where} ({type(leaf).__name__}) cannot be converted to an array ({reason}). "
        "Pass numeric arrays of one dtype and rectangular shape."
    )


def check_data(data: tuple[Any, Any, Any]) -> int:
    """Validate dense ``(x, y, sample_weight)``; return the number of samples."""
    leaves = [(what, path, t) for what, part in zip(_PARTS, data, strict=True)
              for path, t in nest.paths(part) if part is not None and t is not None]
    if not any(what == "inputs" for what, _, _ in leaves):
        raise ValueError("No input data: fit/objective got x=None. Pass the training inputs.")
    sizes = {(what, path): int(t.shape[0]) if len(t.shape) else 1 for what, path, t in leaves}
    n = next(iter(sizes.values()))
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{w}{p}: {s}" for (w, p), s in sizes.items())
        raise ValueError(f"Inputs, targets and sample weights disagree on the number of samples ({detail}).")
    if n == 0:
        raise ValueError("The training data is empty (0 samples): pass at least one sample to fit.")
    for what, path, t in leaves:
        array = np.asarray(t)
        if array.dtype.kind in "fc":
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise ValueError(
                    f"The {what}{path} contain {bad} NaN/Inf value(s): the full-batch loss "
                    "would be NaN. Clean or impute them before calling fit."
                )
    return n


def dense_bytes(leaf: Any) -> int:
    """Bytes a data leaf takes as a dense array (what the objective holds)."""
    if hasattr(leaf, "flat_values"):  # ragged
        return dense_bytes(leaf.flat_values)
    if hasattr(leaf, "dense_shape"):  # a sparse tensor
        return int(np.prod(np.asarray(leaf.dense_shape), dtype=np.int64)) * _itemsize(leaf.dtype)
    if hasattr(leaf, "toarray") and hasattr(leaf, "nnz"):  # scipy.sparse
        return int(np.prod(leaf.shape, dtype=np.int64)) * leaf.dtype.itemsize
    nbytes = getattr(leaf, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    shape = getattr(leaf, "shape", None)
    try:
        return int(np.prod(tuple(shape), dtype=np.int64)) * max(_itemsize(leaf.dtype), 1)
    except (TypeError, ValueError, AttributeError):  # unknown dimensions, or not an array
        return 0


def _itemsize(dtype: Any) -> int:
    for attr in ("itemsize", "size"):  # NumPy and torch; TensorFlow's DType
        size = getattr(dtype, attr, None)
        if isinstance(size, int):
            return size
    return np.dtype(dtype).itemsize


def check_data_bytes(nbytes: int, max_bytes: int, *, drained: str = "") -> None:
    """Refuse a training set larger than ``max_bytes`` as dense arrays (``drained``: how far fit's
    data source had got, when the limit was passed while draining it)."""
    if nbytes > max_bytes:
        what = (f"fit's data source had yielded {_size(nbytes)} {drained}" if drained
                else f"The training data needs {_size(nbytes)} as dense tensors")
        raise ValueError(
            f"{what}, more than max_data_bytes={max_bytes} ({_size(max_bytes)}). Each epoch's data is held in "
            "memory at once: an endless generator needs steps_per_epoch=... (that many batches form an epoch); "
            "for a large finite data set, fit on less of it, or raise max_data_bytes if the memory is there."
        )


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


# ------------------------------------------------------------------ fit's iterators
_BLOCK = 256  # drained batches are joined in blocks of this many: each costs ~1.5 KB beyond its data


def drain(iterator: Any, count: int | None, max_bytes: int, *, join: Callable[[list], Any] | None = None,
          parts: Callable[[Any], list] | None = None, ends: tuple[type, ...] = (StopIteration,)) -> list[Any]:
    """Up to ``count`` batches from a data iterator (all that remain if ``None``), joined into blocks
    as they come (``join``, default :func:`concatenate`), refusing to hold more than ``max_bytes``:
    an endless source must not grow memory without bound. ``parts(batch)`` splits a batch into
    batches of their own (one per local replica under tf.distribute); ``ends`` end the iterator."""
    join = join or concatenate
    blocks, batches, held, taken, rows = [], [], 0, 0, 0
    pending: list[Any] = []
    while count is None or taken < count or pending:
        if not pending:
            try:
                batch = next(iterator)
            except ends:
                break
            taken += 1
            pending = parts(batch) if parts is not None else [batch]
        batch = pending.pop(0)
        leaves = nest.leaves(batch)
        held += sum(dense_bytes(leaf) for leaf in leaves)
        rows += int(leaves[0].shape[0]) if leaves and len(leaves[0].shape) else 0
        if held > max_bytes:
            blocks.clear(), batches.clear()
            ended = "without ending" if count is None else f"of the epoch's {count}"
            check_data_bytes(held, max_bytes, drained=f"in {taken} batches {ended} ({rows} samples)")
        batches.append(batch)
        if len(batches) == _BLOCK:
            blocks.append(join(batches))
            batches = []
    return blocks + batches


def concatenate(batches: list[Any], join_leaves: Callable[..., Any] | None = None) -> Any:
    """One batch from several, leaf by leaf along the first axis (NumPy unless ``join_leaves``)."""
    if not batches:
        raise ValueError(
            "fit gave no training data for this epoch (the data source yielded no batch); "
            "pass a non-empty training set."
        )
    if len(batches) == 1:
        return batches[0]
    join_leaves = join_leaves or (lambda *parts: np.concatenate([np.asarray(p) for p in parts], axis=0))
    return nest.map_structure(lambda *parts: None if parts[0] is None else join_leaves(*parts), *batches)


# ------------------------------------------------------------------ chunks
class Chunks:
    """The epoch's data as NumPy, cut for a sequential loop: ``head`` holds ``count`` full chunks
    stacked on a new leading axis (``(count, rows, ...)``, or ``None``), ``tail`` the remaining rows
    (possibly none). ``head_shares[i]`` and ``tail_share`` weight each chunk's Keras loss so that the
    weighted sum is the one-batch loss (``checks.chunk_rule``); with rule ``"sum"`` every chunk's
    loss holds the weight regularizers, which ``extra_regularizers`` (``1 - chunks``) takes out."""

    def __init__(self, data: tuple[Any, Any, Any], rows: int, rule: str) -> None:
        n = int(nest.leaves(data)[0].shape[0])
        self.rows = c = min(rows, n)
        full, rest = divmod(n, c) if n > c else (0, n)
        self.count = full
        self.head = nest.map_data(lambda t: t[: full * c].reshape(full, c, *t.shape[1:]), data) if full else None
        self.tail = nest.map_data(lambda t: t[full * c :], data)
        if rule == "sum":
            self.head_shares, self.tail_share = np.ones(full), 1.0 if rest else 0.0
        elif rule == "sample_weight":
            weights = np.asarray(nest.flatten(data[2])[0], dtype=np.float64).reshape(n, -1).sum(axis=1)
            total = weights.sum()
            scale = 1.0 / total if total else 0.0
            self.head_shares = weights[: full * c].reshape(full, c).sum(axis=1) * scale
            self.tail_share = float(weights[full * c :].sum() * scale) if rest else 0.0
        else:
            self.head_shares, self.tail_share = np.full(full, c / n), rest / n
        chunks = full + (1 if rest else 0)
        self.extra_regularizers = (1.0 - chunks) if rule == "sum" and chunks > 1 else 0.0
        self.has_tail = bool(rest)
