"""``drift.html``: the drift report, one self-contained file (every picture an inline PNG data URI, no
external asset, no script).

Per (method, layer) stream: the verdict and inputs; the drift scores over time (``−log10 q`` of the
overall group and of the classes shown, per window, with the ``α`` line, and the prediction/confidence
p-values beside them); then the overall group and the classes shown (drifted first, then by q; at
most ``classes`` of them): the reference mean map, the latest window's mean map and their difference
(16 × 16 grids, current − reference), the statistics table (reference and current means, KS ``D``
and p) and the records that moved most — the current rows whose grid is farthest (L2) from their
group's reference mean, as their grid and, for batch records whose files exist, the image overlay
the batch wrote. Then one table of every class (tested or ``too few``).

Maps are drawn with matplotlib's colormaps into small PNGs (PIL), the time plot with matplotlib's Agg
backend: the report of 100,000 records builds in seconds (``docs/monitoring.md``).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from camserve.engine.imaging.summary import STATISTICS  # noqa: E402
from camserve.ops.drift import OVERALL, GroupResult, StreamResult  # noqa: E402

MAP_SIDE = 112
THUMB_SIDE = 112
MOVERS = 6
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}h3{font-size:15px;margin:18px 0 6px}
.verdict{display:inline-block;padding:4px 10px;border-radius:4px;font-weight:600}
.drift{background:#fdd;color:#900}.nodrift{background:#dfd;color:#060}.toofew{background:#eee;color:#555}
table{border-collapse:collapse;font-size:12px;margin:6px 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.maps{display:flex;gap:12px;flex-wrap:wrap;align-items:flex-start}.maps figure{margin:0;text-align:center;font-size:11px}
.warn{color:#a60}.small{font-size:12px;color:#555}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def grid_png(grid: np.ndarray, cmap: str = "jet", vmin: float = 0.0, vmax: float = 1.0, side: int = MAP_SIDE) -> bytes:
    """A 16 × 16 map drawn with a matplotlib colormap, scaled to ``side`` pixels (nearest)."""
    scaled = np.clip((np.asarray(grid, dtype=np.float64) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    rgb = (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)
    image = Image.fromarray(rgb).resize((side, side), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def picture_png(path: str, side: int = THUMB_SIDE) -> Optional[bytes]:
    """A batch record's overlay/thumbnail file, scaled down; ``None`` when it cannot be read."""
    if not path or not Path(path).is_file():
        return None
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()
    except OSError:
        return None


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def img(png: bytes, title: str = "", width: Optional[int] = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{data_uri(png)}" alt="{html.escape(title)}" title="{html.escape(title)}"{size}>'


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.{digits}g}"
    return html.escape(str(value))


def _verdict(text: str) -> str:
    css = {"drift": "drift", "no drift": "nodrift"}.get(text, "toofew")
    return f'<span class="verdict {css}">{html.escape(text)}</span>'


def _q_score(q: Optional[float]) -> float:
    return -math.log10(max(q, 1e-6)) if q is not None and math.isfinite(q) else math.nan


def timeline_png(stream: StreamResult, shown: Sequence[str], alpha: float) -> bytes:
    """−log10 q per window of the overall group and the shown classes; prediction/confidence p dashed."""
    labels = [w.label for w, _r in stream.windows]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(8.0, 3.0))
    for name in [OVERALL] + [s for s in shown if s != OVERALL]:
        y = [_q_score(r.group(name).q) if r.group(name) is not None else math.nan for _w, r in stream.windows]
        ax.plot(x, y, marker="o", lw=2.2 if name == OVERALL else 1.0, label="overall" if name == OVERALL else f"class {name}")
    for key, style, title in (("prediction", ":", "prediction drift (p)"), ("confidence", "--", "confidence drift (p)")):
        y = [_q_score(getattr(r, key).get("p")) for _w, r in stream.windows]
        ax.plot(x, y, ls=style, color="gray", marker="x", ms=4, label=title)
    ax.axhline(-math.log10(alpha), color="red", lw=0.8)
    top = max([-math.log10(alpha)] + [v for line in ax.get_lines() for v in line.get_ydata() if math.isfinite(v)])
    ax.set_ylim(0, top * 1.15 + 0.3)
    ax.set_xlim(-0.5, max(len(labels) - 0.5, 0.5))
    ax.text(x[-1] if len(x) else 0, -math.log10(alpha), f" α = {alpha}", color="red", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels if len(labels) <= 12 else [lab if i % max(1, len(labels) // 12) == 0 else ""
                                                          for i, lab in enumerate(labels)], fontsize=7, rotation=30)
    ax.set_ylabel("−log10 q (higher = more drift)", fontsize=8)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.32), frameon=False)
    fig.tight_layout()
    return figure_png(fig)


