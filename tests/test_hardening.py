"""Bad input gets one clear sentence before the heavy work, and nothing already written is lost
(issue 15). Each test reproduces one case of the issue through the ``sfc`` command line (in
process) or the library call it makes, and checks the message, the exit code, and that the
files already there are byte-for-byte unchanged. The table in docs/bad-input.md lists them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.bad_inputs import (
    run_cli,
    save_tiny_model,
    tiny_circuit_file,
    tiny_dictionary_folder,
    tiny_task_file,
    tree,
    unreadable,
    unwritable,
)

BUILD = ["--tokens", "1024", "--width", "64", "--k", "4", "--epochs", "1"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SFC_CACHE", str(root))
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the input should have been refused before it."""
    import attribution.model.loading as loading
    import sfc.cli.common as common

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_model", boom)
    monkeypatch.setattr(loading, "load_smollm2", boom)
    monkeypatch.setattr(common, "open_model", boom)


def _one_error_line(err: str, cmd: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith(f"sfc {cmd}: error: "), err
    return lines[-1]


# ---------------------------------------------------------------- 1: cache keyed by identity


def test_model_given_by_absolute_path_builds_into_the_cache_not_its_folder(tmp_path, cache, capsys):
    model_dir = save_tiny_model(tmp_path / "models" / "tiny")
    before = tree(model_dir)
    rc, _, err = run_cli(["dictionaries", "build", "--model", model_dir.resolve(), *BUILD], capsys)
    assert rc == 0, err
    assert tree(model_dir) == before  # nothing written into (or removed from) the model's folder
    entries = list((cache / "dictionaries").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("tiny-")
    assert sorted(p.name for p in entries[0].iterdir()) == ["resid_0", "resid_1"]
    meta = json.loads((entries[0] / "resid_0" / "config.json").read_text())["sfc"]
    assert meta["model"] == str(model_dir.resolve())


def test_same_relative_name_in_two_folders_gets_two_dictionary_sets(tmp_path, cache, capsys, monkeypatch):
    from attribution.dictionaries.formats import DictionaryFileError, load_dictionary
    from attribution.dictionaries.sets import load_dictionaries
    from attribution.model.loading import load_model

    for i, where in enumerate(("a", "b")):
        save_tiny_model(tmp_path / where / "model", seed=i)  # same shape, different weights
    logs = []
    for where in ("a", "b"):
        monkeypatch.chdir(tmp_path / where)
        rc, _, err = run_cli(["dictionaries", "build", "--model", "model", *BUILD], capsys)
        assert rc == 0, err
        logs.append(err)
    assert "already built" not in logs[1]
    entries = sorted((cache / "dictionaries").iterdir())
    assert len(entries) == 2
    sae = {e: load_dictionary(e / "resid_0") for e in entries}
    assert not torch.equal(sae[entries[0]].W_dec, sae[entries[1]].W_dec)
    # Each model loads its own set from the cache, and refuses the other's when given the folder.
    model_a, model_b = load_model(str(tmp_path / "a" / "model")), load_model(str(tmp_path / "b" / "model"))
    own = {m.cache_key: m for m in (model_a, model_b)}
    assert set(own) == {e.name for e in entries}
    for entry in entries:
        mine = own[entry.name]
        other = model_b if mine is model_a else model_a
        loaded = load_dictionaries(mine, sites=["resid_0"])
        assert torch.equal(loaded["resid_0"].W_dec, sae[entry].W_dec)
        with pytest.raises(DictionaryFileError, match="built for another model"):
            load_dictionaries(other, entry, sites=["resid_0"])


def test_a_copy_of_the_same_model_elsewhere_reuses_its_dictionaries(tmp_path, cache, capsys):
    import shutil

    first = save_tiny_model(tmp_path / "one" / "model", seed=3)
    second = tmp_path / "two" / "model"
    shutil.copytree(first, second)  # the same weights under another path
    assert run_cli(["dictionaries", "build", "--model", first, *BUILD], capsys)[0] == 0
    rc, _, err = run_cli(["dictionaries", "build", "--model", second, *BUILD], capsys)
    assert rc == 0
    assert "resid_0: already built" in err and "resid_1: already built" in err


def test_the_embedded_model_keeps_its_cache_folder():
    """The dictionaries already built for smollm2-135m stay where they are."""
    import transformers as tf

    from attribution.cache import cache_dir, dictionary_cache
    from attribution.model.wrapper import SFCModel

    cfg = tf.LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)
    model = SFCModel(tf.LlamaForCausalLM(cfg), name="smollm2-135m")
    assert model.cache_key == "smollm2-135m"
    assert dictionary_cache(model.cache_key) == cache_dir() / "dictionaries" / "smollm2-135m"


def test_a_path_never_escapes_the_cache(cache):
    from attribution.cache import activation_cache, dictionary_cache

    for name in ("/abs/path/model", "../../etc", "org/name"):
        for where in (dictionary_cache(name), activation_cache(name)):
            assert where.parent.parent == cache and where.name not in ("", ".", "..")


# ---------------------------------------------------------------- 2, 3: permissions


def test_discover_into_an_unwritable_folder_fails_before_the_model(tmp_path, no_model, capsys):
    keep = tmp_path / "locked"
    keep.mkdir()
    (keep / "old.txt").write_text("old results")
    with unwritable(keep):
        rc, _, err = run_cli(["discover", "--task", "simple", "--out", keep / "run"], capsys)
    assert rc == 2
    assert "--out" in _one_error_line(err, "discover") and "cannot be written" in err
    assert tree(keep) == {"old.txt": b"old results"}


def test_view_into_an_unwritable_folder_fails_with_one_sentence(tmp_path, capsys):

    circuit = tiny_circuit_file(tmp_path / "c.json")
    locked = tmp_path / "locked"
    with unwritable(locked):
        rc, _, err = run_cli(["view", circuit, "--out", locked / "c.html"], capsys)
    assert rc == 2 and "cannot be written" in _one_error_line(err, "view")
    assert not (locked / "c.html").exists()


@pytest.mark.parametrize("cmd", ["view", "evaluate"])
def test_an_unreadable_circuit_file_is_one_sentence(tmp_path, cmd, capsys, monkeypatch, no_model):

    circuit = tiny_circuit_file(tmp_path / "c.json")
    before = circuit.read_bytes()
    with unreadable(circuit, monkeypatch):
        rc, _, err = run_cli([cmd, circuit], capsys)
        monkeypatch.undo()
    assert rc == 2
    assert "cannot be read (permission denied)" in _one_error_line(err, cmd)
    assert circuit.read_bytes() == before


def test_a_permission_error_anywhere_is_one_sentence(capsys, monkeypatch):
    """Whatever command hits an OSError, the user sees one line, not a traceback."""
    import sfc.cli.view as view

    def denied(args):
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(view, "run", denied)
    monkeypatch.setattr("sys.argv", ["sfc"])
    from sfc.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["view", "x.json"])
    args.func = denied
    monkeypatch.setattr("sfc.cli.build_parser", lambda: type("P", (), {"parse_args": lambda self, a: args})())
    rc, _, err = run_cli(["view", "x.json"], capsys)
    assert rc == 2 and "permission denied on /some/file" in _one_error_line(err, "view")


