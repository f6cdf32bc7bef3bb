"""Experiments, one module each, looked up by the config's `task` name (imported lazily: tasks never import each
other, and the model library never imports them)."""

from __future__ import annotations

import importlib

TASKS = {
    "mlm": "roformer.tasks.mlm:MLMTask",
    "glue": "roformer.tasks.glue:GLUETask",
    "translation": "roformer.tasks.translation:TranslationTask",
}


def get_task_class(name: str):
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
