"""The run record: schema, and the JSONL append that writes a whole line or nothing."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from optimem.harness import record as rec
from optimem.harness.env_facts import collect_env
from optimem.harness.record import SCHEMA_VERSION, append_record, build_record, read_records, validate
from optimem.harness.scenario import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def skipped_record(**over) -> dict:
    r = build_record(config=RunConfig(optim="flash_adamw").to_dict(), status="skipped",
                     reason="flash_adamw cannot run on CPU: FlashOptim kernels are Triton/CUDA only",
                     measured=None, predicted=None, env=collect_env("cpu"), run={"duration_s": 0.0})
    r.update(over)
    return r


def test_skipped_record_validates_and_has_every_top_level_key():
    r = skipped_record()
    validate(r)
    assert r["schema_version"] == SCHEMA_VERSION
    assert {"schema_version", "run_id", "status", "reason", "config", "measured", "predicted", "env"} <= set(r)
    env = r["env"]
    for key in ("device", "device_name", "driver", "cuda", "torch", "transformers", "optimizer_package",
                "git_commit", "time", "packages"):
        assert key in env
    assert env["torch"] and env["transformers"] and env["time"].endswith("+00:00")


@pytest.mark.parametrize("mutate", [
    lambda r: r.update(status="weird"),
    lambda r: r.update(schema_version=99),
    lambda r: r.pop("env"),
    lambda r: r.update(reason=""),                      # a non-ok status needs a reason
    lambda r: r["config"].update(batch_size=0),
    lambda r: r["config"].pop("optim"),
    lambda r: r.update(status="ok"),                    # ok needs measurements
    lambda r: r.update(measured={"device": "cpu"}),
])
def test_schema_rejects_broken_records(mutate):
    r = copy.deepcopy(skipped_record())
    mutate(r)
    with pytest.raises(jsonschema.ValidationError):
        validate(r)


def test_append_writes_one_line_per_record_and_refuses_invalid(tmp_path):
    path = tmp_path / "sub" / "runs.jsonl"
    a, b = skipped_record(), skipped_record()
    append_record(path, a)
    append_record(path, b)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [a, b]
    with pytest.raises(jsonschema.ValidationError):
        append_record(path, skipped_record(status="nope"))
    assert len(path.read_text().splitlines()) == 2


def test_append_after_a_torn_line_starts_a_fresh_line(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    whole = skipped_record()
    path.write_bytes(rec.to_line(whole) + b'{"torn": ')
    r = skipped_record()
    append_record(path, r)
    report = rec.ReadReport(str(path))
    assert list(read_records(path, report=report)) == [whole, r]
    assert report.not_json == [2] and report.records == 2  # the torn line is now a line of its own, skipped
    assert "skipped 1 of 3 lines: 1 not a JSON object (line 2)" in capsys.readouterr().err


def test_sigint_during_the_write_is_held_until_the_line_is_whole(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    real_write = os.write
    sent = []

    def write(fd, data):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-append: blocked until the line is written
        return real_write(fd, data)

    monkeypatch.setattr(rec.os, "write", write)
    r = skipped_record()
    with pytest.raises(KeyboardInterrupt):
        append_record(path, r)
        # the pending SIGINT is delivered as soon as the mask is restored, i.e. before this line
        pytest.fail("SIGINT was lost")
    assert sent and path.read_text() == rec.to_line(r).decode()


def test_short_write_is_rolled_back(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"whole": 1}\n')
    real_write = os.write
    monkeypatch.setattr(rec.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(OSError, match="short write"):
        append_record(path, skipped_record())
    assert path.read_text() == '{"whole": 1}\n'


def test_concurrent_writers_never_interleave(tmp_path):
    path = tmp_path / "runs.jsonl"
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from optimem.harness.record import append_record, build_record\n"
        "r = build_record(config={'optim': 'x', 'pad': 'y' * 20000}, status='error', reason='r', measured=None,"
        " predicted=None, env={})\n"
        "for _ in range(25):\n"
        "    append_record(%r, r, validate_first=False)\n" % (str(ROOT), str(path)))
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    text = path.read_text().splitlines()
    assert len(text) == 100
    assert all(json.loads(line)["config"]["optim"] == "x" for line in text)


def test_a_file_read_before_is_not_validated_again_and_reports_the_same(tmp_path, monkeypatch):
    """The schema check of a results file is kept in the cache by content: a second read skips validating but
    keeps and skips exactly what the first did (an edited file is checked anew)."""
    monkeypatch.setenv("OPTIMEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OPTIMEM_NO_CACHE", raising=False)
    bad = skipped_record()
    bad["config"]["batch_size"] = 0
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(skipped_record()) + "\n" + json.dumps(bad) + "\n")

    def read():
        report = rec.ReadReport(str(path))
        return [r["run_id"] for r in read_records(path, report=report, quiet=True)], report.invalid

    first = read()
    assert len(first[0]) == 1 and [n for n, _ in first[1]] == [2]

    def no_validation(obj):
        raise AssertionError("validated again")

    monkeypatch.setattr(rec, "_why_invalid", no_validation)
    assert read() == first
    path.write_text(path.read_text() + json.dumps(skipped_record()) + "\n")  # another content: checked anew
    with pytest.raises(AssertionError, match="validated again"):
        read()
