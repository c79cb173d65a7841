"""Clean shutdown of the session TorchServe (runs last: marked ``server_shutdown``, see serverkit)."""

from __future__ import annotations

import pytest
import requests

from serverkit import port_open

pytestmark = [pytest.mark.server, pytest.mark.server_shutdown]


def test_clean_shutdown(torchserve_server):
    server = torchserve_server
    assert requests.get(f"{server.url}/ping", headers=server.headers(), timeout=30).json()["status"] == "Healthy"
    pid_file = server.workdir / "tmp" / ".model_server.pid"
    assert pid_file.exists()
    code = server.stop()
    assert code == 0, server.log_tail()
    assert server.process.poll() is not None
    assert not pid_file.exists()  # torchserve --stop removed its pid file
    assert not (server.workdir / "key_file.json").exists()
    for name, port in server.ports.items():
        assert not port_open(port), f"{name} port {port} still open after stop"
