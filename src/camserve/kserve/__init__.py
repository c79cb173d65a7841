"""camserve on KServe: a native predictor (:mod:`.predictor`, :mod:`.server`, :mod:`.batcher`,
:mod:`.metrics`; ``camserve kserve``) and the layout KServe's TorchServe runtime reads for the
``.mar`` archives (:mod:`.layout`; ``camserve kserve-layout``). The predictor needs the ``kserve``
extra; the layout does not."""
