"""Offline long-context evaluation: RULER-style tasks, baselines, runner, report and plots."""
