"""Cost of an explanation through a running TorchServe: concurrent HTTP clients on loopback.

For each case (plain prediction, camserve explained predictions, TorchServe's stock
``image_classifier`` predict and its Captum-IG ``/explanations`` route on the same weights) and each
concurrency ``c`` (1 and 8 clients), a fixed number of real photographs is posted; cases are
interleaved in rounds (every case once per round, at every concurrency) and the run stops starting
rounds once its time budget is spent. Figures per case:

* latency percentiles (p50/p90/max, ms) over all rounds,
* throughput = requests / wall time of the round (median over rounds),
* server CPU per request = CPU seconds of the whole TorchServe process tree (frontend + workers,
  ``/proc/<pid>/stat``) during the round / requests — robust to other jobs sharing the cores,

each also as a **ratio to camserve's plain prediction at the same concurrency in the same run**
(latency: p50 / p50; throughput: plain / case, i.e. the cost per request; CPU: case / plain).

By default a TorchServe is started on free loopback ports in a temporary working directory (the
test suite's ``tests/serverkit.py`` machinery) serving ``model_store/effnet_lite0.mar`` and a stock
archive built here: EfficientNet-Lite0 traced to TorchScript (wrapped so TorchServe's ImageNet
normalisation maps onto the model's mean/std 0.5), ``index_to_name.json`` from camserve's class
names, handler ``image_classifier``, the same batching (``batchSize: 8``, ``maxBatchDelay: 100``).
The stock explain runs ``IntegratedGradients(model).attribute(batch, target=0, n_steps=15)`` on the
whole batch and answers the attributions as JSON lists (no prediction). ``--url``/``--key-file``
attach to a server that is already running instead (no server CPU figures then).

    python benchmarks/bench_server.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import serverkit  # noqa: E402  (the test suite's TorchServe starter: ports, derived config, keys, stop)
from camserve.commands.machine import machine_description  # noqa: E402

PHOTOS = REPO.parent / "shared" / "data" / "imagenet-samples"
MODEL = "effnet_lite0"
STOCK = "effnet_lite0_stock"
STOCK_CONFIG = """\
minWorkers: 1
maxWorkers: 1
batchSize: 8
maxBatchDelay: 100
responseTimeout: 300
startupTimeout: 300
"""


@dataclass
class Case:
    name: str
    route: str                              # /predictions/<m> or /explanations/<m>
    fields: Dict[str, str]                  # multipart option fields besides the image
    check: Callable[[dict], Optional[str]]  # None if the answer is what the case asked for
    base: str = "plain"                     # the case its ratios are taken against
    concurrencies: List[int] = field(default_factory=list)
    requests: Dict[int, int] = field(default_factory=dict)


def camserve_check(method: Optional[str]) -> Callable:
    def check(body) -> Optional[str]:
        if not isinstance(body, dict) or not body.get("predictions"):
            return f"no predictions in {str(body)[:200]}"
        if method is None:
            return None if "explanation" not in body else "unexpected explanation"
        e = body.get("explanation") or {}
        if e.get("method") != method or not e.get("heatmap"):
            return f"explanation {e.get('method')!r} without heatmap, wanted {method}"
        return None
    return check


def stock_predict_check(body) -> Optional[str]:
    return None if isinstance(body, dict) and len(body) == 5 else f"stock predict answered {str(body)[:200]}"


def stock_explain_check(body) -> Optional[str]:
    ok = isinstance(body, list) and len(body) == 3 and len(body[0]) == 224 and len(body[0][0]) == 224
    return None if ok else f"stock explain answered {str(body)[:200]}"


def build_cases(args, stock: bool) -> List[Case]:
    p = f"/predictions/{args.model}"
    cases = [
        Case("plain", p, {}, camserve_check(None)),
        Case("camserve gradcam @_conv_head", p, {"explain": "gradcam", "layer": "_conv_head"}, camserve_check("gradcam")),
        Case("camserve layercam @_blocks.2", p, {"explain": "layercam", "layer": "_blocks.2"}, camserve_check("layercam")),
        Case("camserve shallowcam @_blocks.2", p, {"explain": "shallowcam", "layer": "_blocks.2"},
             camserve_check("shallowcam")),
        Case(f"camserve captum.integrated_gradients steps={args.ig_steps}", p,
             {"explain": "captum.integrated_gradients", "steps": str(args.ig_steps)},
             camserve_check("captum.integrated_gradients")),
    ]
    if stock:
        cases += [Case("stock image_classifier predict", f"/predictions/{args.stock_model}", {}, stock_predict_check),
                  Case("stock image_classifier explain (Captum IG, 15 steps)", f"/explanations/{args.stock_model}", {},
                       stock_explain_check)]
    for case in cases:
        ig = "integrated" in case.name or "Captum IG" in case.name
        case.concurrencies = args.ig_concurrency if ig else args.concurrency
        for c in case.concurrencies:
            if ig:
                case.requests[c] = args.ig_requests * c
            else:
                case.requests[c] = args.requests if c == 1 else args.requests_concurrent
    return cases


# ---------------------------------------------------------------- the server (started here)

class BenchServer(serverkit.TorchServe):
    """serverkit's TorchServe without the audit log (unless asked) and with a torch thread count."""

    threads: int = 1

    @property
    def env(self) -> Dict[str, str]:
        env = super().env
        if "CAMSERVE_AUDIT_LOG" not in os.environ:
            env.pop("CAMSERVE_AUDIT_LOG", None)
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        return env


