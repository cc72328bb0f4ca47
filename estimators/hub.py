"""Model configs from the Hugging Face Hub: ``config.json`` only, never weights, fetched as transformers fetches it.

A Hub model is named ``org/name``, optionally pinned as ``org/name@REVISION`` (a branch, a tag or a commit hash;
``--revision`` on the command line). :func:`fetch_config` is what ``AutoConfig.from_pretrained(id, revision=...)``
does for the config: huggingface_hub's ``hf_hub_download(id, "config.json")`` into the user's Hugging Face cache,
and huggingface_hub itself reads the environment, so ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is),
``HF_HUB_OFFLINE=1`` (the cache only, no request), ``HF_TOKEN`` or the ``hf auth login`` token (gated and private
repos) and ``HF_ENDPOINT`` (a mirror) all apply. A config already cached is reused: offline always; online a HEAD
request checks that the revision still points at it (a download happens only when it changed, or when the cached
copy cannot be checked and is used as it is), and a commit hash already in the cache costs no request at all.

Every failure is a :class:`~optimem.estimators.errors.UserError` of one line that says what to do (log in for a gated
repo, the revision does not exist, not in the cache while offline, the endpoint timed out...).
Nothing here is imported until a Hub id is resolved (huggingface_hub is imported lazily).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, one_line

CONFIG_FILE = "config.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_REVISION = re.compile(r"^[\w./-]{1,200}$")


@dataclass(frozen=True)
class HubConfig:
    """A ``config.json`` in the Hugging Face cache: its ``path`` (inside ``snapshots/<commit>/``), the repo, the
    revision asked for (None: the default branch) and the ``commit`` the file belongs to."""

    path: Path
    repo_id: str
    revision: str | None
    commit: str | None


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` for ``org/name`` or ``org/name@revision``; None for anything else (a catalog
    name without an organisation, a path)."""
    name, _, revision = text.strip().partition("@")
    if not _REPO_ID.match(name) or ".." in name or name.endswith((".json", ".")):
        return None
    if "@" in text and not _REVISION.match(revision):
        return None
    return name, (revision or None)


def hub_name(repo_id: str, revision: str | None) -> str:
    """The model name a Hub config goes by: ``org/name``, or ``org/name@revision`` when pinned."""
    return f"{repo_id}@{revision}" if revision else repo_id


def pin_revision(model: str, revision: str) -> str:
    """``org/name`` pinned to ``revision`` (``org/name@revision``); UserError if ``model`` is not a Hub id or
    already names another revision."""
    revision = str(revision).strip()
    parsed = parse_hub_id(model) if isinstance(model, str) else None
    if parsed is None or not _REVISION.match(revision):
        what = f"'{revision}' is not a branch, tag or commit hash" if parsed is not None else \
            f"'{model or 'the default model'}' is not a Hugging Face Hub id (org/name)"
        raise UserError(f"--revision {revision}: {what}; --revision applies to a Hub model given as --model org/name")
    repo_id, pinned = parsed
    if pinned not in (None, revision):
        raise UserError(f"--revision {revision}: --model {model} already names revision '{pinned}'; give one of them")
    return hub_name(repo_id, revision)


def fetch_config(repo_id: str, revision: str | None = None) -> HubConfig:
    """The Hub repo's ``config.json`` in the local Hugging Face cache, downloaded if needed (see the module doc).

    Resolved once per process for the same repo, revision, endpoint, cache and offline mode."""
    from huggingface_hub import constants  # lazy: pulls in huggingface_hub, which importing this module does not

    return _fetch(repo_id, revision, constants.ENDPOINT, str(constants.HF_HUB_CACHE), constants.is_offline_mode())


@functools.lru_cache(maxsize=128)
def _fetch(repo_id: str, revision: str | None, endpoint: str, cache_dir: str, offline: bool) -> HubConfig:
    from huggingface_hub import hf_hub_download  # lazy: pulls in huggingface_hub, which importing this module does not

    try:
        path = Path(hf_hub_download(repo_id, CONFIG_FILE, revision=revision, library_name="optimem"))
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
        raise UserError(explain(exc, repo_id, revision, endpoint=endpoint, cache_dir=cache_dir,
                                offline=offline)) from None
    commit = path.parent.name if path.parent.parent.name == "snapshots" else None
    return HubConfig(path=path, repo_id=repo_id, revision=revision, commit=commit)


