"""How an answer looks to a person: panels, one picture, an HTML card — for notebooks and ``show()``.

:class:`Displayable` is the mixin the image answers (:class:`~camserve.serving.answer.ClassifierAnswer`,
:class:`~camserve.serving.answer.EmbeddingAnswer`) carry:

- ``answer.panels()`` — one :class:`Panel` per map: a classifier explanation's target maps (each
  method's for a comparison), an embedding model's FAM query/reference maps and each gallery match's;
- ``answer.figure()`` — the panels side by side in one PIL image, titled;
- ``_repr_png_()`` / ``_repr_html_()`` — Jupyter's rich display: the figure, or an HTML card with the
  top-k, the comparison's rank correlations and the panels;
- ``answer.show()`` — displays the card in a notebook, else opens the figure in the image viewer.

A map is shown blended over the image the model saw when there is one: the server's overlay
(``overlay=1``), else the image the client sent (``camserve.client`` attaches it with
:meth:`Displayable.with_images`), cropped to the answer's ``crop_box`` — the same colour map and
blend as the server's overlays (:mod:`camserve.engine.imaging.render`). Without either, the colour map
alone. Nothing here is sent over the wire, and nothing changes the answer.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from camserve.engine.imaging.render import colorize, overlay, upsample

PANEL_SIDE = 224  # display size of a panel's longer side
TITLE_HEIGHT = 30
ALPHA = 0.5


@dataclass
class Panel:
    """One picture of an answer: ``image`` (RGB), ``title`` (what it shows: method @ layer, class, …)."""

    image: Image.Image
    title: str


def decode_png(text: str) -> Image.Image:
    """A base64 PNG as a PIL image (loaded)."""
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _as_map(value: Any) -> torch.Tensor:
    """A map as a ``(1, h, w)`` float tensor in [0, 1]: a grayscale base64 PNG, or a layer-resolution array."""
    if isinstance(value, str):
        array = np.asarray(decode_png(value).convert("L"), dtype=np.float32) / 255.0
    else:
        array = np.asarray(value, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))[None]


def _crop(image: Optional[Image.Image], crop_box: Sequence[float], size: Sequence[int]) -> Optional[Image.Image]:
    """The part of the sent ``image`` the model saw (``crop_box`` in its pixels), at ``size`` (w, h)."""
    if image is None or len(crop_box) != 4:
        return None
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    if x1 <= x0 or y1 <= y0:
        return None
    return image.convert("RGB").resize((int(size[0]), int(size[1])), Image.BILINEAR, box=(x0, y0, x1, y1))


def blend(map_value: Any, seen: Optional[Image.Image], colormap: str = "jet") -> Image.Image:
    """A map (PNG or array) as an RGB picture: coloured and blended over ``seen`` (the model's view of the
    image) when given, else coloured alone; shown at ``seen``'s size, or at least :data:`PANEL_SIDE`."""
    maps = _as_map(map_value)
    h, w = maps.shape[-2:]
    if seen is not None:
        size = (seen.height, seen.width)
    else:
        scale = max(1, PANEL_SIDE // max(h, w))
        size = (h * scale, w * scale)
    maps = upsample(maps, size).clamp(0, 1)
    if seen is None:
        rgb = colorize(maps, colormap)[0]
    else:
        picture = torch.from_numpy(np.asarray(seen, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        rgb = overlay(maps, picture, colormap, ALPHA)[0]
    return Image.fromarray((rgb.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def _explanation_panels(explanation: Any, image: Optional[Image.Image], title: str) -> List[Panel]:
    maps = explanation.maps
    overlays = maps.overlays or []
    values = list(maps.heatmaps or maps.arrays or [])
    size = maps.size if maps.heatmaps else [PANEL_SIDE, PANEL_SIDE]
    seen = _crop(image, explanation.crop_box, size)
    panels = []
    for n, value in enumerate(values):
        label = explanation.labels[n] if n < len(explanation.labels) else str(explanation.targets[n])
        picture = decode_png(overlays[n]).convert("RGB") if n < len(overlays) else \
            blend(value, seen, explanation.colormap or "jet")
        panels.append(Panel(picture, f"{title} · {label}"))
    return panels


def classifier_panels(answer: Any, image: Optional[Image.Image]) -> List[Panel]:
    """A classifier answer's maps: the explanation's targets, or each compared method's map."""
    explanations = [answer.explanation] if answer.explanation is not None else list(answer.explanations or [])
    panels: List[Panel] = []
    for e in explanations:
        panels += _explanation_panels(e, image, f"{e.method} @ {e.layer}")
    return panels


def embedding_panels(answer: Any, image: Optional[Image.Image], reference: Optional[Image.Image]) -> List[Panel]:
    """An embedding answer's FAM maps: the query's (over the sent image), the reference's (over the sent
    reference image), then each gallery match's query map (a few-shot shot's own map)."""
    fam = answer.fam
    if fam is None:
        return []
    size = (fam.size if getattr(fam, "format", "png") != "array" else None) or [PANEL_SIDE, PANEL_SIDE]
    seen = _crop(image, answer.crop_box, size)
    panels = []
    if fam.query_map:
        panels.append(Panel(blend(fam.query_map, seen), f"query · {fam.method} {fam.metric} {fam.similarity:.3f}"))
    if fam.reference_map:
        ref_seen = _crop(reference, _like_crop(reference, answer.crop_box, image), size) if reference is not None \
            else None
        panels.append(Panel(blend(fam.reference_map, ref_seen), f"reference ({fam.reference})"))
    for match in fam.matches or ():
        if match.query_map:
            panels.append(Panel(blend(match.query_map, seen), f"match {match.label} · {match.similarity:.3f}"))
        elif match.reference_map:   # a few-shot support image's map (its image is not in the answer)
            panels.append(Panel(blend(match.reference_map, None), f"shot {match.index} {match.label} · "
                                                                  f"{match.similarity:.3f}"))
    return panels


def _like_crop(reference: Image.Image, crop_box: Sequence[float], image: Optional[Image.Image]) -> List[float]:
    """The reference's crop box (not in the answer): the query's crop, as a fraction of the query image's
    shorter side (the model's resize + centre crop), centred on the reference; the centre square when
    the query image is not at hand."""
    side = min(reference.size)
    if image is not None and len(crop_box) == 4 and min(image.size) > 0:
        side *= min(1.0, (float(crop_box[2]) - float(crop_box[0])) / min(image.size))
    x0, y0 = (reference.width - side) / 2, (reference.height - side) / 2
    return [x0, y0, x0 + side, y0 + side]


def figure(panels: Sequence[Panel]) -> Optional[Image.Image]:
    """The panels side by side (each at most :data:`PANEL_SIDE` high), titles above; ``None`` without panels."""
    if not panels:
        return None
    pictures = []
    for panel in panels:
        picture = panel.image.convert("RGB")
        if picture.height != PANEL_SIDE:
            picture = picture.resize((max(1, round(picture.width * PANEL_SIDE / picture.height)), PANEL_SIDE))
        pictures.append(picture)
    gap = 6
    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    canvas = Image.new("RGB", (width, PANEL_SIDE + TITLE_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for panel, picture in zip(panels, pictures):
        canvas.paste(picture, (x, TITLE_HEIGHT))
        draw.text((x + 2, 8), _fit_text(draw, panel.title, picture.width - 4), fill="black")
        x += picture.width + gap
    return canvas


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    while text and draw.textlength(text) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def _data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def card_html(answer: Any, panels: Sequence[Panel]) -> str:
    """An answer as an HTML card: the top-k table (classifier), the embedding's size and FAM similarity
    (embedding model), the comparison's Spearman ρ table, and the panels with their titles."""
    e = html.escape
    parts = ['<div class="camserve-answer" style="font-family:sans-serif;font-size:13px">']
    predictions = getattr(answer, "predictions", None)
    if predictions:
        rows = "".join(f"<tr><td>{p.index}</td><td>{e(str(p.label))}</td><td>{p.score:.4f}</td></tr>"
                       for p in predictions)
        parts.append(f"<table><tr><th>class</th><th>label</th><th>score</th></tr>{rows}</table>")
    if hasattr(answer, "dim"):
        parts.append(f"<p>embedding: {answer.dim} dimensions</p>")
    comparison = getattr(answer, "comparison", None)
    if comparison is not None:
        head = "".join(f"<th>{e(m)}</th>" for m in comparison.methods)
        body = "".join("<tr><th>" + e(m) + "</th>" + "".join(
            f"<td>{'—' if v is None else f'{v:.3f}'}</td>" for v in row) + "</tr>"
            for m, row in zip(comparison.methods, comparison.spearman))
        parts.append(f"<p>Spearman ρ between the maps (class {comparison.target}):</p>"
                     f"<table><tr><th></th>{head}</tr>{body}</table>")
    if panels:
        parts.append('<div style="display:flex;flex-wrap:wrap;gap:8px">')
        for panel in panels:
            parts.append(f'<figure style="margin:0"><img src="{_data_uri(panel.image)}" alt="{e(panel.title)}" '
                         f'width="{PANEL_SIDE}"><figcaption>{e(panel.title)}</figcaption></figure>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def as_picture(source: Any) -> Optional[Image.Image]:
    """A sent image as an upright RGB picture (EXIF orientation applied, as the server does): encoded
    bytes or a PIL image; ``None`` stays ``None``."""
    if source is None:
        return None
    image = source if isinstance(source, Image.Image) else Image.open(io.BytesIO(bytes(source)))
    return ImageOps.exif_transpose(image).convert("RGB")


class Displayable:
    """Rich display for an image answer (see the module docstring). Subclasses define :meth:`panels`."""

    _sent: tuple = (None, None)  # (image, reference) as sent: encoded bytes or PIL images; see with_images

    def with_images(self, image: Any = None, reference: Any = None):
        """Remember the image (and reference) this answer is about — encoded bytes or PIL images, decoded
        only when displayed — for display only; returns ``self``."""
        self._sent = (image, reference)
        return self

    @property
    def _images(self) -> tuple:
        return tuple(as_picture(source) for source in self._sent)

    def panels(self) -> List[Panel]:  # pragma: no cover - each answer type defines it
        raise NotImplementedError

    def figure(self) -> Optional[Image.Image]:
        """The answer's maps side by side in one image (``None`` for an answer without maps)."""
        return figure(self.panels())

    def _repr_png_(self) -> Optional[bytes]:
        picture = self.figure()
        return png_bytes(picture) if picture is not None else None

    def _repr_html_(self) -> str:
        return card_html(self, self.panels())

    def show(self) -> None:
        """In a notebook, display the HTML card; elsewhere open the figure in the system's image viewer."""
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            get_ipython = None
        if get_ipython is not None and get_ipython() is not None:
            display(self)
            return
        picture = self.figure()
        if picture is None:
            raise ValueError("this answer has no maps to show (ask for an explanation: explain=…)")
        picture.show()
