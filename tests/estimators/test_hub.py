"""Hub model ids: config.json through the real huggingface_hub code, against a Hugging Face cache the tests lay out
(offline mode) and a stand-in Hub endpoint on 127.0.0.1 (HF_ENDPOINT), never the internet."""
from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimem.estimators import estimate
from optimem.estimators.catalog import resolve
from optimem.estimators.errors import UserError
from hub_fake import FakeHub, lay_out_cache

ROOT = Path(__file__).resolve().parents[2]
TINY = json.loads((ROOT / "estimators/configs/tiny-llama.json").read_text())
WIDER = {**TINY, "hidden_size": TINY["hidden_size"] * 2}
HUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_ETAG_TIMEOUT",
           "HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_OFFLINE")


@pytest.fixture
def hub_env(tmp_path):
    """``set(**env)``: set Hugging Face variables (others cleared) and make huggingface_hub read them again, as a
    fresh process would; everything is restored afterwards."""
    import huggingface_hub.constants as constants

    from optimem.estimators import hub

    saved = {k: os.environ.get(k) for k in HUB_ENV}

    def set_env(**env):
        for k in HUB_ENV:
            os.environ.pop(k, None)
        os.environ.update({"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
                           "HF_HUB_DISABLE_TELEMETRY": "1", **{k: str(v) for k, v in env.items()}})
        importlib.reload(constants)
        hub.clear_cache()
        return Path(os.environ["HF_HUB_CACHE"])

    yield set_env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    importlib.reload(constants)
    hub.clear_cache()


@pytest.fixture
def fake_hub():
    with FakeHub() as server:
        yield server


def _same_as_file(tmp_path, config: dict, model: str, **kw) -> None:
    path = tmp_path / "same.json"
    path.write_text(json.dumps(config))
    a, b = estimate(model, "adamw_torch", **kw), estimate(str(path), "adamw_torch", **kw)
    assert a.bytes == b.bytes and a.num_params == b.num_params
    assert a.setup.model == model


# --------------------------------------------------------------------------------------------- offline cache
def test_offline_resolves_from_a_prepared_cache(hub_env, tmp_path):
    cache = hub_env(HF_HUB_OFFLINE=1)
    commit = lay_out_cache(cache, "some-org/some-model", TINY)
    src = resolve("some-org/some-model")
    assert (src.origin, src.commit, src.load()) == ("hub", commit, TINY)
    assert str(src.path).startswith(str(cache))
    est = estimate("some-org/some-model", "adamw_torch", seq_len=32)
    assert any(commit[:12] in n for n in est.notes)
    _same_as_file(tmp_path, TINY, "some-org/some-model", seq_len=32)


def test_offline_miss_is_one_line(hub_env):
    cache = hub_env(HF_HUB_OFFLINE=1)
    with pytest.raises(UserError) as err:
        resolve("some-org/absent-model")
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and str(cache) in msg and "some-org/absent-model" in msg


def test_catalog_names_never_touch_the_hub(hub_env, monkeypatch):
    hub_env(HF_HUB_OFFLINE=1)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", None)  # would fail if called
    assert resolve("Qwen/Qwen2.5-7B").origin == "catalog"
    assert resolve("meta-llama/Meta-Llama-3-8B").origin == "catalog"


# --------------------------------------------------------------------------------------------- online
def test_online_downloads_config_once_then_reuses_the_cache(hub_env, fake_hub, tmp_path):
    commit = fake_hub.repo("some-org/some-model").add("main", TINY)
    cache = hub_env(HF_ENDPOINT=fake_hub.url)
    src = resolve("some-org/some-model")
    assert src.commit == commit and src.load() == TINY
    assert fake_hub.count("GET") == 1
    assert (cache / "models--some-org--some-model" / "snapshots" / commit / "config.json").is_file()
    estimate("some-org/some-model", "adamw_torch", seq_len=32)  # resolved once per process: no more requests
    assert fake_hub.count("HEAD") == 1 and fake_hub.count("GET") == 1

    hub_env(HF_ENDPOINT=fake_hub.url)  # as a new process: checks the revision (HEAD), does not download again
    assert resolve("some-org/some-model").commit == commit
    assert fake_hub.count("GET") == 1 and fake_hub.count("HEAD") == 2

    hub_env(HF_ENDPOINT=fake_hub.url)  # a commit hash already in the cache needs no request at all
    assert resolve(f"some-org/some-model@{commit}").load() == TINY
    assert fake_hub.count("GET") == 1 and fake_hub.count("HEAD") == 2

    hub_env(HF_ENDPOINT=fake_hub.url, HF_HUB_OFFLINE=1)  # and offline, the download is the cache
    assert resolve("some-org/some-model").commit == commit


def test_revisions(hub_env, fake_hub, tmp_path):
    repo = fake_hub.repo("some-org/some-model")
    main = repo.add("main", TINY)
    v2 = repo.add("v2", WIDER)
    hub_env(HF_ENDPOINT=fake_hub.url)
    assert resolve("some-org/some-model").commit == main
    wide = resolve("some-org/some-model@v2")
    assert (wide.name, wide.revision, wide.commit, wide.load()) == ("some-org/some-model@v2", "v2", v2, WIDER)
    assert estimate("some-org/some-model@v2", "sgd").num_params > estimate("some-org/some-model", "sgd").num_params
    assert resolve(f"some-org/some-model@{main}").load() == TINY
    with pytest.raises(UserError, match="has no revision 'v9'"):
        resolve("some-org/some-model@v9")
    # a catalog name with a revision goes to the Hub: the revision is the user's request
    fake_hub.repo("Qwen/Qwen2.5-7B").add("main", TINY)
    assert resolve("Qwen/Qwen2.5-7B@main").origin == "hub"