def _group_rows(rows, group: str) -> np.ndarray:
    return np.arange(len(rows)) if group == OVERALL else np.nonzero(rows.predicted == int(group))[0]


def group_section(stream: StreamResult, group: GroupResult, label: str) -> str:
    """Mean maps (reference, latest window, difference), the statistics table and the movers."""
    window, _result = stream.windows[-1]
    ref_index, cur_index = _group_rows(stream.reference, group.name), _group_rows(window.rows, group.name)
    parts = [f"<h3>{html.escape(label)} — {_verdict(group.status)} <span class='small'>n = {group.n_reference} "
             f"reference, {group.n_current} current · p(MMD) = {_fmt(group.p_mmd)} · p(statistics) = "
             f"{_fmt(group.p_statistics)} · q = {_fmt(group.q)}</span></h3>"]
    if not ref_index.size or not cur_index.size:
        return "".join(parts) + "<p class='small'>no rows on one side</p>"
    ref_mean = stream.reference.grids[ref_index].mean(0)
    cur_mean = window.rows.grids[cur_index].mean(0)
    diff = cur_mean - ref_mean
    bound = max(float(np.abs(diff).max()), 1e-3)
    parts.append("<div class='maps'>")
    for png, title in ((grid_png(ref_mean), "reference mean"), (grid_png(cur_mean), f"{window.label} mean"),
                       (grid_png(diff, "RdBu_r", -bound, bound), f"difference (±{bound:.2f})")):
        parts.append(f"<figure>{img(png, title)}<figcaption>{html.escape(title)}</figcaption></figure>")
    parts.append("</div>")
    if group.statistics:
        parts.append("<table><tr><th class='l'>statistic</th><th>reference mean</th><th>current mean</th>"
                     "<th>KS D</th><th>p</th></tr>")
        for name in STATISTICS:
            ks = group.statistics.get(name, {})
            parts.append(f"<tr><td class='l'>{name}</td><td>{_fmt(group.reference_mean.get(name))}</td>"
                         f"<td>{_fmt(group.current_mean.get(name))}</td><td>{_fmt(ks.get('D'))}</td>"
                         f"<td>{_fmt(ks.get('p'))}</td></tr>")
        parts.append("</table>")
    distance = np.sqrt(((window.rows.grids[cur_index] - ref_mean) ** 2).sum(axis=(1, 2)))
    movers, seen = [], set()
    for row in cur_index[np.argsort(-distance)]:  # farthest first; a repeated image (same grid) once
        key = window.rows.grids[row].tobytes()
        if key not in seen:
            seen.add(key)
            movers.append(row)
        if len(movers) == MOVERS:
            break
    parts.append("<div class='small'>moved most (farthest from the reference mean):</div><div class='maps'>")
    for row in movers:
        title = (f"{window.rows.label[row]} ({window.rows.confidence[row]:.2f}) · distance "
                 f"{distance[np.nonzero(cur_index == row)[0][0]]:.2f}")
        pictures = [img(grid_png(window.rows.grids[row], side=THUMB_SIDE), "grid")]
        photo = picture_png(str(window.rows.picture[row]))
        if photo is not None:
            pictures.insert(0, img(photo, "image"))
        parts.append(f"<figure>{''.join(pictures)}<figcaption>{html.escape(title)}</figcaption></figure>")
    parts.append("</div>")
    return "".join(parts)


