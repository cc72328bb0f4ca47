"""A stand-in for the Hugging Face Hub on 127.0.0.1, and a Hugging Face cache laid out as huggingface_hub lays it.

:class:`FakeHub` serves ``/{org}/{name}/resolve/{revision}/{file}`` (HEAD and GET) as the Hub does for a
non-LFS file: ``X-Repo-Commit``, an ``ETag`` that is the file's git blob hash, ``Content-Length``; the Hub's error
answers carry ``X-Error-Code`` (``RepoNotFound``, ``GatedRepo``, ``RevisionNotFound``, ``EntryNotFound``), which
huggingface_hub turns into its exception types. Repos can be gated or private (a bearer token opens them) and a
delay makes the server slow enough for a client timeout. Every request is counted.

:func:`lay_out_cache` writes a repo's file into an HF cache directory (``models--org--name/blobs``, ``refs``,
``snapshots/<commit>/`` with a link to the blob), as ``hf_hub_download`` leaves it.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob (what the Hub sends as a regular file's ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commit_id(text: str) -> str:
    """A 40-hex commit hash made from ``text`` (stable across runs)."""
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass
class Repo:
    """One model repo: ``branches`` (name -> commit), ``files`` (commit -> {filename: bytes}); ``gated``: only a
    request with ``token`` gets in (others: 401 GatedRepo); ``private``: likewise, answered as RepoNotFound."""

    branches: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    gated: bool = False
    private: bool = False
    token: str | None = None

    def add(self, branch: str, config: dict, filename: str = "config.json") -> str:
        data = json.dumps(config, indent=2).encode()
        commit = commit_id(f"{branch}:{data.decode()}")
        self.branches[branch] = commit
        self.files.setdefault(commit, {})[filename] = data
        return commit


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 answering like the Hub's resolve endpoint (see the module doc)."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: Counter = Counter()
        self.delay_s = 0.0
        self.status_override: int | None = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def repo(self, repo_id: str, **kw) -> Repo:
        return self.repos.setdefault(repo_id, Repo(**kw))

    def count(self, method: str, repo_id: str | None = None) -> int:
        return sum(n for (m, path), n in self.requests.items() if m == method and (repo_id is None or
                                                                                   path.startswith(f"/{repo_id}/")))

    # ------------------------------------------------------------------------------------------ answers
    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(h.path.split("?", 1)[0])
        self.requests[(h.command, path)] += 1
        if self.delay_s:
            threading.Event().wait(self.delay_s)  # not time.sleep, which a test may stub out
        parts = path.strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if self.status_override:
            return self._error(h, self.status_override, None, "Internal Error")
        repo = self.repos.get(repo_id)
        auth = h.headers.get("authorization", "")
        allowed = repo is not None and (not (repo.gated or repo.private) or auth == f"Bearer {repo.token}")
        if repo is None or (repo.private and not allowed):
            return self._error(h, 401, "RepoNotFound", "Repository not found")
        if repo.gated and not allowed:
            return self._error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted.")
        commit = repo.branches.get(revision) or (revision if revision in repo.files else None)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id")
        data = repo.files[commit].get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound", "Entry not found", commit=commit)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("ETag", f'"{git_blob_sha(data)}"')
        h.send_header("X-Repo-Commit", commit)
        h.end_headers()
        if body:
            h.wfile.write(data)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str | None, message: str, commit: str | None = None):
        payload = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)


def lay_out_cache(cache_dir: Path, repo_id: str, config: dict, *, revision: str = "main",
                  filename: str = "config.json") -> str:
    """Write ``config`` into ``cache_dir`` as ``hf_hub_download`` would have left it; returns the commit."""
    data = json.dumps(config, indent=2).encode()
    commit = commit_id(f"{revision}:{data.decode()}")
    root = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    blob = root / "blobs" / git_blob_sha(data)
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    snap = root / "snapshots" / commit / filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, snap.parent), snap)
    return commit


__all__ = ["FakeHub", "Repo", "commit_id", "git_blob_sha", "lay_out_cache"]