@pytest.mark.parametrize("case, expect", [
    ("missing", "no model 'some-org/nope'"),
    ("gated", "gated model: request access at"),
    ("private", "no model 'some-org/private'"),
    ("no-config", "has no config.json"),
    ("server-error", "answered HTTP 500"),
])
def test_hub_errors_are_one_line(hub_env, fake_hub, monkeypatch, case, expect):
    fake_hub.repo("some-org/gated", gated=True, token="hf_letmein").add("main", TINY)
    fake_hub.repo("some-org/private", private=True, token="hf_letmein").add("main", TINY)
    fake_hub.repo("some-org/adapter").add("main", {"peft_type": "LORA"}, filename="adapter_config.json")
    if case == "server-error":
        fake_hub.status_override = 500
    model = {"missing": "some-org/nope", "gated": "some-org/gated", "private": "some-org/private",
             "no-config": "some-org/adapter", "server-error": "some-org/private"}[case]
    hub_env(HF_ENDPOINT=fake_hub.url)
    if case == "server-error":
        import huggingface_hub.utils._http as http

        monkeypatch.setattr(http.time, "sleep", lambda s: None)  # huggingface_hub's retry back-off
    with pytest.raises(UserError) as err:
        resolve(model)
    msg = str(err.value)
    assert expect in msg and "\n" not in msg, msg
    if case in ("gated", "private"):
        assert "HF_TOKEN" in msg and "hf auth login" in msg


def test_token_opens_gated_and_private_repos(hub_env, fake_hub):
    fake_hub.repo("some-org/gated", gated=True, token="hf_letmein").add("main", TINY)
    fake_hub.repo("some-org/private", private=True, token="hf_letmein").add("main", WIDER)
    hub_env(HF_ENDPOINT=fake_hub.url, HF_TOKEN="hf_letmein")
    assert resolve("some-org/gated").load() == TINY
    assert resolve("some-org/private").load() == WIDER


def test_timeouts(hub_env, fake_hub, monkeypatch):
    import huggingface_hub.file_download as fd
    import huggingface_hub.utils._http as http

    fake_hub.repo("some-org/slow").add("main", TINY)
    hub_env(HF_ENDPOINT=fake_hub.url)
    commit = resolve("some-org/slow").commit  # cached now
    fake_hub.delay_s = 1.5
    hub_env(HF_ENDPOINT=fake_hub.url, HF_HUB_ETAG_TIMEOUT=1)
    assert resolve("some-org/slow").commit == commit  # the check timed out: the cached copy is used, as hf does

    fake_hub.repo("some-org/slow-new").add("main", TINY)
    monkeypatch.setattr(fd, "_ETAG_RETRY_TIMEOUT", 0.2)  # huggingface_hub's retry after a failed check: faster,
    monkeypatch.setattr(http.time, "sleep", lambda s: None)  # without its back-off waits
    monkeypatch.setattr(http, "http_backoff", functools.partial(http.http_backoff, max_retries=1))
    with pytest.raises(UserError) as err:
        resolve("some-org/slow-new")
    msg = str(err.value)
    assert msg.startswith("timed out reaching") and "HF_HUB_ETAG_TIMEOUT" in msg and "\n" not in msg, msg


# --------------------------------------------------------------------------------------------- CLI
def test_cli_hub_id_online_then_offline(hub_env, fake_hub, tmp_path, capsys):
    """`bench estimate --model org/name --revision R` downloads config.json from HF_ENDPOINT once; then, in a fresh
    process with the real environment variables, `HF_HUB_OFFLINE=1 bench estimate ...` answers from that cache
    without a request; a revision the cache lacks is one line and exit 2."""
    from optimem.harness.cli import main

    repo = fake_hub.repo("some-org/some-model")
    repo.add("main", TINY)
    repo.add("v2", WIDER)
    cache = hub_env(HF_ENDPOINT=fake_hub.url)
    assert main(["estimate", "--model", "some-org/some-model", "--revision", "v2", "--optim", "sgd", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)[0]
    assert first["model"] == "some-org/some-model@v2" and fake_hub.count("GET") == 1

    env = {**{k: v for k, v in os.environ.items() if k not in HUB_ENV}, "PYTHONPATH": str(ROOT),
           "HF_HOME": os.environ["HF_HOME"], "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    offline = subprocess.run([sys.executable, "-m", "optimem.harness.cli", "estimate", "--model", "some-org/some-model@v2",
                              "--optim", "sgd", "--json"], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=240)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)[0]["bytes"] == first["bytes"]
    assert fake_hub.count("GET") == 1 and fake_hub.count("HEAD") == 1

    hub_env(HF_HUB_CACHE=cache, HF_HUB_OFFLINE=1)
    assert main(["estimate", "--model", "some-org/some-model@v2", "--optim", "sgd"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("some-org/some-model@v2 (LlamaForCausalLM)") and "from the Hugging Face Hub at commit" in table
    assert main(["estimate", "--model", "some-org/some-model", "--revision", "v3", "--optim", "sgd"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE" in err and "some-org/some-model@v3" in err


def test_revision_flag_needs_a_hub_id(capsys):
    from optimem.harness.cli import main

    assert main(["estimate", "--model", "tiny-llama", "--revision", "v1", "--optim", "sgd"]) == 2
    err = capsys.readouterr().err
    assert "--revision v1" in err and "not a Hugging Face Hub id" in err and err.count("\n") == 1