def class_table(result) -> str:
    """Every class of a window: the tested ones in a table (drifted first, then by q), the classes
    with too few rows in a folded table below it."""
    classes = [g for g in result.groups if g.name != OVERALL]
    tested = sorted((g for g in classes if g.status != "too few"),
                    key=lambda g: (g.status != "drift", g.q if math.isfinite(g.q) else 2.0))
    few = sorted((g for g in classes if g.status == "too few"), key=lambda g: (-g.n_current, -g.n_reference))
    head = ("<table><tr><th class='l'>class</th><th class='l'>label</th><th>n ref</th><th>n cur</th><th>MMD²</th>"
            "<th>p MMD</th><th>p stats</th><th>q (BH)</th><th>confidence p</th><th class='l'>verdict</th></tr>")

    def rows(groups) -> str:
        return "".join(f"<tr><td class='l'>{html.escape(g.name)}</td><td class='l'>{html.escape(g.label)}</td>"
                       f"<td>{g.n_reference}</td><td>{g.n_current}</td><td>{_fmt(g.mmd2)}</td><td>{_fmt(g.p_mmd)}</td>"
                       f"<td>{_fmt(g.p_statistics)}</td><td>{_fmt(g.q)}</td><td>{_fmt(g.confidence.get('p'))}</td>"
                       f"<td class='l'>{html.escape(g.status)}</td></tr>" for g in groups)
    out = [head + rows(tested) + "</table>" if tested else "<p class='small'>no class has enough rows to be tested</p>"]
    if few:
        out.append(f"<details><summary>{len(few)} classes with too few rows (not tested)</summary>"
                   f"{head}{rows(few)}</table></details>")
    return "".join(out)


def stream_section(stream: StreamResult, body: Dict[str, Any], classes: int) -> str:
    settings = body["settings"]
    _window, latest = stream.windows[-1]
    tested = [g for g in latest.groups if g.name != OVERALL and g.status != "too few"]
    shown = sorted(tested, key=lambda g: (g.status != "drift", g.q))[:max(classes, 0)]
    parts = [f"<h2>{html.escape(stream.method)} at {html.escape(stream.layer)} — {_verdict(stream.verdict)}</h2>",
             f"<p class='small'>reference: {len(stream.reference)} rows; windows: "
             + ", ".join(f"{html.escape(w.label)} ({len(w.rows)} rows, {html.escape(r.verdict)})" for w, r in stream.windows)
             + f"; classes need ≥ {settings['min_samples']} rows on each side to be tested.</p>",
             "<h3>Drift scores over time</h3>",
             img(timeline_png(stream, [g.name for g in shown], settings["alpha"]), "drift scores over time"),
             f"<p class='small'>latest window: prediction drift (class histogram χ², permutation) p = "
             f"{_fmt(latest.prediction.get('p'))} over {latest.prediction.get('classes')} classes; confidence drift "
             f"(KS on the top-1 score) p = {_fmt(latest.confidence.get('p'))}, mean "
             f"{_fmt(latest.confidence.get('reference_mean'))} → {_fmt(latest.confidence.get('current_mean'))}.</p>"]
    overall = latest.group(OVERALL)
    if overall is not None:
        parts.append(group_section(stream, overall, "Overall (all classes)"))
    for g in shown:
        parts.append(group_section(stream, g, f"Class {g.name}: {g.label}"))
    parts.append(f"<h3>Every class (latest window; {len(tested)} tested, "
                 f"{sum(g.status == 'too few' for g in latest.groups if g.name != OVERALL)} too few)</h3>")
    parts.append(class_table(latest))
    return "".join(parts)


def write_report(path: Path, body: Dict[str, Any], streams: List[StreamResult], classes: int = 12) -> Path:
    """Write the report of one ``camserve drift`` run (its JSON ``body`` and stream results)."""
    inputs = "".join(f"<li>{html.escape(i['role'])}: {html.escape(i['source'])} — {i['records']} records, "
                     f"{i['rows']} maps compared; skipped: "
                     + html.escape(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in i["skipped"].items() if v) or "none")
                     + f"; model versions {html.escape(str(i['model_versions']))}</li>" for i in body["inputs"])
    warnings = "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in body.get("warnings", []))
    settings = body["settings"]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>camserve drift · {html.escape(body['model'])}"
            f"</title><style>{CSS}</style></head><body>",
            f"<h1>Explanation drift · {html.escape(body['model'])} — {_verdict(body['verdict'])}</h1>",
            f"<ul>{inputs}{warnings}</ul>",
            f"<p class='small'>Per group (overall and each predicted class): MMD (Gaussian kernel, median-heuristic "
            f"bandwidth, {settings['permutations']} permutations) on the 16 × 16 maps and KS tests on the 8 map "
            f"statistics, joined by Bonferroni; Benjamini–Hochberg over the groups at α = {settings['alpha']}. "
            f"Verdict rule: {html.escape(settings['verdict_rule'])} window. Exit code {body['exit_code']}.</p>"]
    for stream in streams:
        page.append(stream_section(stream, body, classes))
    page.append("</body></html>")
    path = Path(path)
    path.write_text("".join(page), encoding="utf-8")
    return path
