"""The one error the view answers the page with: an HTTP status and a message a person can act on."""

from __future__ import annotations

from typing import Any, Dict


class ViewError(Exception):
    """A request the view cannot answer: ``status`` (4xx for the page's input, 502 when the server
    behind it gave no answer) and ``message`` (shown on the page)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = int(status), message

    def to_json(self) -> Dict[str, Any]:
        """``{"error": {"status", "message"}}``, the shape of the servers' own error bodies."""
        return {"error": {"status": self.status, "message": self.message}}
