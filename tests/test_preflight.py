"""tools/preflight.py: every check runs and is listed, any failure exits 1, secrets stay unprinted."""

from __future__ import annotations

import sys

from tests.helpers import load_tool

preflight = load_tool("preflight")


def test_every_failure_is_listed_and_the_run_fails(tmp_path, monkeypatch, capsys):
    present = tmp_path / "questions.jsonl"
    present.write_text("{}\n")
    monkeypatch.setenv("CAREVL_TEST_KEY", "sk-preflight-secret")
    monkeypatch.delenv("CAREVL_TEST_MISSING", raising=False)
    status = preflight.main(
        [
            "--files", str(present), str(tmp_path / "absent.jsonl"),
            "--env", "CAREVL_TEST_KEY", "CAREVL_TEST_MISSING|CAREVL_TEST_MISSING_TOO",
            "--imports", f"{sys.executable}:json,carevl", f"{sys.executable}:json,no_such_module_here",
            f"{tmp_path / 'no-venv' / 'python'}:vllm",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 1
    assert f"ok   file {present}" in out and f"FAIL file {tmp_path / 'absent.jsonl'}" in out
    assert "ok   environment CAREVL_TEST_KEY" in out
    assert "FAIL environment CAREVL_TEST_MISSING or CAREVL_TEST_MISSING_TOO: not set" in out
    assert f"ok   {sys.executable} imports json,carevl" in out
    assert "No module named 'no_such_module_here'" in out
    assert "no such interpreter" in out
    assert "preflight: 3 of 7 checks passed" in out
    assert "sk-preflight-secret" not in out


def test_all_checks_passing_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAREVL_TEST_KEY", "x")
    assert preflight.main(["--files", str(tmp_path), "--env", "CAREVL_TEST_KEY", "--imports", "python:json"]) == 0
    assert "preflight: 3 of 3 checks passed" in capsys.readouterr().out
