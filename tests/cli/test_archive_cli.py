"""``camserve archive`` and ``camserve layers`` as a user runs them: good specs build a ``.mar`` whose
``model-config.yaml`` carries the spec; bad ones stop before archiving with the reason."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

REPO = Path(__file__).resolve().parents[2]
CAMSERVE = REPO / ".venv" / "bin" / "camserve"


def camserve(*args, cwd):
    return subprocess.run([str(CAMSERVE), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp("archive")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path / "r18.pt")
    (path / "labels.json").write_text(json.dumps({"0": "ant", "1": "bee", "2": "wasp"}))
    return path


def test_archive_writes_the_spec_and_the_label_map(work):
    done = camserve("archive", "insects", "--source", "torchvision", "--arch", "resnet18", "--num-classes", "3",
                    "--weights", "r18.pt", "--labels", "labels.json", "--method-layer", "shallowcam=stage2",
                    "--method-option", "shallowcam.temperature=4", "--method-option", "ShallowCAM.beta_from=auto",
                    "--export-path", "store", cwd=work)
    assert done.returncode == 0, done.stderr
    assert "checked insects: classify: 3 classes" in done.stdout
    with zipfile.ZipFile(work / "store" / "insects.mar") as mar:
        names = set(mar.namelist())
        config = yaml.safe_load(mar.read("model-config.yaml"))
        labels = json.loads(mar.read("index_to_name.json"))
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    assert {"r18.pt", "classifier_handler.py", "camserve/engine/models/loader.py"} <= names
    assert config["handler"]["model"] == {"source": "torchvision", "arch": "resnet18", "num_classes": 3,
                                          "task": "classify"}
    assert config["handler"]["method_layers"] == {"shallowcam": "stage2"}
    assert config["handler"]["method_options"] == {"shallowcam": {"temperature": "4", "beta_from": "auto"}}
    assert config["batchSize"] == 8 and config["responseTimeout"] == 120
    assert labels == {"0": "ant", "1": "bee", "2": "wasp"}
    assert manifest["model"]["serializedFile"] == "r18.pt"


def test_torchscript_is_refused_before_archiving(work):
    torch.jit.save(torch.jit.script(torchvision.models.resnet18(num_classes=3).eval()), str(work / "ts.pt"))
    done = camserve("archive", "scripted", "--source", "torchvision", "--arch", "resnet18", "--num-classes", "3",
                    "--weights", "ts.pt", "--export-path", "store", cwd=work)
    assert done.returncode != 0
    assert "TorchScript" in done.stderr and "state dict" in done.stderr
    assert not (work / "store" / "scripted.mar").exists()


def test_misfit_weights_are_refused_naming_keys(work):
    done = camserve("archive", "wrong", "--source", "torchvision", "--arch", "resnet34", "--num-classes", "3",
                    "--weights", "r18.pt", "--export-path", "store", cwd=work)
    assert done.returncode != 0
    assert "missing keys: layer1.2." in done.stderr
    assert not (work / "store" / "wrong.mar").exists()


def test_unknown_arch_and_source(work):
    done = camserve("archive", "x", "--source", "torchvision", "--arch", "resnet51", "--export-path", "store", cwd=work)
    assert done.returncode != 0 and "unknown torchvision classification architecture 'resnet51'" in done.stderr
    done = camserve("archive", "x", "--source", "keras", "--export-path", "store", cwd=work)
    assert done.returncode != 0 and "invalid choice: 'keras'" in done.stderr


def test_a_model_with_no_feature_map_is_refused(work):
    (work / "mlp.py").write_text("from torch import nn\n\n\nclass MLP(nn.Module):\n"
                                 "    def __init__(self):\n        super().__init__()\n"
                                 "        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))\n\n"
                                 "    def forward(self, x):\n        return self.net(x)\n")
    done = camserve("archive", "mlp", "--source", "eager", "--model-file", "mlp.py", "--preprocess", "crop=32",
                    "--export-path", "store", cwd=work)
    assert done.returncode != 0
    assert "feature map" in done.stderr


def test_an_lrp_default_on_a_vit_is_refused(work):
    done = camserve("archive", "vit", "--source", "timm", "--arch", "vit_tiny_patch16_224", "--num-classes", "3",
                    "--default-method", "shallowcam", "--export-path", "store", cwd=work)
    assert done.returncode != 0
    assert "cannot serve this model" in done.stderr


def test_archive_takes_the_lrp_composite_and_canonizer(work):
    """What the lab measures (composites, BN folding) can be deployed: written to handler.composite /
    handler.canonizer after the worker's own check; a bad one is refused with the reason."""
    done = camserve("archive", "folded", "--source", "torchvision", "--arch", "resnet18", "--num-classes", "3",
                    "--weights", "r18.pt", "--composite", "epsilon_alpha2_beta1", "--canonizer", "fold_bn",
                    "--export-path", "store", cwd=work)
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(work / "store" / "folded.mar") as mar:
        handler = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
    assert (handler["composite"], handler["canonizer"]) == ("epsilon_alpha2_beta1", "fold_bn")
    bad = camserve("archive", "badlrp", "--source", "torchvision", "--arch", "resnet18", "--num-classes", "3",
                   "--composite", "nonsense", "--export-path", "store", cwd=work)
    assert bad.returncode != 0 and "handler.composite" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (work / "store" / "badlrp.mar").exists()


