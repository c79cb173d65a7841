"""Shallow-CAM: class activation maps that stay faithful at shallow layers.

A reconstruction of "Shallow class activation mapping based on spatial weights and inter-layer
correlation" (Computer Science 52(6A), 2025; the paper gives no code). Relevance is propagated by
LRP from the class score down through the layer ``l+1`` above the target layer ``l`` and one step
further to ``l``; what ``l``'s channels receive from ``l+1`` gives the inter-layer weights:

    map_l = ReLU(Σ_k β_k · S_k ⊙ A^l_k)

Options (the readings the paper leaves open):

- ``beta``: ``signed`` ``β_k = Σ_ij R^l_kij / max_k |Σ_ij R^l_kij|``; ``positive`` its ReLU;
  ``one`` ``β ≡ 1`` (with ``spatial=gradient`` exactly LayerCAM);
- ``beta_from``: ``layer`` (the relevance at ``l``) or ``above`` (the spatial relevance of ``l+1``,
  ``R̃_ij = Σ_k R^{l+1}_kij``, brought to ``l``'s grid sum-preservingly and shared among ``l``'s
  channels by activation: ``β_k = Σ_ij R̃_ij · A^l_kij / Σ_k' A^l_k'ij``); ``auto``: ``above``
  where ``l+1`` exists, else ``layer``;
- ``spatial``: ``relevance`` ``S = ReLU(R^l / A^l)`` (gradient-free) or ``gradient``
  ``S = ReLU(∂y_c/∂A^l)`` (LayerCAM-style);
- ``start`` / ``temperature``: the initial relevance at the logits (:mod:`camserve.engine.lrp.starts`):
  ``softmax`` (default; SGLRP, Iwana et al. 2019: ``z = y_t − Σ_{k≠t} q_k y_k``,
  ``q = softmax_{k≠t}(y / T)``, explained as one virtual output), ``rival`` (``T → 0``), ``target``,
  ``contrastive`` (the paper's ``+1 / −1/N``) or ``margin``;
- ``refine``: the map multiplied by the min-max-normalised map of ``l+1`` (coarse to fine).

Measured (faithfulness on a fixed choose/report split, class sensitivity, randomisation checks):
``benchmarks/results/shallowcam_variants.md`` and the docs' Evaluation page.
"""

import torch
import torch.nn.functional as F

from camserve.engine.errors import NotAFeatureMapError
from camserve.engine.methods.cam.base import CamMethod, Captured
from camserve.engine.lrp.starts import START_OPTION_CHOICES, RelevanceStartOptions


