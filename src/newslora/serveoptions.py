"""The server's batching and limits, each a ``newslora serve`` option: defined here once, with its default and
help, for :mod:`newslora.serve` and the command line (which reads them without importing the server)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import NewsloraError

TOKEN_ENV = "NEWSLORA_API_TOKEN"
MAX_TEXTS = 256


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ServeOptions:
    """Batching and limits of the server (each is a ``newslora serve`` option, named with dashes)."""

    max_batch: int = _option(64, "texts per forward pass when concurrent requests are merged")
    batch_wait_ms: float = _option(5.0, "how long to wait after a request for others to merge")
    batching: bool = _option(True, "merge concurrent requests into one forward pass (off: one forward per request)")
    max_queue: int = _option(256, "requests waiting for inference; more get 503 + Retry-After")
    max_texts: int = _option(MAX_TEXTS, "texts per request (more: 413)")
    max_text_bytes: int = _option(4096, "UTF-8 bytes per text (more: 413)")
    max_body_bytes: int = _option(2 * 1024 * 1024, "request body bytes (more: 413)")
    retry_after_s: int = 1  # the Retry-After of a 503 (not an option)
    token: str | None = None  # bearer token; None: no auth (from $NEWSLORA_API_TOKEN, not an option)

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "max_texts", "max_text_bytes", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise NewsloraError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.batch_wait_ms < float("inf"):  # NaN and inf fail too: a wait must be a finite time
            raise NewsloraError(f"batch-wait-ms must be a finite number >= 0, got {self.batch_wait_ms}")