# ---------------------------------------------------------------- 8, 9: device and model names


@pytest.mark.parametrize("argv", [
    ["discover", "--task", "simple", "--out", "{tmp}/o", "--device", "cuda:7"],
    ["dictionaries", "build", "--device", "cuda:7"],
    ["dictionaries", "report", "--device", "nonsense:0"],
])
def test_a_device_that_does_not_exist_lists_those_that_do(argv, tmp_path, no_model, capsys):
    rc, _, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    line = _one_error_line(err, argv[0])
    assert rc == 2 and "--device" in line and "cpu" in line


def test_evaluate_checks_the_device_before_the_model(tmp_path, no_model, capsys):

    rc, _, err = run_cli(["evaluate", tiny_circuit_file(tmp_path / "c.json"), "--device", "cuda:7"], capsys)
    assert rc == 2 and "does not exist on this machine" in _one_error_line(err, "evaluate")


def test_load_model_refuses_a_missing_device_with_one_sentence():
    from attribution.model.loading import available_devices, load_model

    missing = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(ValueError, match="does not exist on this machine: use one of cpu") as err:
        load_model("smollm2-135m", device=missing)
    assert all(dev in str(err.value) for dev in available_devices())


def test_an_unknown_model_name_says_what_a_model_can_be(capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # no network wait in the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = run_cli(["dictionaries", "build", "--model", "no-such-model"], capsys)
    line = _one_error_line(err, "dictionaries")
    assert rc == 2
    assert "neither an embedded model (smollm2-135m), a local folder, nor reachable on the HF hub" in line


@pytest.mark.parametrize("name, message", [
    ("./no/such/folder", "no folder at that path"),
    ("{tmp}/empty", "folder without a config.json"),
])
def test_a_path_that_holds_no_model_fails_before_loading(name, message, tmp_path, no_model, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(["dictionaries", "build", "--model", name.replace("{tmp}", str(tmp_path))], capsys)
    assert rc == 2 and message in _one_error_line(err, "dictionaries")


# ---------------------------------------------------------------- 6, 7, 14: build flags


@pytest.mark.parametrize("flags, message", [
    (["--tokens", "0"], "--tokens 0 is out of range: it must be at least 1024"),
    (["--tokens", "-5"], "--tokens -5 is out of range"),
    (["--width", "100000000000"], "--width 100000000000 is out of range: it must be between 1 and 1048576"),
    (["--width", "0"], "--width 0 is out of range"),
    (["--k", "0"], "--k 0 is out of range"),
    (["--width", "64", "--k", "65"], "--k 65 is out of range: it must be between 1 and 64"),
    (["--width", "32"], "--width 32 is below the default k=64"),
    (["--epochs", "-1"], "--epochs -1.0 is out of range: it must be between 0.1 and 1000"),
    (["--epochs", "0"], "--epochs 0.0 is out of range"),
    (["--epochs", "nan"], "--epochs nan is out of range"),
    (["--epochs", "inf"], "--epochs inf is out of range"),
])
def test_build_flags_are_checked_before_the_model_loads(flags, message, cache, no_model, capsys):
    rc, _, err = run_cli(["dictionaries", "build", *flags], capsys)
    assert rc == 2 and message in _one_error_line(err, "dictionaries")
    assert not cache.exists()  # nothing built, nothing cached


def test_a_width_beyond_memory_is_refused_before_training(tmp_path, cache, capsys, monkeypatch):
    import attribution.dictionaries.store as store

    def no_harvest(*a, **k):
        raise AssertionError("harvested before the width was checked")

    monkeypatch.setattr(store, "harvest", no_harvest)
    model_dir = save_tiny_model(tmp_path / "m")
    # 8 copies x width x d=32 x 4 bytes: 2^20 latents need 1 GiB; make the machine report 0.5 GiB free.
    import sfc.cli.checks as checks

    real_open = open

    def meminfo(path, *a, **k):
        if str(path) == "/proc/meminfo":
            import io

            return io.StringIO("MemTotal: 1048576 kB\nMemAvailable: 524288 kB\n")
        return real_open(path, *a, **k)

    monkeypatch.setattr(checks, "open", meminfo, raising=False)
    rc, _, err = run_cli(["dictionaries", "build", "--model", model_dir, "--width", str(1 << 20), "--k", "4"],
                         capsys)
    line = _one_error_line(err, "dictionaries")
    assert rc == 2 and "needs about 1.0 GiB to train at d=32, but 0.5 GiB is available" in line


@pytest.mark.parametrize("fill, what", [(0.0, "all zero"), (float("nan"), "not finite")])
def test_training_on_constant_zero_or_nan_activations_says_so(fill, what):
    from attribution.dictionaries.training import TrainConfig, train_topk

    acts = torch.full((1024, 16), fill)
    with pytest.raises(ValueError, match=f"train resid_4\\) are {what}"):
        train_topk(acts, TrainConfig(width=32, k=4, epochs=1, batch_size=128), desc="train resid_4")


@pytest.mark.parametrize("epochs", [0.0, -1.0, float("nan")])
def test_train_topk_refuses_non_positive_epochs(epochs):
    from attribution.dictionaries.training import TrainConfig, train_topk

    with pytest.raises(ValueError, match="must be a positive number"):
        train_topk(torch.randn(1024, 16), TrainConfig(width=32, k=4, epochs=epochs, batch_size=128))


@pytest.fixture
def tiny_setup(tmp_path):
    """A saved tiny model, a dictionary folder for it and a paired task file."""
    model_dir = save_tiny_model(tmp_path / "model")
    dicts = tiny_dictionary_folder(tmp_path / "dicts", model_dir)
    task = tiny_task_file(tmp_path / "task.jsonl")
    return model_dir, dicts, task


@pytest.fixture
def no_compute(monkeypatch):
    """Attribution and evaluation fail the test: the input should have been refused before them."""
    import sfc.pipeline as pipeline

    def boom(*args, **kwargs):
        raise AssertionError("the heavy work started before the bad input was refused")

    for name in ("discover", "evaluate", "sweep_curve"):
        monkeypatch.setattr(pipeline, name, boom)


# ---------------------------------------------------------------- 12: --start-layer


@pytest.mark.parametrize("layer", ["2", "9"])
def test_start_layer_beyond_the_sites_is_refused_before_attribution(layer, tiny_setup, tmp_path, no_compute,
                                                                    capsys):
    model_dir, dicts, task = tiny_setup
    rc, _, err = run_cli(["discover", "--model", model_dir, "--dictionaries", dicts, "--task", task,
                          "--examples", "2", "--test", "2", "--out", tmp_path / "out", "--start-layer", layer],
                         capsys)
    line = _one_error_line(err, "discover")
    assert rc == 2 and f"--start-layer {layer} is above every site" in line and "--start-layer 1 or lower" in line
    assert not (tmp_path / "out").exists()


def test_a_negative_start_layer_is_refused_before_the_model(tmp_path, no_model, capsys):
    rc, _, err = run_cli(["discover", "--task", "simple", "--out", tmp_path / "o", "--start-layer", "-2"], capsys)
    assert rc == 2 and "--start-layer -2 is negative" in _one_error_line(err, "discover")


# ---------------------------------------------------------------- 13: no edges, no pruning


@pytest.mark.parametrize("method, edges", [("ig", False), ("exact", True)])
def test_without_edges_every_node_over_the_threshold_is_kept(method, edges):
    from sfc.pipeline import DiscoverConfig, discover
    from tests.test_circuits_pipeline import effects_and_edges, scale
    from tests.test_circuits_pipeline import setup as make_setup

    model, task, dicts = make_setup.__wrapped__()
    ne, _ = effects_and_edges(model, task, dicts)
    thr = 0.2 * scale(ne)
    cfg = DiscoverConfig(n_examples=6, n_test=6, method=method, steps=2, aggregation="sum",
                         node_threshold=thr, edges=edges)
    result = discover(model, dicts, task, cfg, progress=False)
    # Ground truth: the summed effects over the threshold, from the effects discover saved.
    expect = {(s, j) for s, f in result.effects_features.items() for j in (f.abs() > thr).nonzero()[:, 0].tolist()}
    expect |= {(s, None) for s, e in result.effects_errors.items() if float(e.abs()) > thr}
    got = {(n.site, n.feature) for n in result.circuit.nodes if n.id != "y"}
    assert expect and got == expect
    assert result.metrics["n_nodes"] == len(expect)
    assert result.metrics["pruned_to_metric"] is False
    assert any("no pruning was done" in note for note in result.metrics["notes"])


# ---------------------------------------------------------------- 5, 16: circuit files checked on every load path


def _edit_circuit(path: Path, edit) -> Path:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))  # json.dumps writes NaN / Infinity literally
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["nodes"][0].update(effect=float("nan")), "has effect nan"),
    (lambda d: d["nodes"][0].update(effect=float("inf")), "has effect inf"),
    (lambda d: d["edges"][0].update(weight=float("-inf")), "has weight -inf"),
    (lambda d: d["metadata"].update(sites=["resid_0"]), "is at site 'resid_3', which metadata.sites does not list"),
])
@pytest.mark.parametrize("cmd", ["view", "evaluate"])
def test_view_and_evaluate_refuse_the_same_bad_circuit_before_the_model(edit, message, cmd, tmp_path, no_model,
                                                                        capsys):
    path = _edit_circuit(tiny_circuit_file(tmp_path / "c.json"), edit)
    before = path.read_bytes()
    rc, _, err = run_cli([cmd, path], capsys)
    assert rc == 2
    assert message in _one_error_line(err, cmd)
    assert path.read_bytes() == before and not (tmp_path / "c.html").exists()


