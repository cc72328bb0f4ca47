"""Model sources: where a model's config comes from, and resolving a model name to one.

A model is named by

* a name of the bundled offline catalog (``estimators/configs``: real config files; with or without the
  organisation prefix, case-insensitive) -- the default, and what the tests use;
* a path to a ``config.json``, or a directory holding one;
* a Hugging Face Hub id ``org/name`` (or ``org/name@REVISION``) that the catalog does not hold: its
  ``config.json`` only is fetched through huggingface_hub into the user's HF cache, as transformers does
  (:mod:`optimem.estimators.hub`; a catalog name with ``@REVISION`` goes to the Hub too);
* the name :func:`register` gave an in-memory config (a user's ``PretrainedConfig``, ``PreTrainedModel`` or PEFT
  model: see :mod:`optimem.estimators.user_objects`), ``LABEL#DIGEST``, content-addressed.

:func:`resolve` turns any of them into a :class:`ModelSource`, whose :meth:`ModelSource.load` gives the config
dict (what ``optimem.estimators.inventory.build_config`` / ``instantiate`` build the model from).
"""
from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, one_line
from .hub import fetch_config, hub_name
from .hub import parse_hub_id

CONFIG_DIR = Path(__file__).with_name("configs")
DEFAULT_MODEL = "tiny-llama"
ORIGINS = ("catalog", "file", "hub", "memory")


@dataclass(frozen=True)
class ModelSource:
    """Where a model config came from.

    ``name``: what the setup and records call the model (the catalog name, the file's path, the Hub id with its
    ``@revision`` when one was given, or a registered ``LABEL#DIGEST``). ``path``: the config file (for a Hub id,
    the file in the Hugging Face cache); None for an in-memory config. ``origin``: one of :data:`ORIGINS`.
    ``revision`` / ``commit``: for a Hub id, the revision asked for (None: the default branch) and the commit
    the config belongs to. ``inventory``: for a registered model object, the parameter inventory taken from the
    object itself (its trainable set, adapters and dtypes), else None.
    """

    name: str
    path: Path | None
    origin: str = "file"
    revision: str | None = None
    commit: str | None = None
    inventory: Any = field(default=None, compare=False, repr=False)
    peft: dict | None = field(default=None, compare=False, repr=False)
    """For a registered PEFT model object, its PEFT config (``peft_config["default"].to_dict()``): the
    whole-step tracer wraps the model it builds from the config the same way."""

    def load(self) -> dict:
        """The config as a dict (a fresh copy)."""
        if self.path is None:
            entry = _REGISTRY.get(self.name)
            if entry is None:
                raise UserError(f"model '{self.name}' was registered in another process; give a catalog name, a "
                                "config.json or a Hub id")
            return copy.deepcopy(entry.config)
        return _read_json(self.path)

    def describe(self) -> str:
        """Where the config came from, in words (for notes)."""
        if self.origin == "hub":
            at = f" at commit {self.commit[:12]}" if self.commit else ""
            return f"config.json of {self.name} from the Hugging Face Hub{at} (HF cache: {self.path})"
        if self.origin == "memory":
            return f"the config of the model object given ({self.name})"
        if self.origin == "catalog":
            return f"the bundled catalog config {self.path.name}"
        return f"config file {self.path}"


@dataclass(frozen=True)
class _Registered:
    config: dict
    inventory: Any = None
    peft: dict | None = None


_REGISTRY: dict[str, _Registered] = {}
"""In-memory configs by name (this process only); content-addressed, so registering twice is harmless."""


def config_digest(config: dict, extra: Any = None) -> str:
    """SHA-256 of a config's canonical JSON (and of ``extra``, e.g. an inventory's rows), hex."""
    blob = json.dumps([config, extra], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def register(config: dict, *, label: str, extra: Any = None,
             inventory: Callable[[str], Any] | None = None, peft: dict | None = None) -> ModelSource:
    """An in-memory config as a model source named ``LABEL#DIGEST``: the same content always gets the same
    name, and :func:`resolve` finds it again in this process. ``extra``: more content the name depends on (what
    tells two model objects of one config apart, e.g. their parameters' trainable flags). ``inventory``: for a
    model object, called once with the name to build the inventory taken from the object, which
    ``build_inventory`` then returns for that name. ``peft``: a PEFT model object's PEFT config (plain data)."""
    if not isinstance(config, dict) or not config.get("model_type"):
        raise UserError(f"{label}: a model config needs a 'model_type' (give a transformers config)")
    name = f"{label}#{config_digest(config, extra)[:16]}"
    if name not in _REGISTRY:
        _REGISTRY[name] = _Registered(copy.deepcopy(config), inventory(name) if inventory is not None else None,
                                      copy.deepcopy(peft))
    return ModelSource(name, None, origin="memory", inventory=_REGISTRY[name].inventory, peft=_REGISTRY[name].peft)


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
        raise UserError(f"model config {path} is not valid JSON ({one_line(exc, 10**6)}); give a transformers config.json") from None
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


def resolve(model: str) -> ModelSource:
    """The source of a model name (see the module doc): a registered in-memory config, a config.json path or
    a directory holding one, a catalog name, else a Hub id ``org/name[@revision]``."""
    if not isinstance(model, str) or not model.strip():
        raise UserError(f"model must be a catalog name, a path to a config.json or a Hub id (org/name), got {model!r}")
    if model in _REGISTRY:
        return ModelSource(model, None, origin="memory", inventory=_REGISTRY[model].inventory,
                           peft=_REGISTRY[model].peft)
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"directory {model} holds no config.json; give a config.json, a catalog name or a Hub id")
        return ModelSource(str(path), path)
    if path.is_file():
        return ModelSource(str(path), path)
    hub_id = parse_hub_id(model)
    canonical = _aliases().get(model.strip().lower())
    if canonical is not None:
        return ModelSource(canonical, CONFIG_DIR / catalog()[canonical], origin="catalog")
    if hub_id is not None:
        return _hub_source(*hub_id)
    if "#" in model and model.split("#", 1)[0]:
        raise UserError(f"model '{model}' names a model object registered in another Python process; give a "
                        "catalog name, a config.json or a Hub id")
    names = sorted(catalog())
    close = difflib.get_close_matches(model.lower(), list(_aliases()), n=1, cutoff=0.6)
    hint = f"did you mean '{_aliases()[close[0]]}'? " if close else ""
    looks_like_path = model.endswith(".json") or "/" in model or model.startswith(".")
    what = f"no such file '{model}'" if looks_like_path else f"unknown model '{model}'"
    raise UserError(f"{what}: {hint}give a catalog name ({', '.join(names)}), a path to a config.json, or a "
                    "Hugging Face Hub id (org/name)")


def canonical_name(model: str) -> str:
    """The name :func:`resolve` would give ``model``, decided without fetching anything: a catalog alias becomes
    its catalog name, a config directory its config.json; a Hub id (and anything unknown) stays as given. For
    record keys and labels, where a network request per record would be wrong."""
    if not isinstance(model, str):
        return model
    text = model.strip()
    if text in _REGISTRY:
        return text
    canonical = _aliases().get(text.lower())
    if canonical is not None:
        return canonical
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return str(path / "config.json")
    return text


def _hub_source(repo_id: str, revision: str | None) -> ModelSource:
    got = fetch_config(repo_id, revision)
    return ModelSource(hub_name(repo_id, revision), got.path, origin="hub", revision=revision, commit=got.commit)