def clear_cache() -> None:
    """Forget the configs resolved in this process (the Hugging Face cache on disk is left alone)."""
    _fetch.cache_clear()


def explain(exc: BaseException, repo_id: str, revision: str | None, *, endpoint: str, cache_dir: str,
            offline: bool) -> str:
    """One line for a huggingface_hub failure to get ``repo_id``'s config.json: what went wrong and what to do
    (the exception and those it was raised from are all looked at: huggingface_hub wraps a failed check in a
    cache miss)."""
    # lazy: pulls in huggingface_hub, which importing this module does not
    from huggingface_hub import errors as hub_errors

    chain = _chain(exc)

    def found(*kinds):
        return next((e for e in chain if isinstance(e, kinds)), None)

    where = hub_name(repo_id, revision)
    login = "log in with `hf auth login` or set HF_TOKEN"
    local = "or give a local config.json instead"
    refusals = (
        (hub_errors.GatedRepoError, f"{repo_id} is a gated model: request access at {endpoint}/{repo_id}, then "
                                    f"{login} (a token of an account that has access); {local}"),
        (hub_errors.RepositoryNotFoundError, f"no model '{repo_id}' on {endpoint}: check the id (org/name); if it "
                                             f"is private, {login} with a token that can read it; {local}"),
        (hub_errors.RevisionNotFoundError, f"{repo_id} has no revision '{revision}': give a branch, tag or commit "
                                           f"hash that exists (see {endpoint}/{repo_id}/tree/main), or leave "
                                           "--revision out for the default branch"),
        (hub_errors.RemoteEntryNotFoundError, f"{where} has no config.json: it is not a transformers model repo "
                                              f"(an adapter, GGUF or dataset repo?): give the base model's id, {local}"),
    )  # the Hub answered, and said no: most specific first (a gated repo is also 'not found')
    for kind, message in refusals:
        if found(kind):
            return message
    answered = next((e for e in chain if isinstance(e, hub_errors.HfHubHTTPError)
                     and getattr(e, "response", None) is not None), None)
    if answered is not None:
        status = answered.response.status_code
        if status in (401, 403):
            return f"{endpoint} refused access to {where} (HTTP {status}): {login} with a token that can read it; {local}"
        return (f"{endpoint} answered HTTP {status} for {where}'s config.json and it is not in the Hugging Face "
                f"cache ({cache_dir}): retry later, {local}")
    if offline and found(hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
        return (f"{where} is not in the Hugging Face cache ({cache_dir}) and HF_HUB_OFFLINE is set: unset it to "
                f"download its config.json (or `hf download {repo_id} config.json` on a machine with network, into "
                f"this cache), {local}")
    if any(_is_timeout(e) for e in chain):
        from huggingface_hub import constants  # lazy: pulls in huggingface_hub, which importing this module does not

        return (f"timed out reaching {endpoint} for {where} (HF_HUB_ETAG_TIMEOUT={constants.HF_HUB_ETAG_TIMEOUT} s) "
                f"and it is not in the Hugging Face cache ({cache_dir}): retry, raise HF_HUB_ETAG_TIMEOUT, {local}")
    if found(hub_errors.LocalEntryNotFoundError):
        reason = one_line(chain[-1], 160) if len(chain) > 1 else "no connection"
        return (f"cannot reach {endpoint} for {where} ({reason}) and it is not in the Hugging Face cache "
                f"({cache_dir}): check the network or HF_ENDPOINT, set HF_HUB_OFFLINE=1 to use only the cache, "
                f"{local}")
    if found(hub_errors.HFValidationError):
        return f"'{where}' is not a valid Hub model id ({one_line(exc, 160)}): give org/name[@revision], {local}"
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == 30:
        return (f"cannot write the Hugging Face cache ({cache_dir}) for {where}: {one_line(exc, 160)}; set "
                f"HF_HUB_CACHE (or HF_HOME) to a writable directory")
    return f"cannot get {where}'s config.json from {endpoint}: {one_line(exc, 160 + len(type(exc).__name__) + 2, kind=True)}"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower() or "timed out" in str(exc).lower()


__all__ = ["CONFIG_FILE", "HubConfig", "clear_cache", "explain", "fetch_config", "hub_name", "parse_hub_id",
           "pin_revision"]
