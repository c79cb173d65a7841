"""A real handler in-process, as a TorchServe worker drives it: ``initialised`` (a TorchServe
``Context`` with the model-config mapping, then ``initialize``) and ``handle`` (one batch of rows as
the frontend hands them, each with its own request processor and id). Shared by the tests that
need a handler without a server (faults, monitoring) and by ``benchmarks/monitor_cost.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

from ts.context import Context, RequestProcessor


def initialised(cls, workdir: Union[str, Path], config: Dict[str, Any], name: str = "effnet_lite0",
                batch_size: int = 8) -> Tuple[Any, Context]:
    """``cls()`` initialised on ``config`` (a ``model-config.yaml`` mapping) in ``workdir``."""
    manifest = {"model": {"modelName": name, "modelVersion": "1.0"}}
    context = Context(name, str(workdir), manifest, batch_size, None, "0.12.0", model_yaml_config=config)
    handler = cls()
    handler.initialize(context)
    return handler, context


def handle(handler, context: Context, rows: List[Dict[str, Any]]) -> List[Any]:
    """One batch: the handler's answers, one per row (statuses in ``context.get_response_status(i)``)."""
    context.request_processor = [RequestProcessor({}) for _ in rows]
    context.request_ids = {i: f"req-{i}" for i in range(len(rows))}
    answers = handler.handle(rows, context)
    assert len(answers) == len(rows)
    return answers