def build_stock_archive(store: Path, stage: Path) -> None:
    """TorchServe's stock path on camserve's weights: TorchScript + index_to_name.json + image_classifier."""
    import torch

    from camserve.engine.models import EFFNET_LITE0, imagenet_class_names, load_effnet_lite0

    class StockInput(torch.nn.Module):
        """x_model = (x_imagenet · σ_in + μ_in − μ) / σ: the stock ImageNet normalisation → the model's."""

        def __init__(self, model):
            super().__init__()
            mu_in, sd_in = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
            mu, sd = torch.tensor(EFFNET_LITE0.mean), torch.tensor(EFFNET_LITE0.std)
            self.register_buffer("scale", (sd_in / sd).view(1, 3, 1, 1))
            self.register_buffer("shift", ((mu_in - mu) / sd).view(1, 3, 1, 1))
            self.model = model

        def forward(self, x):
            return self.model(x * self.scale + self.shift)

    with torch.no_grad():
        traced = torch.jit.trace(StockInput(load_effnet_lite0()).eval(), torch.zeros(1, 3, 224, 224))
    traced.save(str(stage / f"{STOCK}.pt"))
    (stage / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(imagenet_class_names())}))
    (stage / "model-config.yaml").write_text(STOCK_CONFIG)
    subprocess.run([str(serverkit.VENV_BIN / "torch-model-archiver"), "--force", "--model-name", STOCK,
                    "--version", "1.0", "--serialized-file", str(stage / f"{STOCK}.pt"),
                    "--handler", "image_classifier", "--extra-files", str(stage / "index_to_name.json"),
                    "--config-file", str(stage / "model-config.yaml"), "--export-path", str(store)],
                   check=True, capture_output=True)


