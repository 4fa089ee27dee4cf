"""Refresh the generated parts of docs/RESULTS.md from the records (handwritten text stays).

    python results/build_results.py

Writes results/combined/report.md (+ plots) and results/smollm2-2k-ruler/report.md, then replaces
the text between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` in docs/RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from snapkv.eval.report import detail_tables, load_records, summary_tables, timing_lines, write_report

ROOT = Path(__file__).resolve().parents[1]
MAIN = ["smollm2-2k", "smollm2-4k", "smollm2-8k", "gemma3-4k", "gemma3-8k", "gemma3-16k"]
RULER = ["smollm2-2k-ruler"]


def _dirs(names: list[str]) -> list[Path]:
    return [ROOT / "results" / n for n in names if (ROOT / "results" / n / "records.jsonl").exists()]


def _script(name: str) -> object:
    """The module ``results/<name>.py`` (a table script)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "results" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reuse4k() -> str:
    """The "Reuse at 4x" tables (results/reuse_4k_table.py)."""
    return _script("reuse_4k_table").render()


def _qwen15b() -> str:
    """The 1.5B tables (results/qwen15b_table.py)."""
    return _script("qwen15b_table").render()


def main() -> None:
    """Render both reports and splice their tables into docs/RESULTS.md."""
    main_dirs, ruler_dirs = _dirs(MAIN), _dirs(RULER)
    write_report(ROOT / "results" / "combined", main_dirs)
    for d in ruler_dirs:
        write_report(d)
    records = load_records(main_dirs)
    ruler = load_records(ruler_dirs)
    parts = {
        "summary": "\n".join(summary_tables(records)),
        "details": "\n".join(detail_tables(records)),
        "ruler": "\n".join(summary_tables(ruler) + detail_tables(ruler)),
        "timings": "\n".join(timing_lines(records + ruler)),
        "counts": f"{len(records) + len(ruler):,} records",
        "reuse4k": _reuse4k(),
        "qwen15b": _qwen15b(),
    }
    doc = ROOT / "docs" / "RESULTS.md"
    text = doc.read_text(encoding="utf-8")
    for name, body in parts.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->)(.*?)(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"docs/RESULTS.md has no generated:{name} block")
        text = pattern.sub(lambda m, body=body: f"{m.group(1)}\n{body}\n{m.group(3)}", text)
    doc.write_text(text, encoding="utf-8")
    print(f"updated {doc} from {parts['counts']}")


if __name__ == "__main__":
    main()