class ShallowCAM(RelevanceStartOptions, CamMethod):
    """``map_l = ReLU(Σ_k β_k · S_k ⊙ A^l_k)``, ``β`` and ``S`` as the options say (module docstring).

    Defaults: ``beta=signed, beta_from=layer, spatial=relevance, start=softmax`` (echoed with
    ``contrastive=1``), ``refine=0``. ``start`` seeds the relevance pass only; ``spatial=gradient`` reads ``∂y_t/∂A^l``.
    With ``refine=True`` the map is multiplied by the min-max-normalised map of layer ``l+1``,
    computed the same way (with ``beta_from=layer``) and upsampled bilinearly to ``l``'s resolution.
    """

    name = "shallowcam"
    family = "lrp"
    needs_relevance = True
    option_choices = {
        # the defaults are the measured best readings (shallowcam_variants.md § 5–7)
        "spatial": ("relevance", ("gradient", "relevance")),
        "refine": (False, None),
        "contrastive": (False, None),
        **START_OPTION_CHOICES,  # start not given: as ``contrastive`` says, else DEFAULT_START; T = 1 not given
        "beta": ("signed", ("signed", "positive", "one")),
        "beta_from": ("layer", ("layer", "above", "auto")),
    }
    eps = 1e-12
    #: options left out of the resolved options while at their defaults (an explanation's echoed
    #: options and its grouping key stay as they were before these options existed)
    QUIET_DEFAULTS = {"beta": "signed", "beta_from": "layer"}
    DEFAULT_START = "softmax"

    def options(self, given):
        resolved = super().options(given)  # start, contrastive, temperature: RelevanceStartOptions
        for key, default in self.QUIET_DEFAULTS.items():
            if resolved[key] == default:
                del resolved[key]
        return resolved

    @classmethod
    def _get(cls, options, key):
        return options.get(key, cls.QUIET_DEFAULTS.get(key))

    def needs_gradient_for(self, options) -> bool:
        """Only the gradient spatial weights need an ordinary backward pass."""
        return options["spatial"] == "gradient"

    def needs_relevance_for(self, options) -> bool:
        """``beta=one`` with gradient spatial weights reads no relevance (it is LayerCAM)."""
        return not (self._get(options, "beta") == "one" and options["spatial"] == "gradient")

    def _needs_above(self, options) -> bool:
        return bool(options["refine"]) or (self._get(options, "beta_from") == "above"
                                           and self._get(options, "beta") != "one")

    def layers(self, layer, catalog, options):
        """``l`` and, for the coarse-to-fine variant or ``beta_from=above``, ``l+1`` (for
        ``beta_from=auto``: ``l+1`` when there is one)."""
        if self._needs_above(options):
            return [layer, catalog.layer_above(layer)]
        if self._get(options, "beta_from") == "auto" and self._get(options, "beta") != "one":
            try:
                return [layer, catalog.layer_above(layer)]
            except NotAFeatureMapError:  # the last feature map: β from the layer itself
                return [layer]
        return [layer]

    def _beta(self, layer: str, captured: Captured, options, above) -> torch.Tensor:
        activations = captured.activations[layer]
        beta_kind = self._get(options, "beta")
        if beta_kind == "one":
            return torch.ones(activations.shape[:2], device=activations.device, dtype=activations.dtype)
        if above is not None and self._get(options, "beta_from") in ("above", "auto"):
            spatial_relevance = captured.relevance(above).sum(dim=1, keepdim=True)  # (n, 1, h', w')
            h, w = activations.shape[-2:]
            scale = spatial_relevance.shape[-2] * spatial_relevance.shape[-1] / (h * w)
            spread = F.interpolate(spatial_relevance, size=(h, w), mode="nearest") * scale  # Σ kept
            total = activations.sum(dim=1, keepdim=True)
            total = total + torch.where(total >= 0, self.eps, -self.eps)
            beta = (spread * activations / total).sum(dim=(2, 3))
        else:
            beta = captured.relevance(layer).sum(dim=(2, 3))
        beta = beta / beta.abs().amax(dim=1, keepdim=True).clamp_min(self.eps)
        return torch.relu(beta) if beta_kind == "positive" else beta

    def _single(self, layer: str, captured: Captured, options, above=None) -> torch.Tensor:
        activations = captured.activations[layer]
        beta = self._beta(layer, captured, options, above)
        if options["spatial"] == "gradient":
            spatial = torch.relu(captured.gradients[layer])
        else:
            spatial = torch.relu(captured.relevance_gradients[layer])  # = ReLU(R^l / A^l)
        # β ⊙ S ⊙ A written into the fresh S: the same products in the same order, one buffer
        return torch.relu(spatial.mul_(beta[:, :, None, None]).mul_(activations).sum(dim=1))

    def compute(self, layer, captured: Captured, options) -> torch.Tensor:
        """The map at ``l`` (optionally refined by ``l+1``), shape ``(n, h, w)``."""
        above = [name for name in captured.activations if name != layer]
        above = above[0] if above else None
        cam = self._single(layer, captured, options, above)
        if options["refine"]:
            coarse = self._single(above, captured, options)  # l+1's own β (no l+2 to read from)
            coarse = F.interpolate(coarse[:, None], size=cam.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            low = coarse.amin(dim=(1, 2), keepdim=True)
            coarse = (coarse - low) / (coarse.amax(dim=(1, 2), keepdim=True) - low + 1e-7)
            cam = cam * coarse
        return cam