def start_server(args, workdir: Path) -> BenchServer:
    subprocess.run([str(REPO / "archive.sh")], check=True, cwd=REPO, capture_output=True)
    store = workdir / "model_store"  # the name matches config.properties' allowed_urls
    stage = workdir / "stage"
    store.mkdir()
    stage.mkdir()
    shutil.copy2(REPO / "model_store" / f"{MODEL}.mar", store / f"{MODEL}.mar")
    models = {MODEL: f"{MODEL}.mar"}
    if not args.no_stock:
        build_stock_archive(store, stage)
        models[STOCK] = f"{STOCK}.mar"
    ports = {n: serverkit.free_port() for n in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
    server = BenchServer(workdir, ports, models)
    server.threads = args.threads
    return server.start(model_store=store)


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and all its live descendants (Linux /proc)."""
    children: Dict[int, List[int]] = {}
    stats: Dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        rest = text[text.rfind(")") + 2:].split()  # fields after "pid (comm)"
        pid, ppid = int(entry), int(rest[1])
        children.setdefault(ppid, []).append(pid)
        stats[pid] = (int(rest[11]) + int(rest[12])) / tick
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


# ---------------------------------------------------------------- the clients

def load_photos(count: int) -> List[bytes]:
    rows = [line.split("\t") for line in (PHOTOS / "LABELS.tsv").read_text().splitlines()[1:]]
    return [(PHOTOS / r[3].strip()).read_bytes() for r in rows[:count]]


class Clients:
    """``c`` client threads, one keep-alive HTTP session each."""

    def __init__(self, url: str, key: str, photos: List[bytes], timeout: float):
        self.url, self.headers, self.photos, self.timeout = url, {"Authorization": f"Bearer {key}"}, photos, timeout
        self.local = threading.local()
        self.next_photo = 0
        self.lock = threading.Lock()
        self.top1: Dict[str, Dict[int, str]] = {}

    def session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def one(self, case: Case) -> float:
        with self.lock:
            index = self.next_photo % len(self.photos)
            self.next_photo += 1
        files = {"data": self.photos[index], **case.fields}
        start = time.perf_counter()
        response = self.session().post(f"{self.url}{case.route}", headers=self.headers, files=files, timeout=self.timeout)
        seconds = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"{case.name}: HTTP {response.status_code} {response.text[:300]}")
        body = response.json()
        problem = case.check(body)
        if problem:
            raise RuntimeError(f"{case.name}: {problem}")
        if case.route.startswith("/predictions/"):  # top-1 label per photo, to compare the two models
            label = body["predictions"][0]["label"] if "predictions" in body else next(iter(body))
            self.top1.setdefault(case.route, {})[index] = label
        return seconds

    def round(self, case: Case, concurrency: int, count: int, server_pid: Optional[int]) -> dict:
        cpu0 = tree_cpu_seconds(server_pid) if server_pid else None
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(lambda _: self.one(case), range(count)))
        wall = time.perf_counter() - start
        cpu = tree_cpu_seconds(server_pid) - cpu0 if server_pid else None
        return {"latencies": latencies, "wall": wall, "cpu": cpu, "count": count}


# ---------------------------------------------------------------- the run

def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarise(rounds: List[dict]) -> dict:
    lat = [s for r in rounds for s in r["latencies"]]
    out = {"rounds": len(rounds), "requests": len(lat),
           "latency_ms": {"p50": 1000 * percentile(lat, 50), "p90": 1000 * percentile(lat, 90), "max": 1000 * max(lat),
                          "mean": 1000 * statistics.fmean(lat)},
           "throughput_rps": statistics.median(r["count"] / r["wall"] for r in rounds),
           "throughput_rps_per_round": [r["count"] / r["wall"] for r in rounds]}
    if rounds[0]["cpu"] is not None:
        out["server_cpu_ms_per_request"] = 1000 * statistics.median(r["cpu"] / r["count"] for r in rounds)
    return out


def add_ratios(results: Dict[str, Dict[int, dict]]) -> None:
    for case, by_c in results.items():
        for c, s in by_c.items():
            base = results["plain"].get(c)
            if not base:
                continue
            s["latency_p50_ratio"] = s["latency_ms"]["p50"] / base["latency_ms"]["p50"]
            s["cost_ratio_throughput"] = base["throughput_rps"] / s["throughput_rps"]
            if "server_cpu_ms_per_request" in s:
                s["server_cpu_ratio"] = s["server_cpu_ms_per_request"] / base["server_cpu_ms_per_request"]


def machine() -> str:
    return machine_description()


def markdown(meta: dict, results: Dict[str, Dict[int, dict]]) -> str:
    lines = ["# Cost of an explanation through TorchServe\n",
             f"TorchServe {meta['torchserve']} on loopback, {meta['machine']} (shared with other jobs: absolute "
             f"figures are for this CPU at this load only; the ratios are the result). Worker torch threads: "
             f"{meta['threads'] or 'default'}; one worker per model, `batchSize: 8`, `maxBatchDelay: 100` ms. "
             f"{meta['rounds_done']} interleaved rounds (every case at every concurrency once per round), "
             f"{meta['photos']} real photographs cycled. Ratios are to camserve's plain prediction at the same "
             f"concurrency in the same run: **latency** = p50 / plain p50, **throughput** = plain req/s / case "
             f"req/s (the cost of one request), **server CPU** = CPU seconds of the TorchServe process tree per "
             f"request / plain's. Load average at start {meta['load_average_at_start']}, end {meta['load_average_at_end']}.\n"]
    for c in meta["concurrency_levels"]:
        lines += [f"\n## {c} concurrent client{'s' if c > 1 else ''}\n",
                  "| case | requests | latency p50 / p90 / max (ms) | req/s | server CPU ms/req | latency ratio | throughput cost ratio | server CPU ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for case, by_c in results.items():
            s = by_c.get(c)
            if not s:
                continue
            l = s["latency_ms"]
            cpu = f"{s['server_cpu_ms_per_request']:.0f}" if "server_cpu_ms_per_request" in s else "–"
            cpu_r = f"{s['server_cpu_ratio']:.2f}×" if "server_cpu_ratio" in s else "–"
            lines.append(f"| {case} | {s['requests']} | {l['p50']:.0f} / {l['p90']:.0f} / {l['max']:.0f} | "
                         f"{s['throughput_rps']:.2f} | {cpu} | {s.get('latency_p50_ratio', 0):.2f}× | "
                         f"{s.get('cost_ratio_throughput', 0):.2f}× | {cpu_r} |")
    if meta.get("top1_agreement") is not None:
        lines.append(f"\nTop-1 agreement of camserve's and the stock archive's predictions on the same photographs: "
                     f"{meta['top1_agreement']}.")
    if meta.get("notes"):
        lines += ["\nNotes:"] + [f"- {n}" for n in meta["notes"]]
    lines.append(f"\nCommand: `{meta['command']}` ({meta['wall_seconds']:.0f} s, server start included).\n")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="attach to this inference address instead of starting a TorchServe")
    p.add_argument("--key-file", help="key_file.json of the server at --url (token auth)")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--stock-model", help=f"attach mode: the served stock image_classifier model, if any "
                   f"(a started server serves {STOCK})")
    p.add_argument("--no-stock", action="store_true", help="skip TorchServe's stock image_classifier cases")
    p.add_argument("--concurrency", type=ints, default=[1, 8], help="client counts for plain and CAM cases")
    p.add_argument("--ig-concurrency", type=ints, default=[1],
                   help="client counts for the IG cases (8 → the stock handler attributes 8×15 rows in one backward)")
    p.add_argument("--requests", type=int, default=8, help="requests per case per round with 1 client")
    p.add_argument("--requests-concurrent", type=int, default=24, help="requests per case per round with >1 clients")
    p.add_argument("--ig-requests", type=int, default=3, help="IG requests per client per round")
    p.add_argument("--ig-steps", type=int, default=15, help="camserve IG steps (the stock path uses 15)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=480, help="seconds: no new round starts after this")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the started server (0 = default)")
    p.add_argument("--photos", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    load_start = [round(x, 1) for x in os.getloadavg()]
    server, workdir = None, None
    try:
        if args.url:
            url = args.url.rstrip("/")
            key = json.loads(Path(args.key_file).read_text())["inference"]["key"] if args.key_file else ""
            pid = None
            stock = bool(args.stock_model) and not args.no_stock
        else:
            workdir = Path(tempfile.mkdtemp(prefix="camserve-bench-ts-"))
            server = start_server(args, workdir)
            url, key, pid, stock = server.url, server.keys["inference"], server.process.pid, not args.no_stock
            args.stock_model = STOCK
            print(f"TorchServe up at {url} after {time.time() - started:.0f} s", flush=True)
        cases = build_cases(args, stock)
        clients = Clients(url, key, load_photos(args.photos), timeout=300)
        for case in cases:  # warm-up: one request per case, and one full batch of plain requests
            clients.one(case)
        clients.round(cases[0], 8, 8, None)
        rounds: Dict[str, Dict[int, List[dict]]] = {c.name: {k: [] for k in c.concurrencies} for c in cases}
        done = 0
        bench_start = time.time()
        while done < args.rounds and (done == 0 or time.time() - started < args.budget):
            for c in sorted({k for case in cases for k in case.concurrencies}):
                for case in cases:
                    if c in case.concurrencies:
                        rounds[case.name][c].append(clients.round(case, c, case.requests[c], pid))
            done += 1
            print(f"round {done} done at {time.time() - started:.0f} s", flush=True)
        results = {name: {c: summarise(r) for c, r in by_c.items() if r} for name, by_c in rounds.items()}
        add_ratios(results)
        agreement = None
        if stock:
            a, b = clients.top1.get(f"/predictions/{args.model}", {}), clients.top1.get(f"/predictions/{args.stock_model}", {})
            common = sorted(set(a) & set(b))
            if common:
                agreement = f"{sum(a[i] == b[i] for i in common)}/{len(common)}"
        import torch
        import ts
        meta = {
            "command": "python benchmarks/bench_server.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(), "torch": torch.__version__, "torchserve": getattr(ts, "__version__", "0.12"),
            "threads": args.threads if not args.url else None, "attached": bool(args.url),
            "concurrency_levels": sorted({k for case in cases for k in case.concurrencies}),
            "requests_per_round": {c.name: c.requests for c in cases}, "rounds_done": done, "photos": args.photos,
            "ig_steps": args.ig_steps, "load_average_at_start": load_start,
            "load_average_at_end": [round(x, 1) for x in os.getloadavg()], "bench_seconds": round(time.time() - bench_start, 1),
            "wall_seconds": round(time.time() - started, 1), "top1_agreement": agreement,
            "notes": notes(args, stock),
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "server_cost.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        (out / "server_cost.md").write_text(markdown(meta, results))
        print(markdown(meta, results))
        return 0
    finally:
        if server is not None:
            print(f"torchserve --stop: exit {server.stop()}", flush=True)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def notes(args, stock: bool) -> List[str]:
    n = ["camserve answers carry the top-5 prediction and, when explained, an 8-bit heatmap PNG at 224×224; "
         "every request is one multipart POST of a JPEG (`data`) plus the options as fields.",
         "The client threads run on the same 2 cores as the server; their cost is the same for every case.",
         "With 1 client a batch never fills, so every request also waits `maxBatchDelay` (100 ms) in the frontend: "
         "that wait is in every 1-client latency (it is what a lone client sees with this config) and shrinks the "
         "1-client latency ratios; the server-CPU ratio does not contain it.",
         f"camserve IG: `explain=captum.integrated_gradients steps={args.ig_steps}` (target: the top-1 class, "
         "answers the prediction as well)."]
    if stock:
        n.append("Stock path: TorchServe's `image_classifier` on the same weights traced to TorchScript; `/explanations` "
                 "= `IntegratedGradients(model).attribute(batch, target=0, n_steps=15)` over the whole batch, answered "
                 "as 3×224×224 JSON lists (no prediction, no image).")
    if 8 not in args.ig_concurrency:
        n.append("IG cases at 1 client only: at 8 clients the stock handler would attribute 8 images × 15 steps = "
                 "120 rows in one forward/backward (several GiB on a machine shared with other jobs); "
                 "`--ig-concurrency 1,8` runs them.")
    return n


if __name__ == "__main__":
    sys.exit(main())