@pytest.mark.parametrize("option,fragment", [("shallowcam.temperature=0", "positive number"),
                                             ("shallowcam.beta_from=above", "no layer above"),
                                             ("ig.steps=8", "not a CAM-family method"),
                                             ("temperature=4", "METHOD.OPTION=VALUE")])
def test_a_bad_default_method_option_is_refused_with_the_reason(work, option, fragment):
    """Defaults are checked as the worker would use them: ``beta_from=above`` at the last stage
    (the default layer here) has no layer above it."""
    done = camserve("archive", "badopt", "--source", "torchvision", "--arch", "resnet18", "--num-classes", "3",
                    "--method-layer", "shallowcam=stage5", "--method-option", option, "--export-path", "store",
                    cwd=work)
    assert done.returncode != 0
    assert fragment in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (work / "store" / "badopt.mar").exists()


def test_layers_prints_stages_and_default(work):
    done = camserve("layers", "--source", "torchvision", "--arch", "resnet18", "--num-classes", "3",
                    "--weights", "r18.pt", cwd=work)
    assert done.returncode == 0, done.stderr
    assert "default layer: layer4" in done.stdout
    assert "stage1=relu, stage2=layer1, stage3=layer2, stage4=layer3, stage5=layer4" in done.stdout


def test_layers_names_what_is_wrong_with_a_spec_without_a_traceback(work):
    done = camserve("layers", "--source", "eager", "--model-file", str(REPO / "examples" / "cifar_resnet" / "model.py"),
                    cwd=work)
    assert done.returncode != 0
    assert "defines 3 nn.Module classes" in done.stderr and "class_name" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_bundled_config_serves_its_calibration_and_ships_the_card(tmp_path):
    """configs/effnet_lite0.yaml's defaults are its calibration card's ``served`` section; archive.sh's
    ``--calibrate`` puts the card in the .mar; a ``--config`` naming a card (``handler.calibration``,
    relative to the config's folder) does the same, and a missing one stops the archive with its path."""
    config = yaml.safe_load((REPO / "configs" / "effnet_lite0.yaml").read_text())["handler"]
    card_path = REPO / "benchmarks" / "results" / "calibration_effnet_lite0_200.json"
    card = json.loads(card_path.read_text())
    served = card["served"]
    assert config["default_method"] == served["default_method"] and "calibration" not in config
    assert {m: config["method_layers"][m] for m in served["method_layers"]} == served["method_layers"]
    assert not served["method_options"] and "method_options" not in config
    assert f"--calibrate {card_path.relative_to(REPO)}" in (REPO / "archive.sh").read_text()
    from camserve.engine.models import effnet_lite0_weights_path
    weights = effnet_lite0_weights_path()
    named = tmp_path / "named"
    named.mkdir()
    (named / "card.json").write_text(card_path.read_text())
    (named / "model-config.yaml").write_text(yaml.safe_dump({"handler": {**config, "calibration": "card.json"}}))
    for name, flags in (("bycalibrate", ["--config", REPO / "configs" / "effnet_lite0.yaml", "--calibrate", card_path]),
                        ("byconfig", ["--config", named / "model-config.yaml"])):
        done = camserve("archive", name, *flags, "--weights", weights, "--no-check", "--export-path", "store",
                        cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        with zipfile.ZipFile(tmp_path / "store" / f"{name}.mar") as mar:
            assert json.loads(mar.read("calibration.json")) == card
            handler = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
        assert handler["calibration"] == "calibration.json" and handler["default_method"] == "layercam"
        assert handler["method_layers"] == {"layercam": "_blocks.0", "gradcam": "_conv_head", "shallowcam": "_blocks.4"}
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"handler": {"calibration": "nowhere.json"}}))
    done = camserve("archive", "nocard", "--config", broken, "--weights", weights, "--no-check",
                    "--export-path", "store", cwd=tmp_path)
    assert done.returncode != 0 and "nowhere.json" in done.stderr and "handler.calibration" in done.stderr


def test_an_embedding_task_layer_the_route_cannot_reach_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"handler": {"task_layers": {"pair": "stage99"}}}))
    done = camserve("archive", "badlayer", "--task", "embed", "--config", "config.yaml", "--export-path", "store",
                    cwd=tmp_path)
    assert done.returncode != 0 and "handler.task_layers.pair" in done.stderr and "stage99" in done.stderr
    assert not (tmp_path / "store" / "badlayer.mar").exists()
