"""Cost of the audit log on the request thread: ``AuditLog.record`` vs. an explained request.

Prints the per-call time of ``record`` (what the handler's ``after_batch`` pays per explained image:
building a dict of references and a queue put) with a real photo and a real heatmap PNG (base64),
with and without rotation, and how long the writer thread needs to drain the records (hashing,
base64 decoding, JSON, append). Run: ``python benchmarks/audit_overhead.py``.
"""

from __future__ import annotations

import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SAMPLES, load_uint8  # noqa: E402

from camserve.engine.imaging.render import encode_png  # noqa: E402
from camserve.ops.audit import AuditLog, Base64  # noqa: E402

CALLS = 5000


def main() -> None:
    photo_path = sorted(SAMPLES.glob("*.JPEG"))[0]
    photo = photo_path.read_bytes()
    heat = load_uint8(photo_path)[0, :224, :224]
    heatmap_b64 = base64.b64encode(encode_png(heat)).decode()
    topk = [{"index": i, "label": f"class {i}", "score": 0.1} for i in range(5)]
    for store, max_bytes in ((False, 10 * 1024 * 1024), (True, 1024 * 1024)):
        with tempfile.TemporaryDirectory() as tmp:
            log = AuditLog(f"{tmp}/audit.jsonl", store_heatmap=store, max_bytes=max_bytes, backups=1000)
            times = []
            start = time.perf_counter()
            for i in range(CALLS):
                t = time.perf_counter()
                log.record(model="effnet_lite0", model_version="1.0", request_id=str(i), input_bytes=photo,
                           options={"method": "gradcam", "layer": "_conv_head"}, topk=topk,
                           explanation_seconds=0.1, heatmaps=[Base64(heatmap_b64)])
                times.append(time.perf_counter() - t)
            queued = time.perf_counter() - start
            log.close()
            drained = time.perf_counter() - start
            times.sort()
            print(f"store_heatmap={store!s:5} rotations={log.rotations:4d}: record() mean "
                  f"{statistics.mean(times) * 1e6:6.1f} µs, p99 {times[int(0.99 * CALLS)] * 1e6:6.1f} µs "
                  f"on the caller; {CALLS} records queued in {queued:.2f} s, all written in {drained:.2f} s "
                  f"({CALLS / drained:.0f} records/s, photo {len(photo) // 1024} KB, heatmap "
                  f"{len(heatmap_b64) // 1024} KB base64)")


if __name__ == "__main__":
    main()
