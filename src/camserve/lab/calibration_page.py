"""The model card's HTML page: one self-contained file (figures inline as ``data:image/png`` URIs).

Sections: the per-stage table (chosen reading, report-half ``overall`` ± SEM, paired
``Δ = overall − overall^LayerCAM`` ± SEM with wins of n, rho12 against LayerCAM's, the checks), the
choose-half table of every candidate, the mean report-half curves of the chosen reading and
LayerCAM per stage (deletion to zeros, deletion to the blur, insertion from the blur; x = fraction
of pixels moved, y = softmax probability of the predicted class), and example maps (the first
report-half images, the chosen reading's top-1 map at every stage over the crop).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Dict, List

import torch

from camserve.engine.imaging.render import prepare_maps

KIND_TITLES = {"deletion_zero": "deletion to zeros", "deletion_blur": "deletion to blur", "insertion_blur": "insertion"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_uri(figure) -> str:
    """A matplotlib figure as a ``data:image/png;base64,…`` URI (the figure is closed)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def curves_figure(stages: List[dict]) -> str:
    """Rows = stages with a chosen reading, columns = the three curve kinds."""
    plt = _pyplot()
    shown = [s for s in stages if s["curves"]]
    if not shown:
        return ""
    fig, axes = plt.subplots(len(shown), 3, figsize=(10, 2.6 * len(shown)), squeeze=False)
    for row, stage in zip(axes, shown):
        for ax, kind in zip(row, KIND_TITLES):
            for name, curves in stage["curves"].items():
                y = curves[kind]
                ax.plot([i / (len(y) - 1) for i in range(len(y))], y, label=name)
            ax.set_title(f"{stage['stage']} ({stage['layer']}): {KIND_TITLES[kind]}", fontsize=9)
            ax.set_ylim(0, 1)
            ax.set_xlabel("fraction of pixels", fontsize=8)
        row[0].set_ylabel("p(predicted class)", fontsize=8)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    return png_uri(fig)


