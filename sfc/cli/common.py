"""Shared CLI plumbing: loading a model, its dictionaries and a task from flags."""

from __future__ import annotations

from pathlib import Path

from attribution.model.loading import load_model
from attribution.model.wrapper import SFCModel
from circuits import tasks
from circuits.tasks import TASKS, TaskData


def check_task_name(task: str) -> None:
    """Fail before any model work if ``task`` is neither a built-in task nor a JSONL file."""
    if task in TASKS or task.endswith(".jsonl"):
        if task.endswith(".jsonl") and not Path(task).exists():
            raise FileNotFoundError(f"No task file at {task}: give a path to an existing JSONL file.")
        return
    raise ValueError(f"Unknown task {task!r}: the built-in tasks are {', '.join(TASKS)}, or pass a .jsonl file.")


def load_task(task: str, model: SFCModel, n_train: int, n_test: int, seed: int) -> TaskData:
    return tasks.load_task(task, model.tokenizer, n_train, n_test, seed)


def open_model(name: str, device: str) -> SFCModel:
    return load_model(name, device=device)
