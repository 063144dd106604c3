"""Finding and checking image files in folders."""

from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from flowlab.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "natural_key", "find_images", "check_images"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def natural_key(path: Path, root: Path | None = None) -> tuple:
    """Sort key that orders ``2.png`` before ``10.png`` (digit runs compare as numbers)."""
    s = (path.relative_to(root) if root is not None else path).as_posix()
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t)


def find_images(folder: Path, extensions=IMAGE_EXTENSIONS) -> list[Path]:
    """All files under ``folder`` (recursively) whose extension is in ``extensions`` (any case),
    in natural order of their path relative to ``folder``. Hidden files and folders are ignored."""
    exts = tuple(e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(exts))
    return sorted(found, key=lambda p: natural_key(p, folder))


def _header_error(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w < 1 or h < 1:
                return f"it has size {w}x{h}"
    except Exception as e:  # PIL raises many types for garbage
        return f"{type(e).__name__}: {e}"
    return None


def check_images(paths: list[Path], skip_corrupt: bool, where: str, workers: int = 8) -> list[Path]:
    """Open every file's header; return the readable ones.

    An unreadable file raises DataError naming it (mentioning ``data.skip_corrupt=true``), or with
    ``skip_corrupt`` is dropped, and one warning counts the dropped files. Only headers are read
    here; a file damaged further in is caught when it is decoded (see ImageFileDataset).
    """
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        errors = list(pool.map(_header_error, paths, chunksize=64))
    bad = [(p, e) for p, e in zip(paths, errors) if e is not None]
    if not bad:
        return list(paths)
    if not skip_corrupt:
        p, e = bad[0]
        more = f" ({len(bad) - 1} more unreadable files in {where})" if len(bad) > 1 else ""
        raise DataError(f"cannot read image {p} ({e}){more}. Replace or delete it, or set "
                        "data.skip_corrupt=true to skip unreadable images")
    shown = ", ".join(str(p) for p, _ in bad[:5]) + (", ..." if len(bad) > 5 else "")
    warnings.warn(f"skipped {len(bad)} unreadable image(s) of {len(paths)} in {where}: {shown}", stacklevel=2)
    bad_set = {p for p, _ in bad}
    return [p for p in paths if p not in bad_set]
