"""OpenAI request bodies (validated by pydantic) and OpenAI-shaped errors.

Fields this server does not implement are refused (400 naming the field) rather than ignored,
except where the value asked for is the one it implements (``n=1``, no logprobs, no penalties).
SnapKV settings travel in ``extra_body={"snapkv": {...}}``: ``budget``, ``window``, ``kernel``,
``pooling``, ``gqa_reduce`` (as :class:`~snapkv.config.SnapKVConfig`), ``doc_cache`` (true to
serve the context from the document cache, false never, unset: when the context is long
enough) and, for ``/v1/completions``, ``context_prefix_chars`` (the first N characters of the
prompt are the document).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             429: "rate_limit_error"}.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class SnapKVOptions(BaseModel):
    """Per-request SnapKV settings (``extra_body={"snapkv": {...}}``); unset fields take the server's."""

    model_config = ConfigDict(extra="forbid")
    budget: StrictInt | StrictFloat | None = None
    window: StrictInt | None = None
    kernel: StrictInt | None = None
    pooling: StrictStr | None = None
    gqa_reduce: StrictStr | None = None
    doc_cache: bool | None = None
    context_prefix_chars: StrictInt | None = Field(default=None, ge=1)


class StreamOptions(BaseModel):
    """``stream_options``."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | StrictInt | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | StrictInt | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: Literal[1] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Literal[False] | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    user: StrictStr | None = None
    snapkv: SnapKVOptions | None = None

    def stops(self) -> list[str]:
        """Stop strings as a list (at most 4, as OpenAI allows)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop takes at most 4 strings, got {len(stop)}", param="stop", code="invalid_value")
        return stop


class ContentPart(BaseModel):
    """A text part of a message (other part types are refused)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None

    def text(self) -> str:
        """The message's text."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (one prompt: a string, or a list of token ids)."""

    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    echo: Literal[False] | None = None
    best_of: Literal[1] | None = None
    suffix: None = None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 naming the first invalid field (pydantic errors, FastAPI's ``body`` prefix dropped)."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # Union members add their type names to the location: keep the field path only.
    loc = [p for p in loc if not p.startswith(("str", "list[", "int", "float", "bool", "literal[", "function-"))]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid value')}", param=param, code="invalid_value")
