"""Reading records: old probe records (before the probe kept the context's tail) are probe-only."""

from __future__ import annotations

import json
from pathlib import Path

from snapkv.eval.report import load_records


def test_old_probe_records_read_as_probe_only(tmp_path: Path) -> None:
    rows = [{"mode": "probe", "index": 0}, {"mode": "probe", "index": 1, "probe_window": "probe+window"},
            {"mode": "query", "index": 2}, {"mode": "probe-only", "index": 3}]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["mode"] for r in load_records([tmp_path])] == ["probe-only", "probe", "query", "probe-only"]
    assert load_records([tmp_path / "missing"]) == []
