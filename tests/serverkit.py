"""A real TorchServe for the server tests: one per session, free loopback ports, token auth on.

``torchserve_server`` (session fixture) builds the archives if needed (``./archive.sh``, idempotent),
writes a temporary ``config.properties`` derived from the project's with free ports and an absolute
model store, starts ``torchserve --foreground`` in a temporary working directory (its pid file via
``TMPDIR``, its ``key_file.json`` and ``logs/`` there, so it never collides with a server started by
``./setup.sh``), waits for ``/ping`` and every model, and stops it at the end with
``torchserve --stop`` (asserting the process exited). Also usable outside pytest:
``python tests/serverkit.py`` starts one and prints how to reach it.

``KServe`` is the same for camserve's KServe predictor: ``camserve kserve …`` in a subprocess on a
free loopback port, ready on ``/v2/models/<name>/ready``, stopped with SIGTERM (tests/test_kserve.py,
benchmarks/kserve_vs_torchserve.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
MODELS = {"effnet_lite0": "effnet_lite0.mar", "effnet_lite0_embed": "effnet_lite0_embed.mar"}
READY_TIMEOUT_S = float(os.environ.get("CAMSERVE_SERVER_TIMEOUT", "420"))
KSERVE_READY_S = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 30) -> Optional[int]:
    """SIGTERM, ``timeout`` seconds to exit, then SIGKILL; returns the exit code (a no-op once exited)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
    return process.returncode


def derived_config(source: Path, ports: Dict[str, int], model_store: Path, models: Dict[str, str],
                   overrides: Optional[Dict[str, str]] = None) -> str:
    """The project's config.properties with our ports, model store and models."""
    replace = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": str(model_store),
        "load_models": ",".join(f"{k}={v}" for k, v in models.items()),
        **(overrides or {}),
    }
    lines, seen = [], set()
    for line in source.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and "=" in line and key in replace:
            lines.append(f"{key}={replace[key]}")
            seen.add(key)
        else:
            lines.append(line)
    lines += [f"{k}={v}" for k, v in replace.items() if k not in seen]
    return "\n".join(lines) + "\n"


