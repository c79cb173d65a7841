"""TorchServe side of camserve: request parsing, validation, response encoding, the handlers.

Only this package imports ``ts`` (TorchServe); the engine stays pure PyTorch. The modules:

- :mod:`.errors` — :class:`RequestError` (status + message) and the mapping of engine errors to HTTP.
- :mod:`.images` — image bytes / base64 → ``uint8`` tensors, with pixel and bomb limits.
- :mod:`.requests` — one TorchServe request dict → :class:`~.requests.ParsedRequest` (items + options),
  for raw bodies, multipart, JSON, KServe v1 and v2 envelopes.
- :mod:`.options` — the per-request explanation options (method, layer, target, format, …).
- :mod:`.settings` — the handler defaults from ``model-config.yaml``'s ``handler:`` section.
- :mod:`.encode` — predictions, heatmaps (PNG / arrays / overlays) and envelopes as JSON.
- :mod:`.metrics` — handler metrics (explanation time per method).
- :mod:`.base`, :mod:`.classifier`, :mod:`.embedding` — the handler classes.
"""
