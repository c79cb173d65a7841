"""``camserve calibrate`` end to end on the pretrained CIFAR ResNet-20 and real CIFAR-10 test JPEGs:
the model card (JSON + self-contained HTML) and its choices, the early-elimination record, the
OpenVINO curve forward against the eager model, ``camserve archive --calibrate`` (the card
in the .mar, the chosen defaults in model-config.yaml), the calibrated score in a served answer (the
real handler, in-process), and bad inputs → a clear message and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch
import yaml

from camserve.cli.main import main
from camserve.engine.evaluation.metrics import class_probabilities, gaussian_blur, perturbation_curves, source_scores
from camserve.engine.runtime.openvino_forward import openvino_available
from camserve.lab.curve_forward import CurveForward
from camserve.lab.evaluate_faithfulness import load_batch, load_cifar_resnet
from camserve.serving.answer import ExplanationAnswer
from camserve.serving.local import handle_rows, handler_class, setup_from_mar, worker_context

from byo_archives import REPO, RESNET20, SHARED, camserve

CIFAR = SHARED / "data" / "cifar10-test"
MODEL = ["--source", "eager", "--model-file", str(REPO / "examples" / "cifar_resnet" / "model.py"),
         "--class-name", "CifarResNet", "--kwargs", '{"depth": 20}', "--weights", str(RESNET20),
         "--preprocess", "crop=32"]
N_IMAGES = 20  # a seeded sample of the 5,000 JPEGs: 10 per half
SLICE = 5  # two elimination slices of the choose half
CANDIDATES = "layercam,gradcam,sc[rel+soft@T4]"  # three of the five: the test stays short

pytestmark = pytest.mark.skipif(not (RESNET20.is_file() and CIFAR.is_dir()), reason="shared CIFAR data/model absent")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    work = tmp_path_factory.mktemp("calibrate")
    out = work / "card"
    done = camserve("calibrate", *MODEL, "--data", str(CIFAR), "--max-images", str(N_IMAGES), "--out", str(out),
                    "--candidates", CANDIDATES, "--eliminate-slice", str(SLICE),
                    "--threads", "2", cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    card = json.loads((out / "calibration.json").read_text())
    return work, out, card, done.stdout


def test_the_model_card_records_a_choice_per_stage_on_the_choose_half(calibrated):
    _work, out, card, stdout = calibrated
    assert "[choose 1/" in stdout and "[report 1/" in stdout  # progress shown
    assert card["format"] == "camserve-calibration/1" and card["n"]["choose"] == card["n"]["report"] == N_IMAGES // 2
    assert card["protocol"]["steps"] >= 16 and card["protocol"]["checks"] == "CDR"
    assert [s["stage"] for s in card["stages"]] == ["stage1", "stage2", "stage3"]
    assert [s["layer"] for s in card["stages"]] == ["layer1", "layer2", "layer3"]
    for stage in card["stages"]:
        rows, chosen = stage["choose"], stage["chosen"]
        assert set(rows) == set(card["protocol"]["candidates"]) == set(CANDIDATES.split(","))
        passing = {n: r["overall"] for n, r in rows.items() if r["passed"] and "eliminated" not in r}
        assert chosen["name"] == max(passing, key=passing.get)  # the most faithful surviving reading passing the checks
        assert rows["layercam"]["vs_layercam"] == 0 and "C" in rows["layercam"]["checks"]
        report, base = stage["report"], stage["layercam_report"]
        assert report["n"] == N_IMAGES // 2 and report["wins"] + report["losses"] <= report["n"]
        # the paired difference is the difference of the means on the same images
        assert report["vs_layercam"] == pytest.approx(report["overall"] - base["overall"], abs=1e-9)
        assert report["sem"] >= 0 and -1 <= report["rho12"] <= 1
        assert set(stage["curves"]) == {chosen["name"], "layercam"}
        assert len(stage["curves"]["layercam"]["deletion_zero"]) == card["protocol"]["steps"] + 1
    best = max(card["stages"], key=lambda s: s["choose"][s["chosen"]["name"]]["overall"])
    assert card["served"]["default_method"] == best["chosen"]["method"]
    assert card["served"]["method_layers"][best["chosen"]["method"]] == best["layer"]
    assert len(card["scores"]) == 3
    page = (out / "calibration.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "http" not in page.replace("http-equiv", "")
    for stage in card["stages"]:
        assert stage["chosen"]["name"] in page


def test_the_card_records_what_was_eliminated_when_and_by_how_much(calibrated):
    _work, _out, card, stdout = calibrated
    elimination = card["protocol"]["elimination"]
    assert elimination["slice_images"] == SLICE and elimination["z"] == 3
    z, half = elimination["z"], N_IMAGES // 2
    eliminated = [e for s in card["stages"] for e in s["eliminated"]]
    assert eliminated, "the seeded 10-image choose half eliminates at least one reading after 5 images"
    for stage in card["stages"]:
        for entry in stage["eliminated"]:
            row = stage["choose"][entry["name"]]
            assert row["eliminated"] == entry and row["n"] == entry["after_images"] == SLICE
            assert entry["name"] not in ("layercam", entry["best"]) and stage["chosen"]["name"] != entry["name"]
            assert f"{entry['name']} eliminated after {SLICE} images" in stdout
            if entry["reason"].startswith("below"):  # clearly behind the best: mean(d) + z·SEM(d) < 0
                assert entry["vs_best"] + z * entry["sem"] < 0
            else:
                assert entry["reason"].startswith("clearly fails check")
        for name, row in stage["choose"].items():
            assert row["n"] == (SLICE if "eliminated" in row else half)
    assert card["timing"]["image_jobs"]["choose"] < 3 * 3 * half  # fewer (image, reading) units than without
    assert set(card["timing"]["parts_seconds"]) >= {"endpoints", "explain_seconds", "curve_seconds",
                                                   "randomisation_seconds"}


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO (the fast extra) not installed")
def test_openvino_curve_forward_agrees_with_the_eager_model():
    """The curves' step images scored by OpenVINO and by the eager model (inference mode): the same
    curves within float rounding, on real CIFAR-10 images and the pretrained ResNet-20."""
    model = load_cifar_resnet(str(RESNET20), 20, "cpu")
    files = [f"{c}/{n:04d}.jpg" for c in ("cat", "ship", "truck") for n in (0, 2)]
    images = load_batch("cifar", CIFAR, files, "cpu")
    fast, eager = CurveForward(model, (32, 32), "cpu"), CurveForward(model, (32, 32), "cpu", use_openvino="off")
    assert fast.name == "openvino" and eager.name == "eager", fast.describe()
    with torch.inference_mode():
        top2 = model(images).topk(2, dim=1).indices
    maps = torch.rand(len(files), 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(images, 9, 2.0)
    curves = {}
    for forward in (fast, eager):
        score = class_probabilities(forward, top2)
        fixed = source_scores(score, images, blurred, batch_size=4)
        curves[forward.name] = perturbation_curves(score, images, maps, steps=16, batch_size=32, blurred=blurred,
                                                   tie_seed=0, fixed=fixed)
    for kind, values in curves["eager"].items():
        assert values.shape == (len(files), 17, 2)
        assert torch.allclose(curves["openvino"][kind], values, atol=1e-4), kind


def test_archive_calibrate_serves_the_calibrated_defaults_and_score(calibrated):
    work, out, card, _ = calibrated
    done = camserve("archive", "r20cal", *MODEL, "--calibrate", str(out), "--export-path", str(work / "store"),
                    cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    mar = work / "store" / "r20cal.mar"
    with zipfile.ZipFile(mar) as archive:
        assert json.loads(archive.read("calibration.json")) == card
        handler = yaml.safe_load(archive.read("model-config.yaml"))["handler"]
    served = card["served"]
    assert handler["calibration"] == "calibration.json"
    assert handler["default_method"] == served["default_method"]
    assert handler["method_layers"] == served["method_layers"]
    assert handler.get("method_options", {}) == served["method_options"]

    setup = setup_from_mar(str(mar))
    try:
        served_handler = handler_class(setup.task)()
        served_handler.initialize(worker_context(setup, 8, None))
        photo = (CIFAR / "cat" / "0000.jpg").read_bytes()
        scored = {(s["method"], s["layer"]): s for s in card["scores"]}
        rows = [{"data": photo, "explain": "1"}]  # the default method at its calibrated layer
        # each calibrated reading as a client names it: method, layer and the reading's options
        rows += [{"data": photo, "explain": s["chosen"]["method"], "layer": s["layer"], **s["chosen"]["options"]}
                 for s in card["stages"]]
        uncalibrated = next((m, l) for m in ("layercam", "gradcampp", "gradcam")
                            for l in ("layer1", "layer2", "layer3") if (m, l) not in scored)
        rows.append({"data": photo, "explain": uncalibrated[0], "layer": uncalibrated[1]})
        replies = handle_rows(served_handler, setup, None, [(row, {}, f"r{i}") for i, row in enumerate(rows)])
        answers = [json.loads(r.body)["explanation"] for r in replies]
        assert all(r.status == 200 for r in replies)
        for answer in answers[:-1]:
            score = scored[(answer["method"], answer["layer"])]
            assert answer["calibration"] == {k: score[k] for k in ("overall", "vs_layercam", "sem", "n")}
        assert answers[0]["method"] == served["default_method"]
        assert answers[0]["layer"] == served["method_layers"][served["default_method"]]
        assert "calibration" not in answers[-1]  # a reading nobody calibrated carries no score
        tensors = ExplanationAnswer.from_json(answers[0]).to_v2_tensors()  # the KServe v2 door carries it too
        assert json.loads(tensors["calibration"].data[0]) == answers[0]["calibration"]
        assert "calibration" not in ExplanationAnswer.from_json(answers[-1]).to_v2_tensors()
    finally:
        shutil.rmtree(setup.model_dir, ignore_errors=True)


def exit_message(argv, capsys) -> str:
    """``camserve`` in-process: the message of the non-zero exit it must end with."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code not in (0, None)
    return str(stopped.value.code) + capsys.readouterr().err


