"""The batch run's static HTML report: ``report.html`` beside ``records.jsonl``, no server needed.

A gallery card per explained image (original thumbnail, overlay, top-k predictions with bars), the
run's settings, and the failed inputs with their reasons. Images are linked by relative paths
(``images/…``), so the folder can be moved or zipped as a whole. A few lines of vanilla JS filter
the cards by predicted class (a select and a free-text search over the top-k names and the file
name) and by a minimum top-1 confidence (a slider). When every image has settled, the page sets
``data-images``, ``data-loaded`` and ``data-broken`` on ``<body>`` (what the Chromium test reads).
"""

from __future__ import annotations

import argparse
import html
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence
from camserve.cli.records import RecordStore
from camserve.serving.answer import Prediction

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f6;color:#222}
header{background:#20232a;color:#eee;padding:12px 20px}
header h1{margin:0 0 6px;font-size:20px}
table.settings{border-collapse:collapse;font-size:12px}
table.settings td{padding:1px 10px 1px 0;vertical-align:top}
table.settings td:first-child{color:#9ab}
#controls{position:sticky;top:0;background:#fff;padding:8px 20px;border-bottom:1px solid #ccc;z-index:2;
 display:flex;gap:18px;align-items:center;flex-wrap:wrap}
#gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px;padding:14px 20px}
.card{background:#fff;border-radius:6px;box-shadow:0 1px 3px #0002;padding:8px}
.card.hidden{display:none}
.pair{display:flex;gap:4px}
.pair figure{margin:0;flex:1;min-width:0}
.pair img{width:100%;height:150px;object-fit:contain;background:#111;display:block}
.pair figcaption{font-size:11px;color:#777;text-align:center}
.file{font-size:11px;color:#555;word-break:break-all;margin:4px 0}
ol.preds{margin:4px 0 0;padding:0;list-style:none;font-size:12px}
ol.preds li{display:flex;gap:6px;align-items:center}
ol.preds .bar{height:8px;background:#3b7dd8;border-radius:2px}
ol.preds .label{flex:1;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
ol.preds li:first-child{font-weight:600}
.scores{font-size:11px;color:#555;margin-top:4px}
section.failed{padding:0 20px 20px}
section.failed td{padding:2px 10px 2px 0;font-size:12px;vertical-align:top}
"""

_HEAD_SCRIPT = """
window.camserveImages={settled:0};
function camserveImg(img){window.camserveImages.settled++;}
"""

_SCRIPT = """
(function(){
  var cards=Array.prototype.slice.call(document.querySelectorAll('.card'));
  var select=document.getElementById('cls'), search=document.getElementById('search');
  var slider=document.getElementById('minconf'), shown=document.getElementById('shown');
  var value=document.getElementById('minconf-value');
  function apply(){
    var cls=select.value, text=search.value.trim().toLowerCase(), min=Number(slider.value)/100, n=0;
    value.textContent=slider.value+'%';
    cards.forEach(function(c){
      var ok=(!cls||c.dataset.cls===cls)&&Number(c.dataset.conf)>=min&&
             (!text||c.dataset.text.indexOf(text)>=0);
      c.classList.toggle('hidden',!ok); if(ok)n++;
    });
    shown.textContent=n+' of '+cards.length+' shown';
    document.body.setAttribute('data-shown',n);
  }
  // presets from the address: report.html#cls=tench&q=shark&minconf=50 (shareable filtered views)
  var preset=new URLSearchParams(location.hash.slice(1));
  if(preset.has('cls'))select.value=preset.get('cls');
  if(preset.has('q'))search.value=preset.get('q');
  if(preset.has('minconf'))slider.value=preset.get('minconf');
  select.addEventListener('change',apply); search.addEventListener('input',apply);
  slider.addEventListener('input',apply); apply();
  window.addEventListener('load',function(){
    var imgs=Array.prototype.slice.call(document.images), loaded=0;
    imgs.forEach(function(i){if(i.complete&&i.naturalWidth>0)loaded++;});
    document.body.setAttribute('data-images',imgs.length);
    document.body.setAttribute('data-loaded',loaded);
    document.body.setAttribute('data-broken',imgs.length-loaded);
  });
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def predictions(record: Mapping[str, Any]) -> List[Prediction]:
    """A record's top-k as :class:`Prediction` (``{index, label, score}``; records of earlier versions,
    ``{class, name, prob}``, read the same)."""
    return [Prediction.from_json(p) for p in record.get("topk") or []]


def _card(record: Mapping[str, Any]) -> str:
    topk = predictions(record) or [Prediction(-1, "?", 0.0)]
    top1 = topk[0]
    name = os.path.basename(record["input"])
    text = " ".join([name] + [p.label for p in topk]).lower()
    preds = "".join(
        f'<li><span class="label" title="{_e(p.label)} (class {p.index})">{_e(p.label)}</span>'
        f'<span class="bar" style="width:{max(1, round(60 * p.score))}px"></span>'
        f'<span>{100 * p.score:.1f}%</span></li>' for p in topk)
    overlay = (record.get("overlays") or [""])[0]
    targets = record.get("target_names") or record.get("targets") or []
    return (
        f'<div class="card" data-cls="{_e(top1.label)}" data-conf="{top1.score:.6f}" data-text="{_e(text)}">'
        f'<div class="pair"><figure><img src="{_e(record["thumbnail"])}" alt="original" onload="camserveImg(this)" '
        f'onerror="camserveImg(this)"><figcaption>original</figcaption></figure>'
        f'<figure><img src="{_e(overlay)}" alt="overlay" onload="camserveImg(this)" onerror="camserveImg(this)">'
        f'<figcaption>{_e(record.get("method"))} @ {_e(record.get("layer"))} → {_e(", ".join(map(str, targets)))}'
        f'</figcaption></figure></div>'
        f'<div class="file" title="{_e(record["input"])}">{_e(name)}</div><ol class="preds">{preds}</ol>'
        f'{_scores(record.get("scores"))}</div>')


def _scores(scores: Any) -> str:
    if not scores:
        return ""
    return (f'<div class="scores">deletion AUC {scores["deletion_auc"]:.3f} · insertion AUC '
            f'{scores["insertion_auc"]:.3f}</div>')


def render_report(records: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """The report's HTML for these records (the latest per key and input) and run settings."""
    latest: Dict[Any, Mapping[str, Any]] = {}
    for r in records:
        latest[(r.get("key"), r.get("input"))] = r
    done = [r for r in latest.values() if r.get("status") == "done"]
    failed = [r for r in latest.values() if r.get("status") == "failed"]
    done.sort(key=lambda r: r["input"])
    classes = Counter(predictions(r)[0].label for r in done if r.get("topk"))
    options = "".join(f'<option value="{_e(c)}">{_e(c)} ({n})</option>' for c, n in sorted(classes.items()))
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in settings.items())
    failed_rows = "".join(f"<tr><td>{_e(r['input'])}</td><td>{_e(r.get('error'))}</td></tr>" for r in failed)
    failed_html = (f'<section class="failed"><h2>Failed ({len(failed)})</h2><table>{failed_rows}</table></section>'
                   if failed else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>camserve batch report</title>
<style>{_STYLE}</style><script>{_HEAD_SCRIPT}</script></head>
<body data-images="" data-loaded="" data-broken="">
<header><h1>camserve batch report — {len(done)} explained, {len(failed)} failed</h1>
<table class="settings">{rows}</table></header>
<div id="controls">
<label>class <select id="cls"><option value="">all classes ({len(classes)})</option>{options}</select></label>
<label>search <input id="search" type="search" placeholder="class or file name"></label>
<label>min. confidence <input id="minconf" type="range" min="0" max="100" step="1" value="0">
<span id="minconf-value">0%</span></label>
<span id="shown"></span>
</div>
<main id="gallery">{"".join(_card(r) for r in done)}</main>
{failed_html}
<script>{_SCRIPT}</script>
</body></html>
"""


def write_report(out: Path, records: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> Path:
    """Write ``out/report.html`` atomically; returns its path."""
    path = Path(out) / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(records, settings), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_records(out: Path) -> List[dict]:

    return RecordStore(Path(out) / "records.jsonl").records


# ``python -m camserve.cli.report DIR`` rebuilds the report of a finished or interrupted run.
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="a camserve batch output folder")


def run(args: argparse.Namespace) -> int:
    settings_file = Path(args.out) / "settings.json"
    settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
    sid = settings.get("settings_id")
    records = [r for r in load_records(args.out) if sid is None or r.get("settings_id") == sid]
    print(write_report(args.out, records, {k: v for k, v in settings.items()}))
    return 0


if __name__ == "__main__":
    import sys

    p = argparse.ArgumentParser(prog="python -m camserve.cli.report")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
