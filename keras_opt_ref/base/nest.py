"""Nested data without a framework: Keras's ``x``, ``y`` and ``sample_weight`` are arrays, or
lists, tuples and dicts of them (dict entries in sorted key order, as Keras and ``tf.nest`` take
them). ``None`` is a leaf."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["flatten", "leaves", "map_data", "map_structure", "map_with_paths", "paths"]


def paths(structure: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` pairs in order; a path reads like ``[0]['ids']``."""
    if isinstance(structure, Mapping):
        for key in sorted(structure):
            yield from paths(structure[key], f"{prefix}[{key!r}]")
    elif isinstance(structure, (list, tuple)):
        for i, item in enumerate(structure):
            yield from paths(item, f"{prefix}[{i}]")
    else:
        yield prefix, structure


def flatten(structure: Any) -> list[Any]:
    """The leaves in order, ``None`` included."""
    return [leaf for _, leaf in paths(structure)]


def leaves(structure: Any) -> list[Any]:
    """The leaves that are not ``None``."""
    return [leaf for leaf in flatten(structure) if leaf is not None]


def map_structure(fn: Callable[..., Any], *structures: Any) -> Any:
    """``fn`` applied leaf by leaf to structures of the same shape; dicts, lists, tuples and
    namedtuples rebuilt as such (other mappings and sequences, e.g. TensorFlow's tracking
    wrappers, as dicts and lists)."""
    first = structures[0]
    if isinstance(first, Mapping):
        items = [(k, map_structure(fn, *(s[k] for s in structures))) for k in sorted(first)]
        return dict(items)
    if isinstance(first, (list, tuple)):
        items = [map_structure(fn, *parts) for parts in zip(*structures, strict=True)]
        if hasattr(first, "_fields"):  # a namedtuple
            return type(first)(*items)
        return tuple(items) if isinstance(first, tuple) else items
    return fn(*structures)


def map_data(fn: Callable[[Any], Any], data: Any) -> Any:
    """``fn`` applied to every array of a data structure, ``None`` kept (no y, no sample weights)."""
    return map_structure(lambda t: None if t is None else fn(t), data)


def map_with_paths(fn: Callable[[str, Any], Any], structure: Any, prefix: str = "") -> Any:
    """``fn(path, leaf)`` for every leaf (paths as :func:`paths` writes them), containers rebuilt."""
    if isinstance(structure, Mapping):
        return {k: map_with_paths(fn, structure[k], f"{prefix}[{k!r}]") for k in sorted(structure)}
    if isinstance(structure, (list, tuple)):
        items = [map_with_paths(fn, item, f"{prefix}[{i}]") for i, item in enumerate(structure)]
        if hasattr(structure, "_fields"):  # a namedtuple
            return type(structure)(*items)
        return tuple(items) if isinstance(structure, tuple) else items
    return fn(prefix, structure)