def test_bad_inputs_exit_with_a_clear_message(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in exit_message(["calibrate", *MODEL, "--data", str(empty), "--out", str(tmp_path / "o")],
                                       capsys)
    few = tmp_path / "few"
    few.mkdir()
    for name in sorted(p.name for p in (CIFAR / "dog").iterdir())[:6]:
        shutil.copy(CIFAR / "dog" / name, few / name)
    message = exit_message(["calibrate", *MODEL, "--data", str(few), "--out", str(tmp_path / "o")], capsys)
    assert "6 images" in message and "needs at least 8" in message
    message = exit_message(["calibrate", *MODEL, "--data", str(CIFAR), "--out", str(tmp_path / "o"),
                            "--layers", "stage3", "--candidates", "sc[rel+plain+refine]"], capsys)
    assert "stage 'layer3': no candidate applies" in message
    assert "at least 16 steps" in exit_message(["calibrate", *MODEL, "--data", str(CIFAR), "--out",
                                                str(tmp_path / "o"), "--steps", "8"], capsys)
    assert not (tmp_path / "o").exists()  # nothing written for a calibration that could not run


def test_archive_refuses_a_calibration_of_another_model(calibrated, tmp_path, capsys):
    _work, out, _card, _ = calibrated
    other = [a if a != '{"depth": 20}' else '{"depth": 56}' for a in MODEL if a != str(RESNET20)]
    other.remove("--weights")
    message = exit_message(["archive", "r56", *other, "--calibrate", str(out), "--no-check",
                            "--export-path", str(tmp_path)], capsys)
    assert "the calibration is of another model" in message and "depth" in message
    assert "no calibration.json" in exit_message(["archive", "r20", *MODEL, "--calibrate", str(tmp_path),
                                                  "--export-path", str(tmp_path)], capsys)
