"""FG-CAM (Qiu et al., AAAI 2024, "Empowering CAM-Based Methods with Capability to Generate
Fine-Grained and High-Faithfulness Explanations"; reference code github.com/dongmo-qcq/FG-CAM).

The paper's three steps, with its Grad-CAM base and without its optional SVD denoising:

1. explanation components at the last convolutional map ``H`` (the one global pooling reads):
   ``I_k = α_k · A^H_k`` with Grad-CAM's ``α_k = (1/hw) Σ_ij ∂y_c/∂A^H_kij``, kept per channel;
2. their resolution raised layer by layer down to the target layer ``l`` by LRP rules: z⁺ over
   both signs of a convolution's products (``x⁺w⁺`` and ``x⁻w⁻``), relevance passed unchanged
   through BatchNorm and activations, winner-take-all through max pooling, proportional through
   average pooling;
3. the components summed over channels: ``map_l = ReLU(Σ_k R^l_k)``.

How it runs here: every map after ``H`` of the models this method accepts is global average
pooling into one linear layer, so ``∂y_c/∂A^H_kij = W_ck / hw`` and the Grad-CAM components are
``I = A^H ⊙ W_c / hw``. The explainer's relevance pass seeded with the one-hot target (``R_y = e_c``,
LRP-ε at the linear layer, the plain gradient through the pooling) arrives at ``H`` as
``A^H ⊙ W_c / (hw · y_c)`` — the same components divided by the target logit. Rules are linear in
the relevance they pass on, so the relevance that pass leaves at ``l`` is FG-CAM's divided by
``y_c``:

    map_l = ReLU(y_c · Σ_k R^l_k),   R^l = A^l ⊙ g^l   (g^l: the pass's modified gradient at l)

One forward and one relevance backward, shared with the batch's other LRP rows; the conv rules are
the explainer's composite (the default ``epsilon_plus`` is z⁺ as above, with the positive part of a
bias in the denominator; the paper's code drops biases — the same for the bias-free convolutions
before a BatchNorm of EfficientNet and ResNet). A residual sum splits relevance in proportion to
its summands (LRP-0), a depthwise convolution is a convolution with ``groups``; the paper, written
for VGG, has neither. A model whose head is not global average pooling into one linear layer
(VGG's MLP, a transformer) is refused (:class:`UnsupportedModelError`): there the one-hot pass does
not start from Grad-CAM's components.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from camserve.engine.core.layers import LayerCatalog
from camserve.engine.errors import UnsupportedModelError
from camserve.engine.methods.cam.base import CamMethod, Captured

#: modules that may run between the last map and the classifier of a pooled linear head
_POOLING = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)
_SHAPE_ONLY = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


def _leaves(catalog: LayerCatalog, model: nn.Module) -> Iterable[str]:
    modules = dict(model.named_modules())
    return [n for n in catalog.names() if n in modules and next(modules[n].children(), None) is None]


def check_pooled_linear_head(method: str, catalog: LayerCatalog, model: nn.Module) -> None:
    """Refuse (:class:`UnsupportedModelError`) a model whose last spatial map is not read by global
    average pooling and one ``nn.Linear`` giving the logits, with only flattening, dropout or
    identities between them. Modules only: a functional op in ``forward`` is not seen."""
    modules = dict(model.named_modules())
    leaves = _leaves(catalog, model)
    spatial = [n for n in leaves if catalog.layers[n].layout == "nchw" and catalog.layers[n].map_shape is not None
               and catalog.layers[n].map_shape[1] * catalog.layers[n].map_shape[2] > 1]
    if not spatial:
        raise UnsupportedModelError(f"{method} needs a convolutional map read by global average pooling and a "
                                    f"linear classifier; the model has no (C, H, W) map with H·W > 1")
    last_map = max(spatial, key=lambda n: catalog.layers[n].exited)
    head = sorted((n for n in leaves if catalog.layers[n].exited > catalog.layers[last_map].exited),
                  key=lambda n: catalog.layers[n].exited)
    why = None
    linears = [n for n in head if isinstance(modules[n], nn.Linear)]
    outputs = catalog.output_shape[-1] if catalog.output_shape else None
    if len(linears) != 1 or head[-1] != linears[0] or modules[linears[0]].out_features != outputs:
        why = f"{len(linears)} linear layers ({', '.join(linears) or 'none'}) run after it, not one giving the logits"
    for name in head[:-1]:
        module, shape = modules[name], catalog.layers[name].output_shape
        pooled = isinstance(module, _POOLING) and shape is not None and all(s == 1 for s in shape[1:])
        if not (pooled or isinstance(module, _SHAPE_ONLY)):
            why = f"{name!r} ({type(module).__name__}, output {shape}) runs between it and the classifier"
            break
    if why:
        raise UnsupportedModelError(
            f"{method} starts from Grad-CAM's components at the last map, read here off the target's relevance "
            f"pass, which needs that map ({last_map!r}) to feed global average pooling and one linear "
            f"classifier; {why} — use gradcam, layercam or shallowcam")


class FGCAM(CamMethod):
    """``map_l = ReLU(y_c · Σ_k R^l_k)``, ``R^l = A^l ⊙ g^l`` from the relevance pass seeded with
    the one-hot target ``c`` (``R_y = e_c``): FG-CAM with a Grad-CAM base, no denoising, i.e.
    ``ReLU(Σ_k LRP_{H→l}(α ⊙ A^H)_k)`` with ``α_k = mean_ij ∂y_c/∂A^H_kij`` at the map ``H``
    global pooling reads (module docstring: why the two are equal, what differs from the paper).

    ``layer``: any feature map (module path or stage alias) below or at ``H``. No options; the
    answer's options say ``start: target`` (the relevance start it reads)."""

    name = "fgcam"
    family = "lrp"
    needs_relevance = True
    #: the relevance pass's start this method's identity needs (``camserve.engine.lrp.starts``)
    START = "target"

    def options(self, given):
        super().options(given)  # no option of its own: a given one is an InvalidOptionError
        return {"start": self.START}

    def validate(self, layer, catalog, model) -> None:
        """The model's head must be global average pooling into one linear classifier."""
        check_pooled_linear_head(self.name, catalog, model)

    def compute(self, layer: str, captured: Captured, options) -> torch.Tensor:
        """``ReLU(y_c · Σ_k A^l_k ⊙ g^l_k)`` at layer resolution, shape ``(n, h, w)``."""
        target_logit = captured.logits.gather(1, captured.targets.view(-1, 1)).view(-1, 1, 1)
        return torch.relu(captured.relevance(layer).sum(dim=1).mul_(target_logit))
