"""The runtime: memory format chosen at load, the OpenVINO fast path for plain and head-CAM rows.

Real pretrained models (EfficientNet-Lite0, CIFAR ResNet-20) and real photographs. The fast path's
maps must equal the eager engine's within ``MAP_TOLERANCE`` (OpenVINO's float32 convolutions differ
from PyTorch's in the last bits: about 1e-6 on these maps) with the same top-k; every other row stays
on the eager engine in the same call.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from camserve.engine import Explainer, ExplainSpec
from camserve.engine.models import load_effnet_lite0
from camserve.engine.runtime import RuntimeSettings, build_fast_path, choose_memory_format, format_of
from camserve.engine.runtime.head import trace_head

#: the largest difference allowed between a fast-path map and the eager engine's (maps in [0, 1])
MAP_TOLERANCE = 1e-3
SIZE = (224, 224)


@pytest.fixture(scope="module")
def served():
    """A fresh EfficientNet-Lite0 (the session's shared one is not mutated), its explainer and fast path."""
    model = load_effnet_lite0()
    explainer = Explainer(model, SIZE)
    fast, why = build_fast_path(model, explainer.default_layer, SIZE, RuntimeSettings(), torch.device("cpu"))
    assert fast is not None, why
    return explainer, fast


def explain_both(explainer, fast, images, specs):
    explainer.use_fast_path(None)
    eager = explainer.explain(images, specs, layer_resolution=True)
    explainer.use_fast_path(fast)
    try:
        quick = explainer.explain(images, specs, layer_resolution=True)
    finally:
        explainer.use_fast_path(None)
    return eager, quick


def assert_same(eager, quick):
    assert torch.equal(eager.logits.topk(5).indices, quick.logits.topk(5).indices)
    assert (eager.logits - quick.logits).abs().max() <= 1e-3 * eager.logits.abs().max()
    for a, b in zip(eager.explanations, quick.explanations):
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert (a.method, a.layer, a.targets, a.layer_shape, a.passes) == (b.method, b.layer, b.targets,
                                                                         b.layer_shape, b.passes)
        assert (a.maps - b.maps).abs().max() <= MAP_TOLERANCE, a.method


def test_head_is_rebuilt_from_the_model_modules(served):
    explainer, fast = served
    assert fast.layer == explainer.default_layer == "_conv_head"
    assert fast.head is not None and fast.head.names == ["_bn1", "_swish", "_avg_pooling", "_dropout", "_fc"]
    assert "probe difference" in fast.describe()


def test_fast_path_maps_equal_the_eager_engine(served, effnet_batch):
    explainer, fast = served
    images = effnet_batch[0][:6]
    specs = [None, ExplainSpec("cam"), ExplainSpec("gradcam"), ExplainSpec("gradcampp"),
             ExplainSpec("layercam", target="top2"), ExplainSpec("gradcam", target=7)]
    eager, quick = explain_both(explainer, fast, images, specs)
    assert quick.paths == ["openvino"] * 6 and eager.path(0) == "eager"
    assert_same(eager, quick)
    assert quick.explanations[4].passes == {"forward": 1, "backward": 2, "relevance": 0}


def test_other_rows_stay_on_the_eager_engine_in_the_same_call(served, effnet_batch):
    explainer, fast = served
    images = effnet_batch[0][:5]
    specs = [ExplainSpec("shallowcam", layer="stage2"), None, ExplainSpec("gradcam", layer="stage3"),
             ExplainSpec("relevancecam"), ExplainSpec("layercam")]
    eager, quick = explain_both(explainer, fast, images, specs)
    assert quick.paths == ["eager", "openvino", "eager", "eager", "openvino"]
    assert_same(eager, quick)
    batch_seconds = {e.batch_seconds for e in quick.explanations if e is not None}
    assert len(batch_seconds) == 1  # every row waited for the whole call


def test_concurrent_calls_share_no_state(served, effnet_batch):
    explainer, fast = served
    images = effnet_batch[0][:4]
    specs = [ExplainSpec("gradcam"), None, ExplainSpec("layercam"), ExplainSpec("cam")]
    explainer.use_fast_path(fast)
    expected = explainer.explain(images, specs, layer_resolution=True)
    results, errors = [], []

    def run(order):
        try:
            got = explainer.explain(images[order], [specs[i] for i in order], layer_resolution=True)
            results.append((order, got))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
    threads = [threading.Thread(target=run, args=(order,)) for order in ([0, 1, 2, 3], [3, 2, 1, 0]) * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    explainer.use_fast_path(None)
    assert not errors and len(results) == 6
    for order, got in results:
        for k, i in enumerate(order):
            assert torch.allclose(got.logits[k], expected.logits[i], atol=1e-5)
            if specs[i] is not None:
                assert torch.allclose(got.explanations[k].maps, expected.explanations[i].maps, atol=1e-5)


def test_channels_last_gives_the_same_maps(effnet_batch):
    model = load_effnet_lite0()
    images = effnet_batch[0][:3]
    specs = [ExplainSpec("shallowcam", layer="stage2"), ExplainSpec("gradcam", layer="stage4"), None]
    contiguous = Explainer(model, SIZE).explain(images, specs, layer_resolution=True)
    choice = choose_memory_format(model, SIZE, "channels_last")
    assert choice.name == "channels_last" and format_of(model) == torch.channels_last
    channels_last = Explainer(model, SIZE).explain(images, specs, layer_resolution=True)
    assert_same(contiguous, channels_last)


def test_the_probe_measures_both_formats():
    model = load_effnet_lite0()
    choice = choose_memory_format(model, SIZE, "auto", batch_sizes=(1,), rounds=1)
    assert choice.name in ("contiguous", "channels_last") and set(choice.measured) == {"contiguous", "channels_last"}
    assert all(seconds > 0 for seconds in choice.measured.values())
    assert format_of(model) == choice.torch_format


def test_a_cifar_resnet_head_with_a_functional_pool(resnet20):
    model, images = resnet20
    explainer = Explainer(model, (32, 32))
    head, reason, _ = trace_head(model, explainer.default_layer, (32, 32))
    fast, why = build_fast_path(model, explainer.default_layer, (32, 32), RuntimeSettings(), torch.device("cpu"))
    assert fast is not None, why
    if head is None:  # functional pooling: not a chain of modules; CAM still runs fast, Grad-CAM eager
        assert "chain" in reason or "reproduce" in reason
        assert not fast.serves(explainer._plan(0, ExplainSpec("gradcam")))
    specs = [ExplainSpec("cam"), ExplainSpec("gradcam"), None, ExplainSpec("shallowcam", layer="stage1")]
    eager, quick = explain_both(explainer, fast, images[:4], specs)
    assert_same(eager, quick)
    assert quick.path(2) == "openvino" and quick.path(3) == "eager"


class SkipHead(nn.Module):
    """A head with a skip connection around its linear layer: not a chain of modules."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        pooled = torch.flatten(self.pool(self.conv(x)), 1)
        return self.fc(pooled) + pooled


def test_a_head_that_is_not_a_chain_is_refused_with_the_reason():
    head, reason, _ = trace_head(SkipHead().eval(), "conv", (16, 16))
    assert head is None and "do not reproduce" in reason


def test_settings_and_refusals():
    assert RuntimeSettings.from_mapping(None) == RuntimeSettings()
    with pytest.raises(ValueError, match="unknown key"):
        RuntimeSettings.from_mapping({"fast": "yes"})
    with pytest.raises(ValueError, match="memory_format"):
        RuntimeSettings.from_mapping({"memory_format": "nhwc"})
    model = load_effnet_lite0()
    off = RuntimeSettings(fast_path="off")
    assert build_fast_path(model, "_conv_head", SIZE, off, torch.device("cpu"))[0] is None
    auto = build_fast_path(model, "_conv_head", SIZE, RuntimeSettings(), torch.device("meta"))
    assert auto[0] is None and "runs on CPUs" in auto[1]
    with pytest.raises(RuntimeError, match="fast_path=openvino"):
        build_fast_path(model, "_conv_head", SIZE, RuntimeSettings(fast_path="openvino"), torch.device("meta"))


def test_embedding_maps_from_the_runtime_and_relevance_from_the_backbone(effnet_batch):
    from camserve.engine import FamExplainer, FamSpec
    from camserve.engine.models.embedding import load_effnet_lite0_embedding
    from camserve.engine.runtime.embedding_features import fast_features

    model = load_effnet_lite0_embedding()
    explainer = FamExplainer(model, None, SIZE)
    images = effnet_batch[0][:2]
    specs = [FamSpec(reference_image=images[1]), FamSpec(reference_image=images[0], layer="stage2")]
    eager = explainer.explain(images, specs)
    features, why = fast_features(model, SIZE, RuntimeSettings(), torch.device("cpu"))
    assert features is not None, why
    model.fast_features = features
    quick = explainer.explain(images, specs)
    assert torch.allclose(eager.embeddings, quick.embeddings, atol=1e-5)
    for a, b in zip(eager.items, quick.items):
        assert (a.route, a.layer) == (b.route, b.layer)
        assert abs(a.similarity - b.similarity) <= 1e-5
        assert (a.query_map - b.query_map).abs().max() <= MAP_TOLERANCE
    assert quick.items[1].route == "relevance"  # the backbone's own modules ran under the capture
