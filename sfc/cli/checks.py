"""Checks of command-line input that run before any model work.

Each raises ``ValueError`` (or ``FileNotFoundError``) with one sentence saying
what is wrong and how to fix it; ``sfc.cli.main`` prints it as
``sfc <cmd>: error: ...`` and exits 2.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path


def check_writable(path: str | os.PathLike, flag: str = "--out", *, is_file: bool = False) -> Path:
    """Fail unless ``path`` (a folder, or with ``is_file`` a file) can be created or replaced.

    Tries to create and delete a file in the folder (or in its nearest existing
    parent, if it does not exist yet), which is the only test that also sees
    read-only file systems, immutable folders and ACLs. Returns ``path``.
    """
    path = Path(path)
    folder = path.parent if is_file else path
    if path.exists() and is_file and path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file name, e.g. {path / 'circuit.html'}.")
    if not is_file and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} exists and is not a folder: choose another path.")
    probe = folder if folder.exists() else next((p for p in folder.absolute().parents if p.exists()), None)
    if probe is None or not probe.is_dir():
        raise ValueError(f"{flag} {path}: {probe} is not a folder, so nothing can be written there; "
                         "choose another path.")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".sfc-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ValueError(f"{flag} {path} cannot be written ({exc.strerror} in {probe}): choose a folder you "
                         "can write, or fix its permissions.") from None
    return path


def check_readable(path: str | os.PathLike, what: str, hint: str = "check the path") -> Path:
    """Fail unless ``path`` is an existing file this user can read."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No {what} at {path}: {hint}.")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a {what}: give the file inside it.")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except PermissionError:
        raise ValueError(f"The {what} {path} cannot be read (permission denied): fix its permissions "
                         f"(chmod a+r {path}) or copy it somewhere readable.") from None
    return path


def check_count(value: float, flag: str, low: float, why: str, high: float | None = None) -> None:
    """Fail unless ``low <= value <= high`` and finite; ``why`` says what the limit protects."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or (
        high is not None and value > high
    ):
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        bound = f"at least {num(low)}" if high is None else f"between {num(low)} and {num(high)}"
        raise ValueError(f"{flag} {value} is out of range: it must be {bound} ({why}).")


def check_device_flag(device: str) -> None:
    """``--device`` exists here (listing the devices that do otherwise)."""
    from attribution.model.loading import check_device

    check_device(device)


def check_model_flag(model: str) -> None:
    """``--model`` names the embedded model, an existing model folder, or a plausible hub id."""
    from attribution.model.loading import check_model_name

    check_model_name(model)


def check_discover_args(args) -> None:
    """The ``sfc discover`` flags that can be checked without the model."""
    check_device_flag(args.device)
    check_model_flag(args.model)
    check_writable(args.out, "--out")
    if args.start_layer is not None and args.start_layer < 0:
        raise ValueError(f"--start-layer {args.start_layer} is negative: give a layer index from 0 (the first "
                         "layer) to the model's last layer.")


def check_start_layer(model, dictionaries, start_layer: int, explicit: bool) -> None:
    """At least one site with a dictionary is at or above ``--start-layer`` (else faithfulness would
    measure nothing); checked once the model and dictionaries are loaded, before any attribution."""
    layers = [s.layer for s in model.sites(list(dictionaries))]
    if layers and max(layers) >= start_layer:
        return
    top = max(layers) if layers else None
    which = f"--start-layer {start_layer}" if explicit else f"the default --start-layer {start_layer} (a third of the layers)"
    raise ValueError(f"{which} is above every site with a dictionary (the deepest is at layer {top}), so no site "
                     f"would be evaluated: give --start-layer {top} or lower.")


MIN_TOKENS = 1024  # a few batches of 512 activations at 127 activations per 128-token context
MAX_WIDTH = 1 << 20  # 2^20 latents: beyond it the encoder and decoder alone outgrow most machines
MIN_EPOCHS, MAX_EPOCHS = 0.1, 1000.0


def check_dictionary_args(args) -> None:
    """The ``sfc dictionaries`` flags that can be checked without the model (device, model name,
    and for ``build`` the token count, width, k and epochs), with the reason for each limit."""
    from attribution.dictionaries.training import TrainConfig

    check_device_flag(args.device)
    check_model_flag(args.model)
    if args.action != "build":
        return
    defaults = TrainConfig()
    check_count(args.tokens, "--tokens", MIN_TOKENS, f"a TopK SAE trains on batches of {defaults.batch_size} "
                "activations and needs a few of them")
    width = defaults.width if args.width is None else args.width
    if args.width is not None:
        check_count(args.width, "--width", 1, "latents per SAE; beyond 2^20 the encoder and decoder alone "
                    "need tens of GB", high=MAX_WIDTH)
    if args.k is not None:
        check_count(args.k, "--k", 1, f"active latents per token, at most the width {width}", high=width)
    elif defaults.k > width:
        raise ValueError(f"--width {width} is below the default k={defaults.k}: give --k {width} or less, "
                         "or a larger --width.")
    if args.epochs is not None:
        check_count(args.epochs, "--epochs", MIN_EPOCHS, "passes over the harvest; fewer leave the SAE "
                    "barely trained, and it would be cached as built", high=MAX_EPOCHS)


def check_training_memory(width: int, d: int, device: str) -> None:
    """Refuse a width whose training state (encoder, decoder, their gradients and two Adam moments:
    ``8 x width x d`` float32 numbers) exceeds the memory available on a CPU ``device``."""
    if not str(device).startswith("cpu"):
        return
    need = 8 * width * d * 4
    try:
        with open("/proc/meminfo") as fh:
            avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return
    if need > avail:
        raise ValueError(f"--width {width} needs about {need / 2**30:.1f} GiB to train at d={d}, but "
                         f"{avail / 2**30:.1f} GiB is available: give a smaller --width.")
