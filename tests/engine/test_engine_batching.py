"""Batching, targets, one forward per batch, no leaks, thread safety and device placement."""

from __future__ import annotations

import gc
import threading
import tracemalloc

import pytest
import torch
from torch import nn

from camserve.engine import Explainer, ExplainSpec
from camserve.engine.pipeline import model_device


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not m._backward_pre_hooks for m in model.modules())


def tiny_model() -> nn.Module:
    """A small conv net with BN, ReLU, max pool, a residual-free head: fast enough for 1,000 batches."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def effnet_explainer(effnet):
    return Explainer(effnet)


# -- targets and batching -----------------------------------------------------------------------
MIXED = [
    ExplainSpec("gradcam", "_conv_head", None),  # top-1
    ExplainSpec("shallowcam", "_blocks.2", 7),  # explicit index
    ExplainSpec("layercam", "_blocks.4", "top2"),  # top-k: two maps
    ExplainSpec("shallowcam", "_blocks.2", [1, 2], {"spatial": "relevance", "refine": True}),  # a list
]


def test_mixed_methods_and_targets_equal_one_image_at_a_time(effnet_explainer, effnet, effnet_batch):
    """N images, N different methods/layers/targets in one call: each image's maps equal those of
    that image explained alone; the logits are those of a plain forward."""
    images = effnet_batch[0][:len(MIXED)]
    batched = effnet_explainer.explain(images, MIXED)
    with torch.no_grad():
        plain = effnet(images)
    assert torch.allclose(batched.logits, plain, atol=1e-4)
    assert batched.logits.argmax(1).tolist() == plain.argmax(1).tolist()
    top = plain.topk(2, dim=1).indices
    expected_targets = [[top[0, 0].item()], [7], top[2].tolist(), [1, 2]]
    assert [e.targets for e in batched.explanations] == expected_targets
    for i, spec in enumerate(MIXED):
        alone = effnet_explainer.explain(images[i:i + 1], [spec]).explanations[0]
        mine = batched.explanations[i]
        assert mine.maps.shape == (len(expected_targets[i]), 224, 224) == alone.maps.shape
        error = (mine.maps - alone.maps).abs().max().item()
        assert error < 1e-3, f"{spec.method} image {i}: batched vs alone differ by {error:.2e}"
        assert mine.method == spec.method and mine.layer == spec.layer
        assert mine.passes["forward"] == 1
    # top-k gives distinct maps per class
    assert (batched.explanations[2].maps[0] - batched.explanations[2].maps[1]).abs().max() > 1e-3


def test_prediction_only_rows_and_output_options(effnet_explainer, effnet_batch):
    images = effnet_batch[0][:2]
    result = effnet_explainer.explain(images, [None, ExplainSpec("gradcam", "_blocks.2")],
                                      output_size=(100, 80), dtype=torch.float16)
    assert result.explanations[0] is None
    maps = result.explanations[1].maps
    assert maps.shape == (1, 100, 80) and maps.dtype == torch.float16
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    at_layer = effnet_explainer.explain(images[1:], [ExplainSpec("gradcam", "_blocks.2")], layer_resolution=True)
    assert at_layer.explanations[0].maps.shape == (1, 56, 56) == (1, *at_layer.explanations[0].layer_shape)
    only = effnet_explainer.explain(images, [None, None])
    assert only.explanations == [None, None] and only.logits.shape == (2, 1000)


def test_one_forward_per_batch(effnet_explainer, effnet, effnet_batch):
    """A forward pre-hook on the root model counts its calls: one per explained batch, whatever
    the mix of gradient and relevance methods and of top-k rounds."""
    calls = []
    handle = effnet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        images = effnet_batch[0][:len(MIXED)]
        effnet_explainer.explain(images, MIXED)
        assert calls == [len(MIXED)]
        calls.clear()
        effnet_explainer.explain(images[:1], [ExplainSpec("shallowcam", "_blocks.2", "top2")])
        assert calls == [1]
    finally:
        handle.remove()


def test_graph_rows_explains_in_chunks_with_one_forward_per_image(effnet, effnet_explainer, effnet_batch):
    """``graph_rows=3`` on a batch of 4: forwards of 3 and 1 rows (each image once), the
    same logits and maps as the whole batch up to float rounding, and every spec validated before
    the first forward (a bad spec in the last chunk runs nothing)."""
    from camserve.engine import InvalidTargetError

    chunked = Explainer(effnet, graph_rows=3)
    images = effnet_batch[0][:len(MIXED)]
    whole = effnet_explainer.explain(images, MIXED)
    calls = []
    handle = effnet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        parts = chunked.explain(images, MIXED)
        assert calls == [3, 1]
        calls.clear()
        bad = list(MIXED[:-1]) + [ExplainSpec("gradcam", target=10_000)]
        with pytest.raises(InvalidTargetError):
            chunked.explain(images, bad)
        assert calls == []
    finally:
        handle.remove()
    assert torch.allclose(parts.logits, whole.logits, atol=1e-4)
    for a, b in zip(parts.explanations, whole.explanations):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.method, a.layer, a.targets) == (b.method, b.layer, b.targets)
            assert (a.maps - b.maps).abs().max() < 1e-3
            assert a.batch_seconds >= a.seconds
    assert no_hooks(effnet)
    with pytest.raises(ValueError, match="graph_rows"):
        Explainer(effnet, graph_rows=0)


# -- hygiene: hooks and memory ------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contention on a shared CI box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_thousand_batches_leave_no_hook_and_no_growth(one_thread):
    """Before the fix, each capture leaked with its whole autograd graph: the switches' ctx held
    the capture, the capture held the activations, the activations held the switches (a cycle
    through C++ autograd nodes that ``gc`` cannot collect) — about 2 MB of Python heap per 900
    batches here, plus the tensors."""
    model = tiny_model()
    explainer = Explainer(model, input_size=(12, 12))
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    cycle = [
        [ExplainSpec("shallowcam", "3", None), ExplainSpec("gradcam", "7", 3)],
        [ExplainSpec("relevancecam", "5", "top2"), ExplainSpec("layercam", "0", None)],
        [ExplainSpec("gradcampp", "8", 1), None],
        [ExplainSpec("shallowcam", "0", None, {"refine": True, "spatial": "relevance"}), ExplainSpec("cam", "8", 2)],
    ]

    def run(n):
        for i in range(n):
            result = explainer.explain(images, cycle[i % len(cycle)])
            assert torch.isfinite(result.logits).all()

    run(100)  # warm-up: allocator pools, lazy imports
    gc.collect()
    tracemalloc.start()
    rss_before = _rss_bytes()
    python_before, _ = tracemalloc.get_traced_memory()
    run(900)
    gc.collect()
    python_after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = _rss_bytes() - rss_before
    print(f"1000 batches: python heap +{(python_after - python_before) / 1e3:.1f} kB, RSS +{rss_growth / 1e6:.1f} MB")
    assert no_hooks(model)
    assert python_after - python_before < 256 * 1024
    assert rss_growth < 32 * 1024 * 1024
    assert not any(p.grad is not None for p in model.parameters())


def test_hooks_removed_when_explain_fails_midway(effnet_explainer, effnet, effnet_batch):
    """An error raised in the middle of the forward (a module that fails) leaves no hook of the
    explainer behind."""
    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = dict(effnet.named_modules())["_blocks.5"].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            effnet_explainer.explain(effnet_batch[0][:1], [ExplainSpec("shallowcam", "_blocks.2")])
    finally:
        handle.remove()
    assert no_hooks(effnet)


# -- threads ------------------------------------------------------------------------------------
def test_concurrent_threads_get_the_sequential_maps(one_thread):
    """Two threads explaining on one shared model (LRP rules evaluate modified weights) and a third
    running plain predictions get exactly what a sequential run gets, and the model's weights are
    untouched afterwards."""
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    explainer = Explainer(model, input_size=(16, 16))
    generator = torch.Generator().manual_seed(1)
    batches = [torch.rand(2, 3, 16, 16, generator=generator) for _ in range(4)]
    specs = [[ExplainSpec("shallowcam", "0", None), ExplainSpec("relevancecam", "3", 4)],
             [ExplainSpec("gradcam", "7", None), ExplainSpec("shallowcam", "3", "top2")]]
    expected = {(b, s): explainer.explain(batches[b], specs[s]) for b in range(4) for s in range(2)}
    with torch.no_grad():
        expected_logits = [model(b) for b in batches]
    failures, rounds = [], 40

    def explain_worker(offset):
        try:
            for i in range(rounds):
                b, s = (i + offset) % 4, (i // 4 + offset) % 2
                result = explainer.explain(batches[b], specs[s])
                reference = expected[(b, s)]
                if not torch.allclose(result.logits, reference.logits, atol=1e-6):
                    failures.append(f"logits differ in thread {offset}, round {i}")
                for mine, ref in zip(result.explanations, reference.explanations):
                    if mine.targets != ref.targets or not torch.allclose(mine.maps, ref.maps, atol=1e-6):
                        failures.append(f"{mine.method} differs in thread {offset}, round {i}")
        except Exception as error:  # pragma: no cover - reported below
            failures.append(repr(error))

    def predict_worker():
        for i in range(rounds * 2):
            if not torch.allclose(explainer.predict(batches[i % 4]), expected_logits[i % 4], atol=1e-6):
                failures.append(f"prediction differs, round {i}")

    threads = [threading.Thread(target=explain_worker, args=(k,)) for k in (0, 1)]
    threads.append(threading.Thread(target=predict_worker))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert no_hooks(model)


# -- device -------------------------------------------------------------------------------------
def test_device_follows_the_model_parameters(effnet_explainer, effnet_batch):
    # against literal devices, not against the function under test
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")  # parameter-free: the CPU
    explainer = Explainer(tiny_model(), input_size=(16, 16))
    assert explainer.device == torch.device("cpu")
    explainer.model.to("meta")  # the explainer reads the device from the parameters, it does not cache it
    assert explainer.device == torch.device("meta")
    result = effnet_explainer.explain(effnet_batch[0][:1], [ExplainSpec("layercam", "_blocks.2")])
    assert effnet_explainer.device == torch.device("cpu")
    assert result.logits.device == torch.device("cpu") and result.explanations[0].maps.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_maps_match_cpu_and_stay_on_the_device():
    model = tiny_model()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    specs = [ExplainSpec("gradcam", "7", None), ExplainSpec("shallowcam", "3", 2), ExplainSpec("relevancecam", "0", "top2")]
    on_cpu = Explainer(model, input_size=(16, 16)).explain(images, specs)
    gpu_model = tiny_model().cuda()
    explainer = Explainer(gpu_model, input_size=(16, 16))
    assert explainer.device.type == "cuda"
    on_gpu = explainer.explain(images.cuda(), specs)
    assert on_gpu.logits.device.type == "cuda"
    assert torch.allclose(on_gpu.logits.cpu(), on_cpu.logits, atol=1e-4)
    for mine, ref in zip(on_gpu.explanations, on_cpu.explanations):
        assert mine.maps.device.type == "cuda"
        assert mine.targets == ref.targets
        assert (mine.maps.cpu() - ref.maps).abs().max() < 1e-3


# -- timing ---------------------------------------------------------------------------------------
def test_each_row_reports_its_share_of_the_batch_time_not_the_whole(effnet_explainer, effnet_batch):
    batch = effnet_batch[0]
    specs = [ExplainSpec("gradcam", "_conv_head")] * 2 + [ExplainSpec("layercam", "_blocks.2")] * 2 + [None] * 4
    result = effnet_explainer.explain(batch, specs)
    explained = [e for e in result.explanations if e is not None]
    total = explained[0].batch_seconds
    assert total > 0 and all(e.batch_seconds == total for e in explained)
    # each row: the forward / 8 images + its part of the passes and of its method's maps
    assert all(0 < e.seconds < total for e in explained)
    assert sum(e.seconds for e in explained) < total  # the plain rows' forward share is nobody's explanation
    assert all(e.seconds > result.forward_seconds / 8 for e in explained)


def test_handler_setting_graph_rows_is_checked_at_load():
    """``handler.graph_rows`` in model-config.yaml: a positive integer, else the worker refuses to load."""
    from camserve.serving.settings import HandlerSettings

    assert HandlerSettings.from_model_config({"handler": {"graph_rows": 4}}).graph_rows == 4
    assert HandlerSettings.from_model_config({"handler": {}}).graph_rows is None
    for bad in (0, -1, "4", True, 2.5):
        with pytest.raises(ValueError, match="handler.graph_rows"):
            HandlerSettings.from_model_config({"handler": {"graph_rows": bad}})
