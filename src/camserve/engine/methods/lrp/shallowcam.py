"""Shallow-CAM: class activation maps that stay faithful at shallow layers.

Reconstruction of "Shallow class activation mapping based on spatial weights and inter-layer
correlation" (Computer Science 52(6A), 2025; the paper gives no code). Relevance is propagated by
LRP from the class score down through the layer ``l+1`` above the target layer ``l`` and one step
further to ``l``; the relevance that ``l``'s channels receive from ``l+1`` gives the inter-layer
weights.

Initial relevance (issue 15): the paper's contrastive start (``+1`` on the target logit, ``−1/N``
on the others) is an option, no longer the default. Measured (``benchmarks/results/
shallowcam_variants.md``): with each class's ``−1/N`` handed through the ε-rule of the linear head
by its own logit, classes whose logit is near 0 amplify it (ΣR⁺ ≈ 24× |ΣR| at ResNet-20's
``layer3``, ≈ 117× at EfficientNet-Lite0's ``_conv_head``) and the maps follow that noise; normalised
as one output (the margin ``y_t − Σ_{c≠t} y_c / N``) the contrastive start gives the plain start's
maps (Spearman ≥ 0.99999), because the head's rows nearly sum to zero. The plain start was more
faithful on the choose half of the ResNet-20 evaluation at every stage and passed the
randomisation test where the contrastive one failed — but its maps barely depend on the class.
The default is the softmax start (below): class-specific and, except at ResNet ``layer2``, as
faithful or more (``shallowcam_variants.md`` § 5–7).

Because the paper gives no code, the readings that differ are options (issue 15; every one is
measured in ``benchmarks/results/shallowcam_variants.md``):

- ``beta``: ``signed`` (``β_k = Σ_ij R^l_kij / max_k |Σ_ij R^l_kij|``, the sign kept),
  ``positive`` (``ReLU`` of it: a channel with negative relevance is dropped rather than flipped),
  ``one`` (``β ≡ 1``: with ``spatial=gradient`` this is exactly LayerCAM, the bar to clear);
- ``beta_from``: ``layer`` (the LRP relevance at ``l``, i.e. what ``l``'s channels receive from
  ``l+1``) or ``above`` (the spatial relevance of ``l+1``, ``R̃_ij = Σ_k R^{l+1}_kij``, brought to
  ``l``'s grid sum-preservingly and propagated one step to ``l``'s channels in proportion to their
  activation: ``β_k = Σ_ij R̃_ij · A^l_kij / Σ_k' A^l_k'ij``); ``auto``: ``above`` where ``l`` has
  a layer above it, ``layer`` at the last feature map (which has none; ``above`` is an error there)
  — so a deployment default of ``auto`` serves every stage;
- ``spatial``: ``gradient`` (``ReLU(∂y_c/∂A^l)``, LayerCAM-style) or ``relevance``
  (``ReLU(R^l / A^l)``, gradient-free);
- ``start``, the initial relevance at the logits (``engine/lrp/starts.py: relevance_seed``):
  ``target`` (``R_y = e_t``; also ``contrastive=0``), ``contrastive`` (the paper's
  ``+1`` / ``−1/N``, each class's share divided by its own logit; also ``contrastive=1``),
  ``margin`` (the same contrast as one output, relevance 1 on ``y_t − Σ_{c≠t} y_c / N``: the
  plain maps, see above) or ``softmax`` (the default), the softmax-gradient start after SGLRP (Iwana et al.
  2019, "Explaining convolutional neural networks using softmax gradient layer-wise relevance
  propagation"): the target against the classes the model actually considers,

      z = y_t − Σ_{k≠t} q_k y_k,   q_k = p_k / (1 − p_t) = softmax_{k≠t}(y),   p = softmax(y) (detached),

  i.e. ``∂ log p_t / ∂y = e_t − p`` up to the positive factor ``1 − p_t``, explained as *one*
  virtual output ``w_t − Σ_{k≠t} q_k w_k`` of the linear head with relevance ``z`` itself: the
  seed gradient is ``g = e_t − q`` (``R_y = y ⊙ g``, ``ΣR_y = z``), so no class's share is
  divided by its own logit, and a negative ``z`` (a runner-up explained against the winner)
  keeps its sign. Unlike the uniform ``−1/N``, ``q`` does not cancel against the head's
  rows summing to ≈ 0. ``contrastive`` is echoed as ``True`` with it (and ``start`` too);
  ``contrastive=0`` with ``start=softmax`` is an error. Measured in ``shallowcam_variants.md``
  (§ 5): class-specific (rho12 ≈ 0 at ResNet-20's ``layer1``), conserved at the head.
  ``rival``: the same with ``z = y_t − y_r`` against the strongest competitor ``r`` only (the
  softmax start at temperature → 0; ``contrastive`` echoed ``True``).
- ``temperature`` (``start=softmax`` only; a number in [1e-3, 1e6], 1 when not given and then not
  echoed): ``q = softmax_{k≠t}(y / T)``, from the rival contrast (``T → 0``) through SGLRP
  (``T = 1``) to the uniform contrast of the margin start (``T → ∞``, the plain maps). Measured in
  ``shallowcam_variants.md`` § 8.
- ``refine``: coarse-to-fine, the map multiplied by the min-max-normalised map of ``l+1``.
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
        # defaults chosen by measurement: spatial=relevance (benchmarks/results/faithfulness.md;
        # needs no ordinary backward pass), contrastive=0 (issue 15, the choose half of
        # benchmarks/results/faithfulness_cifar-resnet20_choose.md: +0.20 / +0.24 / +0.03 paired
        # overall over contrastive=1 at layer1/2/3); refining with l+1 did not help on average.
        # start=softmax (SGLRP-style) is the default since the choose halves of shallowcam_variants.md
        # § 5–7: the plain start's maps barely depend on the class (rho12 0.61 / 0.68 / 0.85 on
        # ResNet-20, 0.99 on EfficientNet-Lite0's _blocks.2/4); the softmax start's do (0.02 / 0.30 /
        # 0.57 vs LayerCAM 0.54 / 0.60 / 0.86; EfficientNet 0.66–0.69 vs 0.42–0.49, still above),
        # and it is as faithful or more everywhere except ResNet layer2 (ties LayerCAM there:
        # +0.001 / −0.045, where the plain start had +0.070 / −0.009 with class-blind maps).
        "spatial": ("relevance", ("gradient", "relevance")),
        "refine": (False, None),
        "contrastive": (False, None),
        **START_OPTION_CHOICES,  # start not given: as ``contrastive`` says, else DEFAULT_START; T = 1 not given
        "beta": ("signed", ("signed", "positive", "one")),
        "beta_from": ("layer", ("layer", "above", "auto")),
    }
    eps = 1e-12
    #: options added for issue 15: left out of the resolved options while at their defaults, so
    #: that an explanation's echoed options (and its grouping key) are what they were before
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
