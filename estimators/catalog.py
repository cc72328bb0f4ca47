"""The bundled offline catalog of real model configs (no Hub access) and config resolution.

A model is named by a catalog name (with or without its organisation prefix, case-insensitive),
by a path to a ``config.json``, or by a directory holding one.
"""
from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

CONFIG_DIR = Path(__file__).with_name("configs")
DEFAULT_MODEL = "tiny-llama"


@dataclass(frozen=True)
class ModelSource:
    """Where a model config came from: ``name`` is the catalog name or the file's path."""

    name: str
    path: Path

    def load(self) -> dict:
        return _read_json(self.path)


@functools.cache
def catalog() -> dict[str, str]:
    """Catalog name -> config file name inside ``estimators/configs``."""
    return _read_json(CONFIG_DIR / "index.json")


def _read_json(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise UserError(f"cannot read model config {path}: {exc.strerror or exc}; give a transformers "
                        "config.json") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"model config {path} is not a JSON text file (byte {exc.start} is not UTF-8); give a "
                        "transformers config.json") from None
    except (ValueError, RecursionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"model config {path} is not valid JSON ({msg}); give a transformers config.json") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a transformers config (a JSON object with a 'model_type'); "
                        "give a transformers config.json")
    return data


@functools.cache
def _aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in catalog():
        out[name.lower()] = name
        out[name.split("/")[-1].lower()] = name
    return out


def _looks_like_path(model: str) -> bool:
    """Whether a name that is not in the catalog was meant as a file: it ends in ``.json``, starts like a
    path (``/``, ``.``, ``~``), or names a folder that exists (catalog names have one ``org/`` prefix)."""
    text = model.strip()
    if text.lower().endswith(".json") or text.startswith(("/", ".", "~")) or "\\" in text:
        return True
    parent = Path(text).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def resolve(model: str) -> ModelSource:
    """Resolve a catalog name, a config.json path, or a directory holding one."""
    if not isinstance(model, str) or not model.strip():
        raise UserError(f"model must be a catalog name or a path to a config.json, got {model!r}")
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"directory {model} holds no config.json; give a config.json or a catalog name")
        return ModelSource(str(path), path)
    if path.is_file():
        return ModelSource(str(path), path)
    canonical = _aliases().get(model.strip().lower())
    if canonical is None and _looks_like_path(model):
        raise UserError(f"no such model config file: {model} (give an existing config.json, a directory holding "
                        f"one, or a catalog name: {', '.join(sorted(catalog()))})")
    if canonical is None:
        names = sorted(catalog())
        close = difflib.get_close_matches(model.lower(), list(_aliases()), n=1, cutoff=0.6)
        hint = f"did you mean '{_aliases()[close[0]]}'? " if close else ""
        raise UserError(f"unknown model '{model}': {hint}known models: {', '.join(names)} "
                        "(or a path to a config.json)")
    return ModelSource(canonical, CONFIG_DIR / catalog()[canonical])
