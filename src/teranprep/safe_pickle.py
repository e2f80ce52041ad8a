"""Reading pickles without executing code: only plain containers, scalars and numpy arrays.

Used for py-bottom-up-attention .pkl checkpoints and MILVLG's pickled `info` dicts. Anything that
would import another callable (os.system, a class with __reduce__, ...) is refused by name.
"""

from __future__ import annotations

import io
import pickle

from .errors import PrepError

# (module, name) pairs a numpy array's pickle needs; nothing else may be resolved.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("builtins", "slice"), ("builtins", "range"),
    ("_codecs", "encode"),
}


class RefusedPickle(PrepError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise RefusedPickle(f"refused pickled global {module}.{name}: only plain containers and "
                            "numpy arrays are accepted")


def safe_loads(data: bytes, *, encoding: str = "latin1", source: str = "pickle"):
    """Unpickles `data` allowing only containers/scalars/numpy arrays; RefusedPickle otherwise."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except RefusedPickle as exc:
        raise RefusedPickle(f"{source}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise PrepError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def safe_load_file(path) -> object:
    with open(path, "rb") as fh:
        return safe_loads(fh.read(), source=str(path))