@dataclass
class TorchServe:
    workdir: Path
    ports: Dict[str, int]
    models: Dict[str, str]
    process: Optional[subprocess.Popen] = None
    keys: Dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"

    @property
    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env.update(TMPDIR=str(tmp), TEMP=str(tmp), LOG_LOCATION=str(self.workdir / "logs"),
                   METRICS_LOCATION=str(self.workdir / "logs"), PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
        # the handlers' audit log on (tests/test_server_audit.py counts its own requests' records)
        env.setdefault("CAMSERVE_AUDIT_LOG", str(self.audit_dir / "audit-{pid}.jsonl"))
        return env

    @property
    def audit_dir(self) -> Path:
        return self.workdir / "audit"

    def headers(self, api: str = "inference") -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[api]}"}

    def log_tail(self, lines: int = 60) -> str:
        out = []
        for name in ("model_log.log", "ts_log.log"):
            path = self.workdir / "logs" / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def model_log(self) -> str:
        path = self.workdir / "logs" / "model_log.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, config_source: Path = REPO / "config.properties", model_store: Path = REPO / "model_store",
              overrides: Optional[Dict[str, str]] = None) -> "TorchServe":
        config = self.workdir / "config.properties"
        config.write_text(derived_config(config_source, self.ports, model_store, self.models, overrides))
        cmd = [str(VENV_BIN / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(config),
               "--model-store", str(model_store), "--models", *[f"{k}={v}" for k, v in self.models.items()]]
        self.stdout = open(self.workdir / "stdout.log", "wb")
        self.process = subprocess.Popen(cmd, cwd=self.workdir, env=self.env, stdout=self.stdout,
                                        stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # a server that never became ready must not outlive the test session
            raise
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        key_file = self.workdir / "key_file.json"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.process.returncode}\n{self.log_tail()}")
            if key_file.exists() and not self.keys:
                try:
                    data = json.loads(key_file.read_text())
                    self.keys = {api: data[api]["key"] for api in ("inference", "management")}
                except (ValueError, KeyError):
                    pass
            if self.keys and self._models_ready():  # /ping and the management API need the keys
                return
            time.sleep(1.0)
        raise TimeoutError(f"torchserve not ready after {timeout:.0f} s\n{self.log_tail()}")

    def _models_ready(self) -> bool:
        try:
            if requests.get(f"{self.url}/ping", headers=self.headers(), timeout=5).json().get("status") != "Healthy":
                return False
            for name in self.models:
                info = requests.get(f"{self.management_url}/models/{name}", headers=self.headers("management"),
                                    timeout=5)
                if info.status_code != 200:
                    return False
                workers = info.json()[0].get("workers", [])
                if not workers or any(w.get("status") != "READY" for w in workers):
                    return False
            return True
        except (requests.RequestException, ValueError):
            return False

    def stop(self, timeout: float = 90) -> int:
        """``torchserve --stop`` (same pid-file dir), then wait; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            subprocess.run([str(VENV_BIN / "torchserve"), "--stop", "--foreground"], cwd=self.workdir,
                           env=self.env, timeout=timeout, capture_output=True)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.stdout.close()
        return self.process.returncode


def start_server(models: Dict[str, str] = MODELS, workdir: Optional[Path] = None,
                 overrides: Optional[Dict[str, str]] = None, byo: bool = False) -> TorchServe:
    """A TorchServe with ``models``; with ``byo`` also the bring-your-own archives of
    tests/byo_archives.py, built by ``camserve archive`` into the model store first."""
    subprocess.run([str(REPO / "archive.sh")], check=True, cwd=REPO, capture_output=True)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="camserve-ts-"))
    models = dict(models)
    if byo:
        from byo_archives import build_byo_archives

        models.update(build_byo_archives(REPO / "model_store", workdir / "byo"))
    ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
    return TorchServe(workdir, ports, dict(models)).start(overrides=overrides)


class KServe:
    """``camserve kserve …`` in a subprocess on a free loopback port; always stopped."""

    def __init__(self, name: str, args: List[str], workdir: Path):
        self.name = name
        self.port = free_port()
        self.workdir = workdir
        self.log = workdir / f"kserve-{name}.log"
        cmd = [str(VENV_BIN / "camserve"), "kserve", "--name", name, "--http-port", str(self.port),
               "--host", "127.0.0.1", "--device", "cpu", *args]
        env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
        self.out = open(self.log, "wb")
        self.process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def wait_ready(self, timeout: float = KSERVE_READY_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"camserve kserve exited with {self.process.returncode}\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/v2/models/{self.name}/ready", timeout=3).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"camserve kserve {self.name} not ready after {timeout:.0f} s\n{self.tail()}")

    def stop(self) -> Optional[int]:
        stop_process(self.process, timeout=60)
        self.out.close()
        return self.process.returncode

    def post(self, path: str, timeout: float = 300, **kwargs) -> requests.Response:
        return requests.post(f"{self.url}{path}", timeout=timeout, **kwargs)

    def metric(self, series: str, **labels) -> float:
        """The sum of a Prometheus series' samples whose labels include ``labels``."""
        total = 0.0
        for line in requests.get(f"{self.url}/metrics", timeout=30).text.splitlines():
            match = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
            if not match or match.group(1) != series:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(match.group(3))
        return total


def start_kserve(name: str, args: List[str], workdir: Path, timeout: float = KSERVE_READY_S) -> KServe:
    """One :class:`KServe`, ready; stopped again if it never becomes ready."""
    server = KServe(name, args, workdir)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


def pytest_configure(config):
    config.addinivalue_line("markers", "server_shutdown: stops the session TorchServe; runs after every other test")


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``server_shutdown`` run last, after every test that uses the session server."""
    items.sort(key=lambda item: item.get_closest_marker("server_shutdown") is not None)


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def torchserve_server():
    if shutil.which("java") is None:
        pytest.fail("java not found: TorchServe needs a Java 17 runtime")
    server = start_server(byo=True)  # the bundled archives side by side with bring-your-own ones
    yield server
    if server.process is not None and server.process.poll() is None:
        server.stop()
    shutil.rmtree(server.workdir, ignore_errors=True)


if __name__ == "__main__":
    server = start_server()
    print(f"TorchServe up at {server.url}; key {server.keys['inference']}; workdir {server.workdir}")
    print("press Ctrl-C to stop")
    try:
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopped with", server.stop())
    sys.exit(0)
