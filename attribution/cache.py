"""The on-disk cache (converted models, harvested activations, trained dictionaries) and
the atomic file writes every part of the toolkit uses.

Everything this toolkit builds rather than ships lives under one folder,
:func:`cache_dir`, which is ``$SFC_CACHE`` or ``~/.cache/sparse-feature-circuits``::

    models/<model>/                 safetensors weights + config + tokenizer
    activations/<model>/<key>/      harvested site activations (memory-mapped .npy)
    dictionaries/<model>/<site>/    ae.pt + config.json (dictionary_learning layout)

``<model>`` is the model's cache key (:mod:`attribution.model.identity`): its
name plus a fingerprint of its config and weights (the embedded
``smollm2-135m`` keeps its plain name), never a path.

Every entry is written atomically: files go into a temporary sibling folder,
which is renamed into place only when complete, so an interrupted or
disk-full build never leaves a half-written entry that looks finished.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """The cache root: ``$SFC_CACHE`` if set, else ``~/.cache/sparse-feature-circuits``."""
    root = os.environ.get("SFC_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sparse-feature-circuits"


def _entry(model_name: str) -> str:
    """``model_name`` as one folder name: a cache entry never escapes the cache (an absolute
    path or ``..`` would), whatever string names it."""
    from attribution.model.identity import readable_name

    return model_name if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model_name) else readable_name(model_name)


def model_cache(model_name: str) -> Path:
    """Where the converted weights of ``model_name`` live."""
    return cache_dir() / "models" / _entry(model_name)


def dictionary_cache(model_name: str) -> Path:
    """The folder holding one sub-folder per site with that site's dictionary."""
    return cache_dir() / "dictionaries" / _entry(model_name)


def activation_cache(model_name: str) -> Path:
    """The folder holding harvested activations of ``model_name``."""
    return cache_dir() / "activations" / _entry(model_name)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; rename it to ``target`` on success.

    An existing ``target`` is replaced. On any exception (including
    ``KeyboardInterrupt`` and a full disk) the temporary folder is deleted and
    ``target`` is left as it was. The folder gets the permissions ``mkdir``
    would give it (``0777`` less the umask).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # The owner's PID in the name lets a later build tell a live build's folder from a leftover.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.pid{os.getpid()}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes folders private; a cache entry is shared like mkdir's
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling file and a rename.

    An interrupted write leaves ``path`` as it was. The file gets the usual
    permissions (``0666`` less the umask), as ``open`` would give it, so a shared
    cache or output folder stays readable by colleagues.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text with ``\\n`` line ends."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _owner_alive(path: Path) -> bool:
    match = re.search(r"\.pid(\d+)\.", path.name)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.*.tmp`` leftovers of builds that were killed before they could clean up.

    A temporary folder whose owning process is still running belongs to a build
    in progress (another terminal, a test) and is left alone.
    """
    if folder.exists():
        for p in folder.glob(".*.tmp"):
            if _owner_alive(p):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
