"""The audit log on a real TorchServe: exactly one record per explained request under concurrent
load (none for plain predictions or rejected requests); and ``camserve batch --server`` against it.

The session server (tests/serverkit.py) runs with ``CAMSERVE_AUDIT_LOG`` set, so every handler
audits; this test counts the records of its own requests, recognised by their distinct inputs.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from camserve.cli.main import main

from conftest import SAMPLES

pytestmark = pytest.mark.server
N = 16


def distinct_jpegs(path, n):
    """``n`` different encodings (JPEG quality 60…) of one photograph: distinct bytes and hashes."""
    image = Image.open(path).convert("RGB")
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=60 + i)
        out.append(buffer.getvalue())
    assert len({hashlib.sha256(b).hexdigest() for b in out}) == n
    return out


def audit_records(server):
    records = []
    for path in sorted(server.audit_dir.glob("audit-*.jsonl*")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


def test_one_audit_record_per_explained_request(torchserve_server, samples):
    server = torchserve_server
    url = f"{server.url}/predictions/effnet_lite0"
    headers = server.headers()
    images = distinct_jpegs(SAMPLES / samples[3]["file"], N + 2)
    explained, plain = images[:N], images[N:]

    def post(args):
        data, options = args
        fields = {"data": data, **options}  # multipart: the image and its options per request
        return requests.post(url, files=fields, headers=headers, timeout=300)

    jobs = [(data, {"explain": "gradcam", "layer": "_conv_head"}) for data in explained]
    jobs += [(data, {}) for data in plain]                                       # not explained
    jobs += [(explained[0], {"explain": "gradcam", "layer": "no_such_layer"})]   # rejected: 400
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        responses = list(pool.map(post, jobs))
    for r in responses[:N + 2]:
        assert r.status_code == 200, r.text[:500]
    assert responses[-1].status_code == 400, responses[-1].text[:800]
    answers = {hashlib.sha256(data).hexdigest(): r.json() for (data, _), r in zip(jobs[:N], responses[:N])}
    assert all("explanation" in a for a in answers.values())
    assert all("explanation" not in r.json() for r in responses[N:N + 2])

    # no waiting: a batch's answers leave the worker only after its records are in the file
    mine = [r for r in audit_records(server) if r["input_sha256"] in answers]
    assert len(mine) == N, f"{len(mine)} audit records for {N} explained requests"
    assert {r["input_sha256"] for r in mine} == set(answers)
    assert len({r["request_id"] for r in mine}) == N
    plain_hashes = {hashlib.sha256(d).hexdigest() for d in plain}
    assert not [r for r in audit_records(server) if r["input_sha256"] in plain_hashes]
    batched = 0
    for record in mine:
        answer = answers[record["input_sha256"]]
        explanation = answer["explanation"]
        assert record["model"] == "effnet_lite0" and record["model_version"] == "1.0"
        assert record["topk"] == answer["predictions"]
        assert record["options"]["method"] == "gradcam" and record["options"]["layer"] == "_conv_head"
        assert record["explanation_seconds"] == explanation["seconds"]
        png = base64.b64decode(explanation["heatmap"])
        assert record["heatmap_sha256"] == [hashlib.sha256(png).hexdigest()]
        assert record["heatmap_stored"] is False and "heatmaps_base64" not in record
        assert record["kind"] == "explanation" and len(record["settings_id"]) == 12
        (summary,) = record["summaries"]  # where the model looked, in a few hundred bytes (drift monitoring)
        assert (summary["method"], summary["layer"], summary["target"]) == ("gradcam", "_conv_head",
                                                                            explanation["target"])
        assert 0 <= summary["centroid"][0] <= 1 and 0 < summary["entropy"] <= 1 and len(summary["grid"]) == 344
        batched += record["batch_size"] > 1
    assert batched > 0  # the concurrent requests were served in shared batches


def sha(b64_text):
    return hashlib.sha256(base64.b64decode(b64_text)).hexdigest()


def test_compare_and_embedding_answers_are_audited(torchserve_server, samples):
    server = torchserve_server
    query, reference = distinct_jpegs(SAMPLES / samples[4]["file"], 2)
    compared = requests.post(f"{server.url}/predictions/effnet_lite0", headers=server.headers(), timeout=300,
                             files={"data": query, "compare": "gradcam,layercam", "layer": "_conv_head"})
    assert compared.status_code == 200, compared.text[:500]
    embedded = requests.post(f"{server.url}/predictions/effnet_lite0_embed", headers=server.headers(), timeout=300,
                             files={"image": query, "reference": reference})
    assert embedded.status_code == 200, embedded.text[:500]
    plain = requests.post(f"{server.url}/predictions/effnet_lite0_embed", headers=server.headers(), timeout=300,
                          files={"image": reference})
    assert plain.status_code == 200 and "query_map" not in plain.json()
    records = [r for r in audit_records(server) if r["input_sha256"] == hashlib.sha256(query).hexdigest()]
    by_kind = {r["kind"]: r for r in records}
    assert sorted(by_kind) == ["compare", "embedding"] and len(records) == 2, records
    answer = compared.json()
    record = by_kind["compare"]
    assert record["model"] == "effnet_lite0" and record["options"]["compare"] == ["gradcam", "layercam"]
    assert record["topk"] == answer["predictions"] and record["comparison"]["spearman"] == answer["comparison"]["spearman"]
    assert record["heatmap_sha256"] == [sha(e["heatmap"]) for e in answer["explanations"]]
    assert record["explanation_seconds"] == pytest.approx(sum(e["seconds"] for e in answer["explanations"]), abs=1e-3)
    assert [(m["method"], m["target"]) for m in record["summaries"]] == [("gradcam", answer["comparison"]["target"]),
                                                                         ("layercam", answer["comparison"]["target"])]
    answer = embedded.json()
    record = by_kind["embedding"]
    assert record["model"] == "effnet_lite0_embed" and record["similarity"] == answer["similarity"]
    assert record["options"]["method"] == answer["method"] and record["options"]["reference"] == "image"
    assert record["heatmap_sha256"] == [sha(answer["query_map"]), sha(answer["reference_map"])]
    assert record["reference_sha256"] == hashlib.sha256(reference).hexdigest()
    assert record["explanation_seconds"] == answer["seconds"] and record["topk"] is None
    assert [m["target"] for m in record["summaries"]] == ["query", "reference"]
    # a plain embedding is not audited (like a plain prediction)
    assert not [r for r in audit_records(server) if r["input_sha256"] == hashlib.sha256(reference).hexdigest()]
    # the audit log's health is on the metrics port: nothing dropped, nothing pending after the answers
    text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    for name in ("AuditDropped", "AuditPending", "AuditWriteErrors"):
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name + "{") and 'ModelName="effnet_lite0_embed"' in line]
        assert values == [0.0], (name, values)


def test_batch_command_against_the_server(torchserve_server, samples, tmp_path, capsys):
    server = torchserve_server
    folder = tmp_path / "in"
    folder.mkdir()
    for row in samples[:3]:
        shutil.copy(SAMPLES / row["file"], folder / row["file"])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    key_file = server.workdir / "key_file.json"
    out = tmp_path / "out"
    args = ["batch", str(folder), "--out", str(out), "--server", server.url, "--management", server.management_url,
            "--token-file", str(key_file),
            "--model", "effnet_lite0", "--method", "gradcam", "--layer", "_conv_head", "--quiet"]
    assert main(args) == 0
    assert "done 3, skipped 0" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    done = [r for r in records if r["status"] == "done"]
    assert len(done) == 3 and len(records) == 4
    for r in done:
        assert r["backend"].startswith("server:") and r["model"]["version"] == "1.0"
        assert r["targets"] == [r["topk"][0]["index"]] and 0 < r["topk"][0]["score"] <= 1
        assert (out / r["overlays"][0]).stat().st_size > 0 and len(r["crop_box"]) == 4
    assert main(args) == 0  # resumable the same way as the local engine
    assert "done 0, skipped 4" in capsys.readouterr().out
