"""Training loops (one module per algorithm).  Importing the package first checks that its sibling packages
``kernels``, ``engine`` and ``models`` are this project's: a folder of the same name in the working directory
(``models/`` is a natural place for weights) would otherwise shadow an editable install and fail later with an
``AttributeError`` that names neither the folder nor the fix."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _shadowed() -> str | None:
    """One sentence naming the first sibling package that does not resolve to this project, else None."""
    root = Path(__file__).resolve().parent.parent
    for name in ("kernels", "engine", "models"):
        mod = sys.modules.get(name)
        try:
            spec = mod.__spec__ if mod is not None else importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = getattr(spec, "origin", None) if spec is not None else None
        if origin and Path(origin).resolve() == root / name / "__init__.py":
            continue
        if spec is None:
            where = "is not importable"
        elif origin in (None, "namespace"):
            where = f"resolves to the folder {list(spec.submodule_search_locations or [])[0]!s}"
        else:
            where = f"resolves to {origin}"
        return (
            f"nft-engine: the package {name!r} {where}, not to {root / name} (a folder named {name!r} in the "
            f"working directory shadows this project's): rename that folder or run from another directory"
        )
    return None


_problem = _shadowed()
if _problem is not None:
    if sys.argv[:1] == ["-m"]:  # python -m train.<algo>: one sentence, no traceback
        print(f"error: {_problem}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(_problem)
