"""The house rules that keep the layout readable, checked on every run: the import-linter contracts in
pyproject.toml (layers, no cycles, no benchmark or Ray where they do not belong) and the size of a room."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 600  # a module longer than this holds more than one concept: split it


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_module_is_longer_than_the_limit():
    generated = {REPO / "kvstore/proto/kvstore_pb2.py", REPO / "kvstore/proto/kvstore_pb2_grpc.py"}  # protoc's
    long = {str(path.relative_to(REPO)): n for path in sorted((REPO / "kvstore").rglob("*.py"))
            if path not in generated and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
