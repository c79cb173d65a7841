"""Layer discovery: one probe forward lists every feature map with its layout, ``(C, h, w)`` and
stride; stages are the last module at each resolution (a ViT's transformer blocks); the default
CAM layer is the last map before pooling (a ViT's last block's first norm); stage aliases resolve;
an unknown layer's error lists the stages.

Real architectures with random weights (torchvision, timm) and the bundled EfficientNet-Lite0.
CNNs are traced at 64×64 (their stage names do not depend on the size as long as every stage keeps
a map larger than 1×1); the token and channels-last models at sizes they accept.
"""

from __future__ import annotations

import pytest
import torch

from camserve.engine.errors import UnknownLayerError
from camserve.engine.core.layers import LayerCatalog, LayerRow, format_table, grid_stride, infer_layout, token_grid


def _torchvision(name, **kwargs):
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, **kwargs).eval()


def _timm(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def _effnet():
    from camserve.engine.models import load_effnet_lite0

    return load_effnet_lite0()


# (builder, input size, stages shallow → deep, default layer)
CASES = {
    # the stem's ReLU is the last module at 112 (stride 2), then one stage per residual layer
    "resnet18": (lambda: _torchvision("resnet18"), 64, ["relu", "layer1", "layer2", "layer3", "layer4"], "layer4"),
    "resnet50": (lambda: _torchvision("resnet50"), 64, ["relu", "layer1", "layer2", "layer3", "layer4"], "layer4"),
    # the last ReLU before each max pool, then the last pool's map; the default skips that pool
    "vgg16": (lambda: _torchvision("vgg16"), 64,
              ["features.3", "features.8", "features.15", "features.22", "features.29", "features.30"], "features.29"),
    "mobilenet_v3_small": (lambda: _torchvision("mobilenet_v3_small"), 64,
                           ["features.0", "features.1", "features.3", "features.8", "features.12"], "features.12"),
    # the downsampling Sequentials (features.2, .4, .6) continue a resolution: not stages
    "convnext_tiny": (lambda: _torchvision("convnext_tiny"), 64,
                      ["features.1", "features.3", "features.5", "features.7"], "features.7"),
    "timm_convnext_atto": (lambda: _timm("convnext_atto"), 64, ["stages.0", "stages.1", "stages.2", "stages.3"],
                           "stages.3"),
    # per resolution: a subset of the hand-written profile's stages (_blocks.7, _blocks.14 and
    # _blocks.15 end *width* stages inside the 14×14 and 7×7 resolutions); the head's BatchNorm
    # is skipped (an affine of _conv_head) and the shared _swish (stem and head) is never a stage
    "efficientnet_lite0": (_effnet, 224, ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "_conv_head"],
                           "_conv_head"),
    "swin_t": (lambda: _torchvision("swin_t"), 112, ["features.1", "features.3", "features.5", "features.7"],
               "features.7"),
    "vit_b_16": (lambda: _torchvision("vit_b_16", image_size=64), 64,
                 [f"encoder.layers.encoder_layer_{i}" for i in range(12)], "encoder.layers.encoder_layer_11.ln_1"),
    "timm_vit_tiny": (lambda: _timm("vit_tiny_patch16_224"), 224, [f"blocks.{i}" for i in range(12)],
                      "blocks.11.norm1"),
}


@pytest.fixture(scope="module")
def catalogs():
    cache = {}

    def get(name):
        if name not in cache:
            build, size, _, _ = CASES[name]
            model = build()
            cache[name] = (model, LayerCatalog.trace(model, (size, size)))
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_stages_and_default_layer(catalogs, name):
    model, catalog = catalogs(name)
    _, size, stages, default = CASES[name]
    assert catalog.stages() == stages
    assert catalog.default_layer() == default
    modules = dict(model.named_modules())
    for k, stage in enumerate(stages, start=1):
        assert catalog.resolve(f"stage{k}") == stage
        assert stage in modules and catalog.feature_map(stage).stride is not None
    table = catalog.table()
    assert [r.name for r in table if r.stage] == stages
    assert [r.stage for r in table if r.stage] == [f"stage{k}" for k in range(1, len(stages) + 1)]


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "mobilenet_v3_small", "convnext_tiny", "efficientnet_lite0"])
def test_cnn_strides_shrink_stage_by_stage(catalogs, name):
    _, catalog = catalogs(name)
    _, size, stages, _ = CASES[name]
    strides = [catalog.stride(s) for s in stages]
    assert strides == sorted(strides) and len(set(strides)) == len(strides)
    for stage, stride in zip(stages, strides):
        info = catalog.get(stage)
        assert info.layout == "nchw" and info.map_shape == info.output_shape
        assert info.map_shape[1] * stride == size  # these sizes divide: input size / map size


