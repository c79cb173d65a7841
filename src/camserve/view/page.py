"""The view's one web page, as a string: HTML, CSS and JavaScript inline, nothing fetched from
elsewhere (it works offline and behind any firewall).

The page reads ``GET /api/model`` to offer the model's methods and layers (a classifier: stages as
checkboxes, more layer names typed; target ``top1``, ``top2`` or a class index; an embedding model:
a reference image and gallery matches), posts the form to ``POST /api/explain`` and draws the answer:
the top-k, a grid methods × layers whose maps are coloured (jet) in a canvas and laid over the
model's crop of the photograph (``crop_box``) with an opacity slider, the Spearman ρ tables, the FAM
pairs and matches, and a download link per PNG. A refusal's message is shown as it came.

The ``body`` element's attributes say where the page is, for people's tools and the tests:
``data-ready`` (``1`` once the model is described, ``error`` if it could not be), ``data-state``
(``idle``, ``running``, ``done``, ``error``) and ``data-maps`` (maps drawn and loaded).
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>camserve view</title>
<style>
  :root { --alpha: 0.6; --cell: 200px; font-family: system-ui, -apple-system, "Segoe UI", sans-serif; }
  body { margin: 0; padding: 1rem 1.5rem; color: #1d2330; background: #f6f7f9; }
  header { display: flex; align-items: baseline; gap: 1rem; flex-wrap: wrap; }
  header h1 { font-size: 1.3rem; margin: 0 0 .5rem; }
  header .model { color: #556; font-size: .9rem; }
  form { display: grid; grid-template-columns: minmax(220px, 300px) 1fr; gap: .75rem 1.5rem;
         background: #fff; padding: 1rem; border-radius: 8px; box-shadow: 0 1px 3px #0002; }
  .inputs { grid-row: span 4; display: flex; flex-direction: column; gap: .5rem; }
  .drop { border: 2px dashed #99a; border-radius: 8px; padding: .75rem; text-align: center; cursor: pointer;
          font-size: .9rem; color: #445; }
  .drop.over { border-color: #2563eb; background: #eef4ff; }
  .drop input { display: block; margin: .4rem auto 0; max-width: 100%; }
  .preview { max-width: 100%; max-height: 200px; object-fit: contain; border-radius: 4px; }
  fieldset { border: 1px solid #dde; border-radius: 6px; margin: 0; padding: .4rem .75rem .6rem; }
  legend { font-weight: 600; font-size: .85rem; padding: 0 .3rem; }
  .choices { display: flex; flex-wrap: wrap; gap: .25rem 1rem; font-size: .9rem; }
  .choices label { white-space: nowrap; }
  .choices .path { color: #667; font-family: ui-monospace, monospace; font-size: .8rem; }
  input[type=text] { width: 100%; box-sizing: border-box; margin-top: .4rem; }
  .row { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; font-size: .9rem; }
  button { font-size: 1rem; padding: .45rem 1.4rem; border-radius: 6px; border: 0; background: #2563eb;
           color: #fff; cursor: pointer; justify-self: start; }
  button:disabled { background: #99a; cursor: wait; }
  #status { margin: .75rem 0; color: #445; min-height: 1.2em; }
  .error { background: #fde8e8; color: #8a1c1c; border: 1px solid #f5b5b5; border-radius: 6px;
           padding: .6rem .8rem; margin: .75rem 0; white-space: pre-wrap; }
  .toolbar { display: flex; gap: 1rem; align-items: center; margin: .5rem 0 1rem; }
  #results[hidden], .hidden { display: none !important; }
  #topk { list-style: none; padding: 0; margin: 0 0 1rem; max-width: 520px; }
  #topk li { display: grid; grid-template-columns: 11rem 1fr 4rem; gap: .5rem; align-items: center;
             font-size: .9rem; margin: .15rem 0; }
  #topk .bar { height: .7rem; background: #2563eb; border-radius: 3px; }
  #topk .score { text-align: right; font-variant-numeric: tabular-nums; }
  table.grid { border-collapse: collapse; background: #fff; box-shadow: 0 1px 3px #0002; }
  table.grid th, table.grid td { border: 1px solid #e3e5ea; padding: .4rem; vertical-align: top; }
  table.grid th { font-size: .85rem; background: #f0f2f6; }
  table.grid th .path { display: block; font-weight: normal; color: #667; font-family: ui-monospace, monospace; }
  .cell { display: flex; gap: .4rem; flex-wrap: wrap; }
  figure { margin: 0; width: var(--cell); }
  .stack { position: relative; width: var(--cell); height: var(--cell); background: #ccd; }
  .stack canvas, .stack img { position: absolute; inset: 0; width: 100%; height: 100%; }
  .stack img.map { opacity: var(--alpha); }
  figcaption { font-size: .78rem; color: #334; margin-top: .2rem; }
  figcaption a { color: #2563eb; margin-right: .5rem; }
  .cell-error { width: var(--cell); font-size: .8rem; color: #8a1c1c; white-space: pre-wrap; }
  .rho { border-collapse: collapse; margin: .3rem 0 1rem; font-size: .85rem; background: #fff; }
  .rho th, .rho td { border: 1px solid #e3e5ea; padding: .25rem .6rem; text-align: right; }
  .rho th { background: #f0f2f6; }
  .pair { background: #fff; padding: .75rem; border-radius: 8px; box-shadow: 0 1px 3px #0002; margin-bottom: 1rem; }
  .pair h3 { margin: 0 0 .5rem; font-size: 1rem; }
  .figures { display: flex; gap: .6rem; flex-wrap: wrap; }
  h2 { font-size: 1.05rem; margin: 1.2rem 0 .5rem; }
  #notes { color: #556; font-size: .85rem; }
</style>
</head>
<body data-ready="0" data-state="idle" data-maps="0">
<header><h1>camserve view</h1><span class="model" id="model">describing the model…</span></header>
<form id="form" autocomplete="off">
  <div class="inputs">
    <label class="drop" id="drop">Drop an image here, or pick one
      <input type="file" id="image" name="image" accept="image/*"></label>
    <img id="preview" class="preview hidden" alt="the image to explain">
    <label class="drop embed-only hidden" id="drop-reference">Reference image (FAM pair)
      <input type="file" id="reference" name="reference" accept="image/*"></label>
    <img id="reference-preview" class="preview hidden" alt="the reference image">
  </div>
  <fieldset><legend>Methods</legend><div class="choices" id="methods"></div></fieldset>
  <fieldset class="classify-only"><legend>Layers</legend><div class="choices" id="layers"></div>
    <input type="text" name="layers" id="more-layers"
           placeholder="more layers, comma-separated: module paths (_blocks.6) or stage aliases (stage2)"></fieldset>
  <fieldset class="classify-only"><legend>Target and predictions</legend><div class="row">
    <label>target <select id="target-kind">
      <option value="top1">top1 (the predicted class)</option>
      <option value="top2">top2 (the two best classes)</option>
      <option value="index">a class index…</option></select></label>
    <input type="number" id="class-index" min="0" value="0" class="hidden" aria-label="class index">
    <label>top-k <input type="number" name="topk" id="topk-count" min="1" max="20" value="5"></label>
  </div></fieldset>
  <fieldset class="embed-only hidden"><legend>Gallery</legend><div class="row">
    <label>matches from the model's gallery <input type="number" name="gallery" id="gallery" min="0" max="10"
           value="0"></label></div></fieldset>
  <button type="submit" id="run">Explain</button>
</form>
<div id="status" role="status"></div>
<div id="error" class="error hidden" role="alert"></div>
<section id="results" hidden>
  <div class="toolbar"><label for="opacity">overlay opacity</label>
    <input type="range" id="opacity" min="0" max="100" value="60"><span id="opacity-value">60 %</span></div>
  <div id="predictions"></div>
  <div id="grid"></div>
  <div id="comparisons"></div>
  <div id="pairs"></div>
  <ul id="notes"></ul>
</section>
<script>
"use strict";
const $ = (selector) => document.querySelector(selector);
const body = document.body;
let info = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.classList.toggle("hidden", !message);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("an image did not load"));
    image.src = src;
  });
}

// jet, as the servers' overlays colour maps: blue (0) → cyan → yellow → red (1)
function jet(v) {
  const c = (x) => Math.max(0, Math.min(1, x)) * 255;
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

async function colourise(png) {
  const grey = await loadImage("data:image/png;base64," + png);
  const canvas = el("canvas");
  canvas.width = grey.naturalWidth; canvas.height = grey.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(grey, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    const [r, g, b] = jet(pixels.data[i] / 255);
    pixels.data[i] = r; pixels.data[i + 1] = g; pixels.data[i + 2] = b; pixels.data[i + 3] = 255;
  }
  context.putImageData(pixels, 0, 0);
  return canvas.toDataURL("image/png");
}

function safeName(text) { return String(text).replace(/[^A-Za-z0-9_.-]+/g, "_"); }

// one map: the photograph's model crop underneath, the coloured map on top at the slider's opacity
function mapFigure(png, photo, box, size, caption, name, loads) {
  const [width, height] = size && size.length === 2 ? size : [224, 224];
  const under = el("canvas", {width, height});
  if (photo && box && box.length === 4) {
    under.getContext("2d").drawImage(photo, box[0], box[1], box[2] - box[0], box[3] - box[1], 0, 0, width, height);
  }
  const map = el("img", {class: "map", alt: caption});
  const colourLink = el("a", {download: name + "-jet.png"}, "colour PNG");
  const greyLink = el("a", {download: name + ".png", href: "data:image/png;base64," + png}, "map PNG");
  loads.push(colourise(png).then((url) => {
    colourLink.href = url;
    return new Promise((resolve, reject) => { map.onload = resolve; map.onerror = reject; map.src = url; });
  }));
  return el("figure", {}, el("div", {class: "stack"}, under, map),
            el("figcaption", {}, caption, el("br"), greyLink, colourLink));
}

function renderPredictions(predictions) {
  const list = el("ol", {id: "topk"});
  for (const p of predictions) {
    const percent = (100 * p.score).toFixed(1);
    list.append(el("li", {"data-index": p.index}, el("span", {class: "label"}, `${p.label} (${p.index})`),
                   el("div", {}, el("div", {class: "bar", style: `width:${percent}%`})),
                   el("span", {class: "score"}, percent + " %")));
  }
  $("#predictions").replaceChildren(el("h2", {}, "Top-" + predictions.length), list);
}

function renderGrid(page, photo, loads) {
  const table = el("table", {class: "grid"});
  const head = el("tr", {}, el("th", {}, "method \\ layer"));
  for (const layer of page.layers) {
    const first = page.cells.find((c) => c.layer === layer && c.resolved_layer);
    const resolved = first && first.resolved_layer !== layer ? first.resolved_layer : "";
    const shape = first ? ` ${first.layer_shape.join("×")}` : "";
    head.append(el("th", {}, layer, el("span", {class: "path"}, resolved + shape)));
  }
  table.append(head);
  for (const method of page.methods) {
    const row = el("tr", {}, el("th", {}, method));
    for (const layer of page.layers) {
      const cell = page.cells.find((c) => c.method === method && c.layer === layer);
      const content = el("div", {class: "cell"});
      if (!cell) content.append("—");
      else if (cell.error) content.append(el("div", {class: "cell-error"}, `${cell.status || ""} ${cell.error}`));
      else for (const m of cell.maps) {
        const name = safeName(`${method}_${cell.resolved_layer}_${m.target}`);
        const seconds = cell.seconds != null ? ` · ${cell.seconds.toFixed(2)} s` : "";
        content.append(mapFigure(m.png, photo, cell.crop_box, cell.size, `${m.label} (${m.target})${seconds}`,
                                 name, loads));
      }
      row.append(el("td", {}, content));
    }
    table.append(row);
  }
  $("#grid").replaceChildren(el("h2", {}, "Maps"), table);
}

function renderComparisons(comparisons) {
  const parts = [];
  for (const c of comparisons) {
    const table = el("table", {class: "rho"});
    table.append(el("tr", {}, el("th", {}, "ρ"), ...c.methods.map((m) => el("th", {}, m))));
    c.spearman.forEach((values, i) => table.append(el("tr", {}, el("th", {}, c.methods[i]),
      ...values.map((v) => el("td", {}, v == null ? "—" : Number(v).toFixed(3))))));
    const where = c.resolved_layer && c.resolved_layer !== c.layer ? `${c.layer} (${c.resolved_layer})` : c.layer;
    parts.push(el("h2", {}, `Rank correlation (Spearman ρ) at ${where}, target ${c.label} (${c.target})`), table);
  }
  $("#comparisons").replaceChildren(...parts);
}

function renderPairs(page, photo, reference, loads) {
  const parts = [];
  for (const p of page.pairs) {
    const title = `${p.method} · ${p.kind === "pair" ? "against the reference image" : "gallery matches"}`;
    if (p.error) {
      parts.push(el("div", {class: "pair"}, el("h3", {}, title), el("div", {class: "cell-error"},
                 `${p.status || ""} ${p.error}`)));
      continue;
    }
    const figures = el("div", {class: "figures"});
    const name = safeName(`${p.method}_${p.kind}`);
    if (p.kind === "pair") {
      figures.append(mapFigure(p.query_map, photo, p.crop_box, p.size, "query", name + "_query", loads));
      if (p.reference_map) figures.append(mapFigure(p.reference_map, reference, p.reference_crop_box, p.size,
                                                    "reference", name + "_reference", loads));
    }
    for (const m of p.matches) {
      const caption = `#${m.index} ${m.label} · ${m.similarity.toFixed(3)}`;
      figures.append(mapFigure(m.query_map, photo, p.crop_box, p.size, "query · " + caption,
                               name + `_match${m.index}_query`, loads));
      if (m.reference_map) figures.append(mapFigure(m.reference_map, null, null, p.size, "gallery · " + caption,
                                                    name + `_match${m.index}_reference`, loads));
    }
    const similarity = p.kind === "pair" ? ` · ${p.metric} similarity ${p.similarity.toFixed(4)}` : "";
    parts.push(el("div", {class: "pair"}, el("h3", {}, title + similarity), figures));
  }
  $("#pairs").replaceChildren(el("h2", {}, "FAM"), ...parts);
}

function fileImage(input) {
  const file = input.files && input.files[0];
  return file ? loadImage(URL.createObjectURL(file)).catch(() => null) : Promise.resolve(null);
}

function preview(input, target) {
  fileImage(input).then((image) => {
    target.classList.toggle("hidden", !image);
    if (image) target.src = image.src;
  });
}

async function submit(event) {
  event.preventDefault();
  showError("");
  const started = performance.now();
  body.dataset.state = "running";
  body.dataset.maps = "0";
  $("#run").disabled = true;
  $("#status").textContent = "explaining…";
  const form = new FormData($("#form"));
  const kind = $("#target-kind").value;
  form.set("target", kind === "index" ? $("#class-index").value : kind);
  try {
    const response = await fetch("api/explain", {method: "POST", body: form});
    const page = await response.json().catch(() => ({error: {message: response.statusText}}));
    if (!response.ok) throw new Error(`${response.status}: ${(page.error || {}).message || "refused"}`);
    const [photo, reference] = await Promise.all([fileImage($("#image")), fileImage($("#reference"))]);
    const loads = [];
    $("#results").hidden = false;
    for (const id of ["#predictions", "#grid", "#comparisons", "#pairs"]) $(id).replaceChildren();
    if (page.task === "embed") renderPairs(page, photo, reference, loads);
    else {
      renderPredictions(page.predictions);
      renderGrid(page, photo, loads);
      renderComparisons(page.comparisons);
    }
    $("#notes").replaceChildren(...page.notes.map((n) => el("li", {}, n)));
    await Promise.all(loads);
    body.dataset.maps = String(loads.length);
    $("#status").textContent = `${loads.length} maps in ${((performance.now() - started) / 1000).toFixed(1)} s`;
    body.dataset.state = "done";
  } catch (error) {
    $("#status").textContent = "";
    showError(error.message);
    body.dataset.state = "error";
  } finally {
    $("#run").disabled = false;
  }
}

function checkbox(name, value, label, checked, path) {
  const box = el("input", {type: "checkbox", name, value});
  box.checked = checked;
  return el("label", {}, box, " " + label, ...(path ? [" ", el("span", {class: "path"}, path)] : []));
}

async function describe() {
  try {
    const response = await fetch("api/model");
    const model = await response.json();
    if (!response.ok) throw new Error(`${response.status}: ${(model.error || {}).message || "refused"}`);
    info = model;
  } catch (error) {
    showError(error.message);
    body.dataset.ready = "error";
    return;
  }
  $("#model").textContent = `${info.name} · ${info.task === "embed" ? "embedding model" : "classifier"} · ${info.source}`;
  $("#methods").replaceChildren(...info.methods.map((m) =>
    checkbox("method", m, m, info.default_methods.includes(m))));
  $("#layers").replaceChildren(...info.layers.map((l) =>
    checkbox("layer", l.name, l.alias || l.name, l.name === info.default_layer, l.alias ? l.name : "")));
  for (const node of document.querySelectorAll(".classify-only")) node.classList.toggle("hidden", info.task === "embed");
  for (const node of document.querySelectorAll(".embed-only")) node.classList.toggle("hidden", info.task !== "embed");
  if (info.task === "embed" && info.gallery) $("#gallery").value = "3";
  body.dataset.ready = "1";
}

function dropZone(zone, input, target) {
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) { input.files = event.dataTransfer.files; preview(input, target); }
  });
  input.addEventListener("change", () => preview(input, target));
}

dropZone($("#drop"), $("#image"), $("#preview"));
dropZone($("#drop-reference"), $("#reference"), $("#reference-preview"));
$("#target-kind").addEventListener("change", () =>
  $("#class-index").classList.toggle("hidden", $("#target-kind").value !== "index"));
$("#opacity").addEventListener("input", () => {
  document.documentElement.style.setProperty("--alpha", $("#opacity").value / 100);
  $("#opacity-value").textContent = $("#opacity").value + " %";
});
$("#form").addEventListener("submit", submit);
describe();
</script>
</body>
</html>
"""
