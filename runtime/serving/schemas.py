"""What the server's requests may hold (pydantic models: a bad or unknown field is a 400),
the prompts they give, and the chat template that turns messages into one prompt."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from infini_trt.export.errors import InfiniTrtError

PLAIN_TEMPLATE = "{role}: {content}\n"          # each message; then "assistant:"


class APIError(Exception):
    """An error response: HTTP status, message and OpenAI's type/param/code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields completions and chat share. temperature 0 is greedy decoding; `context`
    (an extra field: the OpenAI client's extra_body) continues a stored context, the prompt
    being what follows its document; `ignore_eos` (extra, as vLLM's) generates max_tokens
    tokens whatever they are."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    context: str | None = Field(None, description="The id of a context (POST /v1/contexts) "
                                                  "to continue from.")
    ignore_eos: bool = Field(False, description="Go on past the end-of-sequence token, to "
                                                "max_tokens (as vLLM's; for benchmarks).")

    UNSUPPORTED: ClassVar[dict] = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                   "logit_bias": None}

    def check_supported(self) -> None:
        """Fields the API has and this server does not do: refused unless left as default
        (an empty logit_bias too)."""
        for name, default in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value != default and not (name == "logit_bias" and not value):
                raise APIError(400, f"{name}={value!r} is not supported by this server",
                               param=name, code="unsupported_parameter")


class CompletionRequest(Sampling):
    prompt: Any = Field(..., description="Text, token ids, or a list of either (one choice "
                                         "each).")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    UNSUPPORTED: ClassVar[dict] = {**Sampling.UNSUPPORTED, "echo": False, "logprobs": None,
                                   "best_of": None, "suffix": None}


class ContextRequest(BaseModel):
    """POST /v1/contexts: a document read once and kept, to be continued by id."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: Any = Field(..., description="Text or token ids.")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict:
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    UNSUPPORTED: ClassVar[dict] = {**Sampling.UNSUPPORTED, "logprobs": False,
                                   "top_logprobs": None}


def prompt_list(prompt: Any) -> list:
    """A completion's `prompt` -> [text or [ids]]: a string, a list of ints, or a non-empty
    list of those (one choice each)."""
    def ids(value) -> bool:
        return isinstance(value, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str) or (ids(prompt) and prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        return prompt
    raise APIError(400, "prompt must be a string, a list of token ids, or a list of those",
                   param="prompt", code="invalid_value")


class ChatTemplate:
    """Messages -> prompt text: the checkpoint's Jinja chat template where it has one, else the
    plain template, each message as "{role}: {content}" on its own line, then "assistant:".
    The template is read beside its tokenizer.json, as transformers reads it: chat_template.jinja
    (where newer transformers saves it) before tokenizer_config.json's "chat_template"; the
    special tokens come from tokenizer_config.json."""

    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self._compiled = None

    @property
    def kind(self) -> str:
        return "tokenizer" if self.source else "plain"

    @classmethod
    def of(cls, model: str | Path) -> "ChatTemplate":
        from ..tokenizer import tokenizer_file

        tokenizer = tokenizer_file(model)
        if tokenizer is None:
            return cls()
        config = tokenizer.parent / "tokenizer_config.json"
        jinja = tokenizer.parent / "chat_template.jinja"
        try:
            data = json.loads(config.read_text("utf-8")) if config.is_file() else {}
        except (OSError, ValueError) as exc:
            raise InfiniTrtError(f"cannot read {config}: {exc}") from None
        source = data.get("chat_template")
        if jinja.is_file():
            try:
                source = jinja.read_text("utf-8")
            except (OSError, ValueError) as exc:
                raise InfiniTrtError(f"cannot read {jinja}: {exc}") from None
        if isinstance(source, list):           # named templates: [{"name", "template"}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        return cls(source if isinstance(source, str) else None,
                   _token_text(data.get("bos_token")), _token_text(data.get("eos_token")))

    def render(self, messages: list[dict]) -> str:
        if not self.source:
            lines = [PLAIN_TEMPLATE.format(**m) for m in messages]
            return "".join(lines) + "assistant:"
        import jinja2

        try:
            return self._template().render(messages=messages, add_generation_prompt=True,
                                           bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as exc:
            raise InfiniTrtError(f"the chat template cannot render these messages: {exc}"
                                 ) from None

    def _template(self):
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise InfiniTrtError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.source)
        return self._compiled


def _token_text(token) -> str:
    """tokenizer_config.json names a special token as a string or {"content": ...}."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""