def test_resnet_strides_and_layouts(catalogs):
    _, catalog = catalogs("resnet18")
    assert [catalog.stride(s) for s in catalog.stages()] == [2, 4, 8, 16, 32]
    assert catalog.get("layer4").map_shape == (512, 2, 2)
    assert not catalog.get("avgpool").is_feature_map


def test_convnext_block_insides_are_channels_last(catalogs):
    """torchvision's CNBlock permutes to (N, H, W, C) for its LayerNorm and Linear layers."""
    _, catalog = catalogs("convnext_tiny")
    inside = catalog.get("features.1.0.block.3")  # the first Linear, on channels-last input
    assert inside.layout == "nhwc" and inside.output_shape == (16, 16, 384) and inside.map_shape == (384, 16, 16)
    assert catalog.get("features.1.0.block.0").layout == "nchw"  # the depthwise conv
    x = torch.randn(2, 16, 16, 384)
    assert torch.equal(catalog.as_map("features.1.0.block.3", x), x.permute(0, 3, 1, 2))


def test_vit_tokens_drop_the_class_token_and_reshape(catalogs):
    _, catalog = catalogs("timm_vit_tiny")
    info = catalog.get("blocks.11.norm1")
    assert (info.layout, info.output_shape, info.prefix, info.map_shape, info.stride) == \
        ("tokens", (197, 192), 1, (192, 14, 14), 16)
    assert catalog.get("patch_embed").prefix == 0  # before the class token is prepended
    assert catalog.get("patch_embed.proj").layout == "nchw"
    tokens = torch.randn(2, 197, 192, requires_grad=True)
    grid = catalog.as_map("blocks.11.norm1", tokens)
    assert grid.shape == (2, 192, 14, 14)
    assert torch.equal(grid[1, :, 3, 5], tokens[1, 1 + 3 * 14 + 5])
    # a linear selection: converting the gradient w.r.t. the tokens gives the gradient w.r.t. the map
    weight = torch.randn(2, 192, 14, 14)
    (g,) = torch.autograd.grad((grid * weight).sum(), tokens)
    assert torch.equal(catalog.as_map("blocks.11.norm1", g), weight) and g[:, 0].abs().max() == 0
    # attention internals (heads, T, d) are no grid of the input: not listed in the table
    assert catalog.get("blocks.0.attn.q_norm").stride is None
    assert "blocks.0.attn.q_norm" not in [r.name for r in catalog.table()]
    assert catalog.attention_above("blocks.11.norm1") == "blocks.11.attn"
    assert catalog.attention_above("norm") is None


def test_torchvision_vit(catalogs):
    _, catalog = catalogs("vit_b_16")
    info = catalog.get("encoder.layers.encoder_layer_11.ln_1")
    assert (info.layout, info.output_shape, info.prefix, info.map_shape) == ("tokens", (17, 768), 1, (768, 4, 4))
    assert catalog.get("conv_proj").layout == "nchw"


def test_nchw_as_map_is_the_same_tensor(catalogs):
    _, catalog = catalogs("resnet18")
    x = torch.randn(1, 512, 2, 2)
    assert catalog.as_map("layer4", x) is x


