"""The one exception a client call raises: the server's status and message (or the transport's)."""

from __future__ import annotations

from typing import Any, Optional


class CamserveError(Exception):
    """A request that did not get an answer: ``status`` (HTTP status; ``None`` when the server was not
    reached), ``message`` (the server's own words when it gave any) and ``body`` (its parsed body)."""

    def __init__(self, status: Optional[int], message: str, body: Any = None):
        super().__init__(f"{status if status is not None else 'no answer'}: {message}")
        self.status, self.message, self.body = status, message, body
