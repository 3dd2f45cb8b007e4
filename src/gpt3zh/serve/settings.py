"""Server settings, kept apart from the app so the CLI can build its flags without importing FastAPI."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServeConfig:
    """Server settings; `gpt3zh serve` derives its flags from these fields."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY'"})
    max_batch: int = field(default=8, metadata={"help": "sequences decoded together (KV cache rows)"})
    max_queue: int = field(default=64, metadata={"help": "waiting sequences before new requests get 503"})
    max_tokens: int = field(default=1024, metadata={"help": "cap on max_tokens per request"})
    max_len: int | None = field(default=None, metadata={"help": "context per sequence (default: the model's)"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest accepted request body"})
    read_timeout: float = field(default=10.0, metadata={
        "help": "seconds a client has to send a request's headers, and again its body (slow clients are cut off)"})

    def __post_init__(self) -> None:
        for name in ("port", "max_batch", "max_queue", "max_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "port" else 1):
                raise ValueError(f"serve option {name} must be a positive int, got {value!r}")
        if isinstance(self.read_timeout, bool) or not isinstance(self.read_timeout, (int, float)) \
                or not 0 < self.read_timeout < float("inf"):
            raise ValueError("serve option read_timeout must be a positive number of seconds, "
                             f"got {self.read_timeout!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("serve option api_key must not be empty (leave it out to disable auth)")