def test_layout_inference_rules():
    assert infer_layout((96, 56, 56), (224, 224)) == ("nchw", (96, 56, 56), 0, 4)
    assert infer_layout((56, 56, 96), (224, 224)) == ("nhwc", (96, 56, 56), 0, 4)
    assert infer_layout((56, 56, 56), (224, 224))[0] == "nchw"  # ambiguous → NCHW
    assert infer_layout((8, 16, 24), (128, 192)) == ("nchw", (8, 16, 24), 0, 8)  # aspect 2:3 in the last two
    assert infer_layout((16, 24, 64), (128, 192)) == ("nhwc", (64, 16, 24), 0, 8)
    assert infer_layout((3, 197, 64), (224, 224)) == ("nchw", (3, 197, 64), 0, None)  # no grid: stride None
    assert infer_layout((1000,), (224, 224))[0] is None
    assert token_grid(197, (224, 224)) == (1, 14, 14, 16)
    assert token_grid(198, (224, 224)) == (2, 14, 14, 16)  # class + distillation tokens
    assert token_grid(261, (224, 224)) == (5, 16, 16, 14)  # class + 4 registers, patch 14
    assert token_grid(281, (224, 320)) == (1, 14, 20, 16)
    assert grid_stride(113, 113, (225, 225)) == 2 and grid_stride(4, 4, (112, 112)) == 32
    assert grid_stride(147, 147, (299, 299)) == 2 and grid_stride(71, 71, (299, 299)) == 4  # unpadded convs
    assert grid_stride(5, 5, (64, 64)) is None and grid_stride(225, 225, (224, 224)) is None


def test_aliases_and_unknown_layers(catalogs):
    _, catalog = catalogs("resnet18")
    assert catalog.resolve("layer3") == "layer3" and catalog.resolve("STAGE2") == "layer1"
    with pytest.raises(UnknownLayerError) as info:
        catalog.resolve("stage9")
    message = str(info.value)
    assert "'stage9'" in message and "5 stages" in message and "stage5 = 'layer4'" in message
    with pytest.raises(UnknownLayerError) as info:
        catalog.resolve("layer5")
    message = str(info.value)
    assert "did you mean" in message and "'layer4'" in message and "stage1 = 'relu'" in message
    assert info.value.status == 400


def test_profile_stages_replace_the_discovered_ones(catalogs):
    from camserve.engine.models import EFFNET_LITE0

    _, catalog = catalogs("efficientnet_lite0")
    profiled = catalog.with_stages(EFFNET_LITE0.stages)
    assert profiled.stages() == list(EFFNET_LITE0.stages)
    assert profiled.resolve("stage4") == "_blocks.7" and catalog.resolve("stage4") == "_blocks.10"
    assert profiled.discovered_stages() == catalog.stages()
    with pytest.raises(UnknownLayerError):
        catalog.with_stages(["_blocks.99"])


def test_table_rows_and_text(catalogs):
    _, catalog = catalogs("timm_vit_tiny")
    rows = catalog.table()
    assert all(isinstance(r, LayerRow) for r in rows)
    norm1 = next(r for r in rows if r.name == "blocks.11.norm1")
    assert norm1 == LayerRow("blocks.11.norm1", "LayerNorm", "tokens", (192, 14, 14), 16, "")
    assert next(r for r in rows if r.name == "blocks.0").stage == "stage1"
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "layout", "shape", "(C×h×w)", "stride", "stage"]
    assert len(lines) == len(rows) + 1
    assert any(line.split() == ["blocks.0", "Block", "tokens", "192×14×14", "16", "stage1"] for line in lines)


def test_discovery_costs_one_probe_forward():
    model = _torchvision("resnet18")
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    try:
        catalog = LayerCatalog.trace(model, (64, 64))
    finally:
        handle.remove()
    assert calls == [torch.Size([1, 3, 64, 64])]
    assert catalog.output_shape == (1000,)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_cam_finds_the_classifier_the_pooled_map_feeds(catalogs):
    """CAM's classifier is the first Linear after the layer; MobileNetV3's is a hidden layer."""
    from camserve.engine.errors import NotAFeatureMapError
    from camserve.engine.methods.cam.cam import classifier_for

    model, catalog = catalogs("resnet18")
    assert classifier_for("layer4", catalog, model) is model.fc
    with pytest.raises(NotAFeatureMapError, match="reads 512 features"):
        classifier_for("layer3", catalog, model)
    model, catalog = catalogs("mobilenet_v3_small")
    with pytest.raises(NotAFeatureMapError, match="hidden layer"):
        classifier_for("features.12", catalog, model)
    model, catalog = catalogs("timm_convnext_atto")
    assert classifier_for("stages.3", catalog, model) is model.head.fc
