"""The only place that knows transformers internals."""
