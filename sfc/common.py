"""Shared CLI plumbing: loading a model, its dictionaries and a task from flags."""

from __future__ import annotations

from pathlib import Path

from attribution.dictionaries import Dictionary, Identity
from attribution.dictionary_io import load_dictionary
from attribution.models import SFCModel, load_model
from circuits.tasks import TASKS, TaskData, load_jsonl_task, make_task


def check_task_name(task: str) -> None:
    """Fail before any model work if ``task`` is neither a built-in task nor a JSONL file."""
    if task in TASKS or task.endswith(".jsonl"):
        if task.endswith(".jsonl") and not Path(task).exists():
            raise FileNotFoundError(f"No task file at {task}: give a path to an existing JSONL file.")
        return
    raise ValueError(f"Unknown task {task!r}: the built-in tasks are {', '.join(TASKS)}, or pass a .jsonl file.")


def load_task(task: str, model: SFCModel, n_train: int, n_test: int, seed: int) -> TaskData:
    if task.endswith(".jsonl"):
        data = load_jsonl_task(task, model.tokenizer, n_test=n_test, seed=seed)
        return TaskData(data.name, data.train[:n_train], data.test)
    return make_task(task, model.tokenizer, n_train, n_test, seed)


def load_dictionary_set(
    model: SFCModel, model_name: str, folder: str | None, sites: list[str] | None, neurons: bool
) -> tuple[dict[str, Dictionary], dict[str, str]]:
    """Dictionaries keyed by site, and the id of each (for the circuit's metadata).

    ``folder`` holds one sub-folder per site (any supported layout); without it the
    toolkit's cache for ``model_name`` is used. ``neurons`` swaps every dictionary for
    the identity at the same sites (the paper's neuron baseline).
    """
    if folder is not None:
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"No dictionary folder at {root}: give a folder with one sub-folder per site.")
        names = sites or sorted(p.name for p in root.iterdir() if p.is_dir())
        model.sites(names)  # unknown site names fail here
        dicts = {name: load_dictionary(root / name) for name in names}
        ids = {name: str(root / name) for name in names}
    else:
        from attribution.dictionary_store import load_dictionaries

        dicts = load_dictionaries(model_name, sites, model=model)
        ids = {name: f"cache:{model_name}/{name}" for name in dicts}
    by_name = {s.name: s for s in model.all_sites()}
    for name, dic in dicts.items():
        if dic.d != by_name[name].d:
            raise ValueError(
                f"The dictionary for site {name!r} expects size {dic.d}, but {model_name}'s {name} has size "
                f"{by_name[name].d}: it was made for another model."
            )
    if neurons:
        dicts = {name: Identity(by_name[name].d) for name in dicts}
        ids = {name: f"identity:{by_name[name].d}" for name in dicts}
    return dicts, ids


def open_model(name: str, device: str) -> SFCModel:
    return load_model(name, device=device)
