"""``camserve view``: a local web page that shows a model's explanations of one image.

The page (:mod:`.page`, one HTML string with its CSS and JavaScript inline: no external asset, works
offline) lets a person drop or pick an image, choose methods, layers and a target, and see the top-k
predictions and the maps side by side (methods × layers, overlaid on the photograph with an opacity
slider), the rank correlations of methods compared at one layer, and for an embedding model the
query/reference FAM pair and the gallery matches; every map can be downloaded as a PNG.

Behind the page (:mod:`.app`, a Starlette ASGI app) a :class:`~.backend.Backend` answers the
requests, either of two kinds with the same answers:

- :class:`~.remote.RemoteBackend` — a running server (TorchServe or ``camserve kserve``) through
  :class:`camserve.client.Client`;
- :class:`~.inprocess.InProcessBackend` — a model spec or ``.mar`` run in this process by the serving
  handlers, driven as a TorchServe worker drives them (:mod:`camserve.serving.local`), so it answers
  the JSON a server would.

:mod:`.choices` turns the page's form into the requests (``explain=`` / ``compare=`` options per
layer), :mod:`.results` the typed answers into the page's JSON, :mod:`.errors` carries a 4xx to the
page.
"""
