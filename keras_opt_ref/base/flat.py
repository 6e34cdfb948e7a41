"""Trainable variables <-> one float64 vector.

The layout is fixed when the view is made: variables in the order given (for a model,
``model.trainable_variables``), each flattened in C order, concatenated. ``offsets[i]``
is where variable ``i`` starts; ``names``, ``shapes`` and ``dtypes`` say what it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import keras_compat

__all__ = ["FlatVariables", "numpy_dtype"]


@dataclass(frozen=True)
class FlatVariables:
    """An immutable layout of variables in one float64 vector.

    Parameters
    ----------
    variables
        Keras 3 or tf-keras variables (or ``tf.Variable``), in vector order. ``dtypes`` are NumPy
        dtypes; the backends add their own side (``backends.tensorflow.objective.GraphFlatVariables``).
    """

    variables: tuple[Any, ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]

    @classmethod
    def from_variables(cls, variables: Sequence[Any]) -> FlatVariables:
        variables = tuple(variables)
        shapes = tuple(tuple(int(d) for d in v.shape) for v in variables)
        sizes = tuple(int(np.prod(s, dtype=np.int64)) for s in shapes)
        offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
        return cls(
            variables=variables,
            names=tuple(keras_compat.variable_name(v) for v in variables),
            shapes=shapes,
            dtypes=tuple(numpy_dtype(v.dtype) for v in variables),
            sizes=sizes,
            offsets=offsets,
        )

    @property
    def size(self) -> int:
        """Length of the flat vector (number of scalar weights)."""
        return self.offsets[-1]

    @property
    def common_dtype(self) -> np.dtype:
        """The variables' dtype if they all share one, else float64.

        The objective hands ``x`` to its graphs in this dtype: rounding a float64 vector to
        float32 in NumPy is the same round-to-nearest as casting in the graph, and half the
        bytes cross into TensorFlow.
        """
        dtypes = set(self.dtypes)
        return dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float64)

    def __len__(self) -> int:
        return len(self.variables)

    def slice(self, i: int) -> slice:
        """Where variable ``i`` lives in the flat vector."""
        return slice(self.offsets[i], self.offsets[i + 1])

    # --- numpy side (scipy boundary) -------------------------------------------
    def pack(self, values: Sequence[Any]) -> np.ndarray:
        """Concatenate one array per variable into a new float64 vector."""
        if len(values) != len(self.variables):
            raise ValueError(f"expected {len(self.variables)} arrays, got {len(values)}")
        out = np.empty(self.size, dtype=np.float64)
        for i, (value, shape) in enumerate(zip(values, self.shapes, strict=True)):
            value = np.asarray(value, dtype=np.float64)
            if value.shape != shape:
                raise ValueError(f"{self.names[i]}: expected shape {shape}, got {value.shape}")
            out[self.slice(i)] = value.ravel()
        return out

    def unpack(self, x: np.ndarray) -> list[np.ndarray]:
        """Split a flat vector into float64 arrays shaped like the variables (views)."""
        x = self.as_vector(x)
        return [x[self.slice(i)].reshape(s) for i, s in enumerate(self.shapes)]

    def read(self) -> np.ndarray:
        """The variables' current values as a new float64 vector."""
        return self.pack([np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in self.variables])

    def write(self, x: np.ndarray) -> None:
        """Assign a flat vector to the variables (eagerly, cast to each variable's dtype)."""
        for v, value, dtype in zip(self.variables, self.unpack(x), self.dtypes, strict=True):
            v.assign(value.astype(dtype))

    def as_held(self, x: np.ndarray) -> np.ndarray:
        """``x`` as the variables would hold it: each part rounded to its variable's dtype (float64)."""
        x = self.as_vector(x)
        return np.concatenate(
            [x[self.slice(i)].astype(d).astype(np.float64) for i, d in enumerate(self.dtypes)]
            or [np.zeros(0)]
        )

    def as_vector(self, x: Any) -> np.ndarray:
        """``x`` as a float64 array, checked to be a flat vector of this layout's size."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.size,):
            raise ValueError(f"expected a flat vector of shape ({self.size},), got {x.shape}")
        return x


def numpy_dtype(dtype: Any) -> np.dtype:
    """A variable's dtype as NumPy's (Keras 3 gives a name, tf-keras a ``tf.DType``)."""
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))