def examples_figure(crops: torch.Tensor, maps: Dict[str, torch.Tensor], stages: List[dict]) -> str:
    """Rows = example images, columns = the image and the chosen map at each stage (over the image)."""
    plt = _pyplot()
    shown = [s for s in stages if s["layer"] in maps]
    if not shown or len(crops) == 0:
        return ""
    n = min(len(crops), *(len(maps[s["layer"]]) for s in shown))
    size = tuple(crops.shape[-2:])
    fig, axes = plt.subplots(n, len(shown) + 1, figsize=(2 * (len(shown) + 1), 2 * n), squeeze=False)
    for i in range(n):
        image = crops[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        axes[i][0].imshow(image)
        axes[i][0].set_title("image" if i == 0 else "", fontsize=8)
        for ax, stage in zip(axes[i][1:], shown):
            heat = prepare_maps(maps[stage["layer"]][i:i + 1], size)[0].cpu().numpy()
            ax.imshow(image)
            ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(f"{stage['stage']}: {stage['chosen']['name']}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    return png_uri(fig)


def _f(value, digits: int = 3, sign: bool = False) -> str:
    return "–" if value is None else (f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}")


def stage_table(stages: List[dict]) -> str:
    head = ("<tr><th>stage</th><th>layer</th><th>chosen</th><th>options</th><th>overall ± SEM</th>"
            "<th>Δ vs LayerCAM ± SEM (wins/n)</th><th>Δ0 / ΔB</th><th>rho12 (LayerCAM)</th>"
            "<th>rho_rand all</th><th>checks</th></tr>")
    rows = []
    for s in stages:
        r = s["report"]
        if r is None:
            rows.append(f"<tr><td>{s['stage']}</td><td>{html.escape(s['layer'])}</td>"
                        f"<td colspan='8'>no candidate: {html.escape(s.get('reason', ''))}</td></tr>")
            continue
        rows.append(
            f"<tr><td>{s['stage']}</td><td>{html.escape(s['layer'])}</td><td>{html.escape(s['chosen']['name'])}</td>"
            f"<td><code>{html.escape(str(s['chosen']['options'] or {}))}</code></td>"
            f"<td>{_f(r['overall'])} ± {_f(r['overall_sem'])}</td>"
            f"<td>{_f(r['vs_layercam'], sign=True)} ± {_f(r['sem'])} ({r['wins']}/{r['n']})</td>"
            f"<td>{_f(r['vs_layercam_overall0'], sign=True)} / {_f(r['vs_layercam_overallB'], sign=True)}</td>"
            f"<td>{_f(r['rho12'], 2)} ({_f(r['layercam_rho12'], 2)})</td><td>{_f(r.get('rho_rand_all'), 2)}</td>"
            f"<td>{r['checks']}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def eliminated_note(row: dict) -> str:
    """For a candidate stopped early on the choose half: when and why."""
    gone = row.get("eliminated")
    return f" (eliminated: {html.escape(gone['reason'])})" if gone else ""


def choose_table(stages: List[dict]) -> str:
    head = ("<tr><th>stage</th><th>candidate</th><th>overall</th><th>Δ vs LayerCAM ± SEM</th><th>rho12</th>"
            "<th>cds</th><th>oma</th><th>rho_rand all</th><th>checks</th><th>passed</th><th>n</th></tr>")
    rows = []
    for s in stages:
        for name, r in s["choose"].items():
            mark = " <b>(chosen)</b>" if s["chosen"] and s["chosen"]["name"] == name else ""
            rows.append(f"<tr><td>{s['stage']}</td><td>{html.escape(name)}{mark}</td><td>{_f(r['overall'])}</td>"
                        f"<td>{_f(r['vs_layercam'], sign=True)} ± {_f(r['sem'])}</td><td>{_f(r['rho12'], 2)}</td>"
                        f"<td>{_f(r['cds'], sign=True)}</td><td>{_f(r['oma'], sign=True)}</td>"
                        f"<td>{_f(r.get('rho_rand_all'), 2)}</td><td>{r['checks']}</td>"
                        f"<td>{'yes' if r['passed'] else 'no'}</td><td>{r['n']}{eliminated_note(r)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def page(card: dict, crops: torch.Tensor, maps: Dict[str, torch.Tensor]) -> str:
    """The whole HTML page of a model card."""
    stages = card["stages"]
    served = card.get("served") or {}
    curves, examples = curves_figure(stages), examples_figure(crops, maps, stages)
    protocol = card["protocol"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>camserve calibration: {html.escape(card['model'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:nth-child(-n+4){{text-align:left}}</style></head>
<body><h1>Calibration: {html.escape(card['model'])}</h1>
<p>Images: {html.escape(card['data'])} — {card['n']['choose']} on the choose half, {card['n']['report']} on the
report half (labels: {html.escape(card['labels'])}). {protocol['steps']} steps, ties broken with seed
{protocol['seed']}; overall = (overall0 + overallB) / 2, overallX = AUC(insertion) − AUC(deletion to X);
Δ = paired difference vs LayerCAM on the same images ± SEM. Checks required: {protocol['checks']}
(C: rho12 ≤ LayerCAM's; D: cds &gt; 0 and oma &gt; 0; R: rho_rand_all &lt; {protocol['max_rho_rand']}).
Wall time {card['wall_seconds']} s on {html.escape(card['machine'])}.</p>
<p>Served defaults: <code>default_method={html.escape(str(served.get('default_method')))}</code>,
<code>method_layers={html.escape(str(served.get('method_layers')))}</code>,
<code>method_options={html.escape(str(served.get('method_options')))}</code>.</p>
<h2>Chosen per stage (report half)</h2>{stage_table(stages)}
<h2>Deletion and insertion curves (report half)</h2>{f'<img src="{curves}" alt="curves">' if curves else '<p>none</p>'}
<h2>Example maps (report half, chosen reading)</h2>{f'<img src="{examples}" alt="examples">' if examples else '<p>none</p>'}
<h2>Every candidate (choose half)</h2>{choose_table(stages)}
</body></html>
"""
