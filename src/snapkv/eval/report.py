"""Placeholder; replaced below."""
from pathlib import Path


def write_report(out: Path) -> None:
    """Write report.md (stub)."""