def test_the_circuit_loader_refuses_non_finite_values():
    import tempfile

    from circuits.graph import Circuit, CircuitFormatError

    with tempfile.TemporaryDirectory() as tmp:
        good = json.loads(tiny_circuit_file(Path(tmp) / "c.json").read_text())
    bad = json.loads(json.dumps(good))
    bad["nodes"][0]["effect"] = float("nan")
    with pytest.raises(CircuitFormatError, match="finite numbers only"):
        Circuit.from_json_dict(bad)
    assert Circuit.from_json_dict(good).nodes[0].effect == 0.5


def test_a_feature_beyond_the_dictionary_width_is_refused_before_evaluation(tiny_setup, tmp_path, no_compute,
                                                                           capsys):
    model_dir, dicts, task = tiny_setup
    path = tiny_circuit_file(tmp_path / "c.json", model=str(model_dir), task=str(task), site="resid_1",
                             feature=100, n_layers=2, dictionaries={"resid_1": str(dicts / "resid_1")})
    rc, _, err = run_cli(["evaluate", path], capsys)
    line = _one_error_line(err, "evaluate")
    assert rc == 2 and "is feature 100, but the dictionary at resid_1 has only 64 features" in line


# ---------------------------------------------------------------- 4, 15: dictionary files


def _saelens_folder(folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    d, width = 8, 16
    save_file({"W_enc": torch.randn(d, width), "b_enc": torch.zeros(width), "W_dec": torch.randn(width, d),
               "b_dec": torch.zeros(d)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": d, "d_sae": width}))
    return folder


def _gemma_npz(path: Path, **override) -> Path:
    import numpy as np

    d, width = 8, 16
    arrays = {"W_enc": np.random.randn(d, width).astype("f4"), "b_enc": np.zeros(width, "f4"),
              "W_dec": np.random.randn(width, d).astype("f4"), "b_dec": np.zeros(d, "f4"),
              "threshold": np.zeros(width, "f4")} | override
    np.savez(path, **arrays)
    return path


def test_a_truncated_saelens_file_names_the_path(tmp_path):
    from attribution.dictionaries.formats import DictionaryFileError, load_dictionary

    folder = _saelens_folder(tmp_path / "sae")
    assert load_dictionary(folder).width == 16  # whole, it loads
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DictionaryFileError, match=r"sae_weights.safetensors is corrupt or truncated") as err:
        load_dictionary(folder)
    assert str(weights) in str(err.value)


def test_a_truncated_gemma_scope_file_names_the_path(tmp_path):
    from attribution.dictionaries.formats import DictionaryFileError, load_dictionary

    path = _gemma_npz(tmp_path / "params.npz")
    assert load_dictionary(path).width == 16
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DictionaryFileError, match="params.npz is corrupt or truncated"):
        load_dictionary(path)


def test_a_gemma_scope_file_with_an_object_array_is_refused_without_unpickling(tmp_path):
    import numpy as np

    from attribution.dictionaries.formats import DictionaryFileError, load_dictionary

    path = _gemma_npz(tmp_path / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DictionaryFileError, match="params.npz holds object arrays") as err:
        load_dictionary(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("layout", ["dictionary_learning", "saelens", "gemma_scope"])
def test_a_dictionary_with_a_nan_weight_is_refused_when_it_loads(layout, tmp_path):
    import numpy as np

    from attribution.dictionaries.formats import (
        DictionaryFileError,
        load_dictionary,
        save_dictionary,
    )
    from attribution.dictionaries.kinds import random_sae

    if layout == "dictionary_learning":
        sae = random_sae(8, 16, "topk", k=2)
        with torch.no_grad():
            sae.W_dec[3, 1] = float("nan")
        path = save_dictionary(sae, tmp_path / "d")
    elif layout == "saelens":
        from safetensors.torch import load_file, save_file

        path = _saelens_folder(tmp_path / "d")
        state = load_file(str(path / "sae_weights.safetensors"))
        state["W_dec"][3, 1] = float("nan")
        save_file(state, str(path / "sae_weights.safetensors"))
    else:
        w = np.random.randn(16, 8).astype("f4")
        w[3, 1] = np.inf
        path = _gemma_npz(tmp_path / "params.npz", W_dec=w)
    with pytest.raises(DictionaryFileError, match=r"1 non-finite value\(s\) \(NaN or infinity\) in W_dec"):
        load_dictionary(path)


# ---------------------------------------------------------------- 21: quotes on the viewer's x axis


def test_prompt_tokens_with_quotes_show_as_typed_on_the_x_axis(tmp_path):
    """Checked in a real browser (Debian's chromium): the tick labels' text is the token itself."""
    from tests.synthetic_graph import synthetic_circuit
    from tests.test_viewer import Viewer
    from tests.test_viewer import browser as browser_fixture
    from viz import render_html

    c = synthetic_circuit(n_layers=2, n_positions=4, n_nodes=10, n_edges=10, seed=2)
    tokens = [' "', 'say "hi"', "it's", "a<b & c>"]
    c["metadata"]["prompt_tokens"] = tokens
    page = render_html(c, tmp_path / "quotes.html")
    gen = browser_fixture.__wrapped__()
    browser = next(gen)
    try:
        v = Viewer(browser, page).ready()
        shown = v.js("() => [...document.querySelectorAll('.xtick text')].map(t => t.textContent)")
        v.close()
    finally:
        next(gen, None)
    assert shown == [repr(tokens[0])[1:-1], *tokens[1:]]  # a token with outer spaces is shown as its repr
    assert not any("&quot;" in s or "&#x27;" in s or "&amp;" in s for s in shown)


# ---------------------------------------------------------------- 19: the umask is honoured


@pytest.fixture
def umask_027():
    import os

    old = os.umask(0o027)
    yield
    os.umask(old)


def _modes(root: Path) -> set[tuple[str, int]]:
    import stat

    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in root.rglob("*")}


def test_cache_and_outputs_get_the_modes_mkdir_and_open_give(tmp_path, cache, capsys, umask_027):
    import os
    import stat

    # Ground truth: what plain mkdir and open give under this umask.
    (tmp_path / "ref").mkdir()
    with open(tmp_path / "ref" / "f", "w") as fh:
        fh.write("x")
    want = {("dir", stat.S_IMODE(os.stat(tmp_path / "ref").st_mode)),
            ("file", stat.S_IMODE(os.stat(tmp_path / "ref" / "f").st_mode))}
    assert want == {("dir", 0o750), ("file", 0o640)}
    model_dir = save_tiny_model(tmp_path / "m")
    assert run_cli(["dictionaries", "build", "--model", model_dir, *BUILD], capsys)[0] == 0
    assert _modes(cache / "dictionaries") == want

    from attribution.cache import atomic_dir, atomic_write_bytes

    with atomic_dir(tmp_path / "entry") as tmp:
        atomic_write_bytes(tmp / "a.bin", b"1")
    assert _modes(tmp_path / "entry") | {("dir", stat.S_IMODE((tmp_path / "entry").stat().st_mode))} == want


# ---------------------------------------------------------------- 17: fewer examples, empty circuits


def test_an_empty_circuit_names_the_threshold_that_keeps_a_node():
    from sfc.pipeline import DiscoverConfig, discover
    from tests.test_circuits_pipeline import setup as make_setup

    model, task, dicts = make_setup.__wrapped__()
    cfg = DiscoverConfig(n_examples=6, n_test=6, method="attrib", aggregation="sum", node_threshold=1e6)
    result = discover(model, dicts, task, cfg, progress=False)
    assert result.metrics["n_nodes"] == 0
    # Ground truth: the largest summed effect, read from the effects discover saved.
    top = max(float(v.abs().max()) for v in [*result.effects_features.values(), *result.effects_errors.values()])
    note = next(n for n in result.metrics["notes"] if n.startswith("the circuit is empty"))
    assert f"the largest is {top:.4g}" in note
    suggested = float(note.split("e.g. ")[1].split(",")[0])
    again = discover(model, dicts, task, DiscoverConfig(n_examples=6, n_test=6, method="attrib", aggregation="sum",
                                                        node_threshold=suggested, edges=False), progress=False)
    assert again.metrics["n_nodes"] >= 1


def test_asking_for_more_examples_than_the_file_has_says_how_many_were_used(tiny_setup, tmp_path, capsys):
    model_dir, dicts, task = tiny_setup  # 6 rows: 2 test, 4 train
    rc, _, err = run_cli(["discover", "--model", model_dir, "--dictionaries", dicts, "--task", task,
                          "--examples", "50", "--test", "2", "--steps", "1", "--start-layer", "0",
                          "--out", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert "--examples 50 asked for more training pairs than task 'task' has: used 4." in err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_examples"] == 4


# ---------------------------------------------------------------- 18, 20: output folders


def _discover(model_dir, dicts, task, out, *extra) -> list[str]:
    return ["discover", "--model", model_dir, "--dictionaries", dicts, "--task", task, "--examples", "3",
            "--test", "2", "--steps", "1", "--start-layer", "0", "--out", out, *extra]


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def test_a_rerun_without_neurons_leaves_no_stale_neurons_folder(tiny_setup, tmp_path, capsys):
    model_dir, dicts, task = tiny_setup
    out = tmp_path / "out"
    assert run_cli(_discover(model_dir, dicts, task, out, "--neurons"), capsys)[0] == 0
    assert (out / "neurons" / "circuit.json").exists()
    rc, _, err = run_cli(_discover(model_dir, dicts, task, out, "--node-threshold", "0.5"), capsys)
    assert rc == 0, err
    assert not (out / "neurons").exists()  # nothing of the first run is left beside the second's files
    assert json.loads((out / "metrics.json").read_text())["node_threshold"] == 0.5
    assert "replaced the previous outputs" in err
    assert _siblings(out) == []  # no temporary folder or lock left behind


def test_an_interrupted_run_leaves_the_previous_outputs_whole(tiny_setup, tmp_path, capsys, monkeypatch):
    import viz

    model_dir, dicts, task = tiny_setup
    out = tmp_path / "out"
    assert run_cli(_discover(model_dir, dicts, task, out), capsys)[0] == 0
    before = tree(out)
    real = viz.render_html
    calls = []

    def ctrl_c_after_the_features(circuit, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the neurons' page: circuit.json and metrics.json of both runs are written
            raise KeyboardInterrupt
        return real(circuit, path, *a, **k)

    monkeypatch.setattr(viz, "render_html", ctrl_c_after_the_features)
    rc, _, err = run_cli(_discover(model_dir, dicts, task, out, "--neurons", "--node-threshold", "0.3"), capsys)
    assert rc == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"sfc discover: interrupted: --out {out} was left as it was: the "
                                            "previous run's outputs are whole.")
    assert tree(out) == before
    assert _siblings(out) == []


def test_a_second_run_into_a_folder_being_written_is_refused(tiny_setup, tmp_path, capsys):
    """A real second process holds the lock, as a concurrent `sfc discover` would."""
    import subprocess
    import sys
    import time

    model_dir, dicts, task = tiny_setup
    out = tmp_path / "out"
    assert run_cli(_discover(model_dir, dicts, task, out), capsys)[0] == 0
    before = tree(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom sfc.cli.outputs import locked\n"
         "with locked(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(60)\n", str(out)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = run_cli(_discover(model_dir, dicts, task, out, "--node-threshold", "0.3"), capsys)
    finally:
        holder.kill()
        holder.wait()
    line = _one_error_line(err, "discover")
    assert rc == 2 and f"is writing into --out {out}: wait for it to finish" in line and str(holder.pid) in line
    assert tree(out) == before
    time.sleep(0.1)
    # The holder is gone (killed without cleaning up): its lock is stale and the next run takes over.
    rc, _, err = run_cli(_discover(model_dir, dicts, task, out, "--node-threshold", "0.3"), capsys)
    assert rc == 0, err


def test_a_folder_of_other_files_is_never_replaced(tmp_path, no_model, capsys):
    out = tmp_path / "papers"
    out.mkdir()
    (out / "draft.tex").write_text("keep me")
    rc, _, err = run_cli(["discover", "--task", "simple", "--out", out], capsys)
    assert rc == 2 and "is a folder of other files (draft.tex...)" in _one_error_line(err, "discover")
    assert tree(out) == {"draft.tex": b"keep me"}


# ---------------------------------------------------------------- 10, 11: tasks checked when they load


@pytest.fixture
def no_attribution(monkeypatch):
    import sfc.pipeline as pipeline

    def boom(*args, **kwargs):
        raise AssertionError("attribution started before the bad task was refused")

    monkeypatch.setattr(pipeline, "node_effects", boom)
    monkeypatch.setattr(pipeline, "edge_effects", boom)


def _rows(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    path.write_text("".join(json.dumps({"clean_prefix": a, "patch_prefix": b, "clean_answer": c,
                                        "patch_answer": d}) + "\n" for a, b, c, d in rows))
    return path


def test_prompts_of_different_lengths_are_refused_with_their_line_numbers(tiny_setup, tmp_path, no_attribution,
                                                                          capsys):
    model_dir, dicts, _ = tiny_setup
    # The word-level tokenizer gives one token per word: lines 1, 2, 4 have 3 words, lines 3 and 5 have 4.
    task = _rows(tmp_path / "mixed.jsonl", [
        ("the one of", "the all of", " is", " are"),
        ("the he of", "the she of", " is", " are"),
        ("the one of it", "the all of it", " is", " are"),
        ("the we of", "the they of", " is", " are"),
        ("the he of it", "the she of it", " is", " are"),
    ])
    argv = _discover(model_dir, dicts, task, tmp_path / "out")
    argv[argv.index("--examples") + 1] = "3"  # 5 rows: 2 test, 3 train, so every row is tokenised
    rc, _, err = run_cli(argv, capsys)
    line = _one_error_line(err, "discover")
    assert rc == 2
    assert "the prompts tokenise to different lengths (3 tokens on lines 1-2, 4; 4 tokens on lines 3, 5)" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rows, message", [
    ([("the one of", "the all of", " is", " is")] * 4, "every row has the same answer on both sides"),
    # "zebra" and "yak" are not in the tokenizer's vocabulary: both prompts become "the <unk> of".
    ([("the zebra of", "the yak of", " is", " are")] * 4, "the clean and patch prompts tokenise to the same ids"),
])
def test_a_degenerate_task_is_refused_before_attribution(rows, message, tiny_setup, tmp_path, no_attribution,
                                                         capsys):
    from transformers import AutoTokenizer

    model_dir, dicts, _ = tiny_setup
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok(r[0], add_special_tokens=False)["input_ids"] for r in rows[:1]] + \
          [tok(r[1], add_special_tokens=False)["input_ids"] for r in rows[:1]]
    assert (ids[0] == ids[1]) == ("same ids" in message)  # the premise, from the tokenizer itself
    task = _rows(tmp_path / "degenerate.jsonl", rows)
    argv = _discover(model_dir, dicts, task, tmp_path / "out")
    argv[argv.index("--examples") + 1] = "2"  # 4 rows: 2 test, 2 train
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and message in _one_error_line(err, "discover")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 22: large task files


def test_a_large_task_file_tokenises_only_the_rows_it_uses(tmp_path):
    import random

    from circuits.tasks import load_task
    from tests.test_tasks import NOUN_NUMBER, OTHER_WORDS, VERB_NUMBER, word_tokenizer

    tok = word_tokenizer([*NOUN_NUMBER, *VERB_NUMBER, *OTHER_WORDS])
    nouns = list(NOUN_NUMBER)
    rows = [(f"The {nouns[i % len(nouns)]}", f"The {nouns[(i + 1) % len(nouns)]}", " is", " are")
            for i in range(5000)]
    path = _rows(tmp_path / "big.jsonl", rows)

    class Counting:
        """The tokenizer, counting the texts it is asked to tokenise."""

        def __init__(self, inner):
            self.inner, self.texts = inner, 0

        def __call__(self, text, *args, **kwargs):
            self.texts += 1 if isinstance(text, str) else len(text)
            return self.inner(text, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    counting = Counting(tok)
    task = load_task(str(path), counting, n_train=8, n_test=4, seed=7)
    assert counting.texts <= 5 * (8 + 4)  # two prefixes, two answers and a length per used row, not 5000 rows
    # Ground truth for the split: a seeded shuffle of the row indices, as the eager loader did it.
    order = list(range(len(rows)))
    random.Random(7).shuffle(order)
    assert [e.clean_prefix for e in task.test] == [rows[i][0] for i in order[:4]]
    assert [e.clean_prefix for e in task.train] == [rows[i][0] for i in order[4:12]]


def test_a_bad_row_outside_the_used_rows_is_still_refused_when_its_json_is_bad(tmp_path):
    from circuits.tasks import load_task
    from tests.test_tasks import NOUN_NUMBER, OTHER_WORDS, VERB_NUMBER, word_tokenizer

    tok = word_tokenizer([*NOUN_NUMBER, *VERB_NUMBER, *OTHER_WORDS])
    path = _rows(tmp_path / "big.jsonl", [("The parents", "The parent", " are", " is")] * 50)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match="big.jsonl, line 51: not valid JSON"):
        load_task(str(path), tok, n_train=2, n_test=2)


def test_discover_with_dictionaries_on_disk_gives_the_same_circuit(tiny_setup, tmp_path, capsys):
    model_dir, dicts, task = tiny_setup
    outs = {}
    for label, extra in [("held", ()), ("disk", ("--resident-dictionaries", "1", "--dictionary-dtype", "float32"))]:
        out = tmp_path / label
        rc, _, err = run_cli(_discover(model_dir, dicts, task, out, "--node-threshold", "0.01", *extra), capsys)
        assert rc == 0, err
        outs[label] = json.loads((out / "metrics.json").read_text())
        outs[label]["circuit"] = json.loads((out / "circuit.json").read_text())
    held, disk = outs["held"], outs["disk"]
    assert held["n_nodes"] > 0
    for key in ("n_nodes", "n_edges", "faithfulness", "completeness"):
        assert disk[key] == held[key], key
    assert [n["id"] for n in disk["circuit"]["nodes"]] == [n["id"] for n in held["circuit"]["nodes"]]
    assert 0 < disk["peak_mb"] and 0 < held["peak_mb"]
