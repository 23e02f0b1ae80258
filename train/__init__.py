"""Training loops (one module per algorithm).  Importing the package first checks that its sibling packages
``kernels``, ``engine`` and ``models`` are this project's: a folder of the same name in the working directory
(``models/`` is a natural place for weights), or another installed distribution with the same import name
(the Hugging Face Hub kernel loader ``kernels``, which transformers >= 5.25 requires), would otherwise shadow
an editable install and fail later with an ``AttributeError`` that names neither the cause nor the fix."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

_HUB_KERNELS = (
    " (the Hugging Face Hub kernel loader, which transformers >= 5.25 requires; this project installs "
    "transformers < 5.25)"
)


def _foreign_distribution(name: str) -> str | None:
    """``'DIST VERSION'`` of an installed distribution other than this project's that provides the
    top-level package ``name``, else None."""
    try:
        dists = importlib.metadata.packages_distributions().get(name, [])
    except Exception:  # a broken metadata folder elsewhere must not stop the import check
        return None
    for dist in dict.fromkeys(dists):
        if dist.lower().replace("_", "-") != "nft-engine":
            try:
                return f"{dist} {importlib.metadata.version(dist)}"
            except importlib.metadata.PackageNotFoundError:
                return dist
    return None


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
        regular = spec is not None and origin not in (None, "namespace")
        foreign = _foreign_distribution(name) if regular else None
        if foreign is not None:
            dist = foreign.split()[0]
            return (
                f"nft-engine: the package {name!r} {where}, not to {root / name}: the installed distribution "
                f"{foreign}{_HUB_KERNELS if name == 'kernels' else ''} uses the same import name; "
                f"pip uninstall {dist}, or install this project in another virtualenv"
            )
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
