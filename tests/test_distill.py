"""Distillation (issue #27): a student of params.yaml's `distill` trained from its teacher's
softened outputs under `dvc repro`, with the teacher as a DVC dependency, and compared with
the teacher and with the same student trained without one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from helpers import edit_params, fmpipe, only_variants, sh
from pipeline.errors import FmpipeError

STUDENT = {"teacher": "digits", "model": {"name": "cnn_small", "options": {"width": 8}},
           "train": {"max_epochs": 8}, "temperature": 4.0, "weight": 0.9}


def test_distillation_loss_mixes_the_soft_and_hard_terms():
    import torch
    import torch.nn.functional as F

    from pipeline.training.module import distillation_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    hard = F.cross_entropy(student, y)
    assert torch.allclose(distillation_loss(student, teacher, hard, 4.0, 0.0), hard)
    # The soft term is T^2 times the per-row KL between the softened distributions ...
    p, q = F.softmax(teacher / 4, 1), F.softmax(student / 4, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(distillation_loss(student, teacher, hard, 4.0, 1.0), 16 * kl, atol=1e-6)
    # ... and vanishes when the student says what the teacher says.
    assert distillation_loss(teacher, teacher, torch.tensor(0.0), 2.0, 1.0).abs() < 1e-6


@pytest.mark.parametrize("distill, expected", [
    ({"digits": dict(STUDENT)}, "distill.digits: the name is a variant's too"),
    ({"small": {**STUDENT, "teacher": "cifar"}}, "distill.small.teacher: 'cifar' is not in enabled"),
    ({"small": {**STUDENT, "teacher": "nope"}}, "distill.small.teacher: 'nope' is no variant"),
    ({"small": {**STUDENT, "train": {"max_epoch": 3}}}, "distill.small.train.max_epoch: unknown key"),
    ({"small": {**STUDENT, "weight": 1.5}}, "distill.small.weight"),
    ({"../x": dict(STUDENT)}, "is not a valid variant name"),
])
def test_a_bad_student_is_one_line_naming_its_key(project, distill, expected):
    from pipeline.config import load_params

    edit_params(lambda p: p.update(distill=distill), project / "params.yaml")
    with pytest.raises(FmpipeError, match=expected.replace(".", r"\.").replace("(", r"\(")) as err:
        load_params(project / "params.yaml")
    assert "\n" not in str(err.value)


def test_a_student_inherits_its_teachers_recipe_with_its_own_changes(project):
    from pipeline.config import load_student

    edit_params(lambda p: p.update(distill={"small": STUDENT}), project / "params.yaml")
    student, spec = load_student("small", project / "params.yaml")
    assert student.teacher == "digits" and spec.model.options == {"width": 8}
    assert spec.train.max_epochs == 8 and spec.train.optimizer.lr == 0.005  # digits' lr kept
    listed = fmpipe("stages", cwd=project, check=True).stdout.splitlines()
    assert [line.split()[:4] for line in listed if line.startswith("small ")] == [["small", "student", "of", "digits"]]
    r = fmpipe("train", "--stage", "small", cwd=project)
    assert r.returncode == 1 and "distilled student" in r.stderr and "fmpipe distill --stage small" in r.stderr
    r = fmpipe("distill", "--stage", "digits", cwd=project)
    assert r.returncode == 1 and "unknown student 'digits'" in r.stderr and "Traceback" not in r.stderr


def test_dvc_distils_a_student_and_tracks_its_teacher(repro_copy):
    repo = only_variants(repro_copy, ["digits"])
    edit_params(lambda p: p.update(distill={"digits-small": STUDENT}), repo / "params.yaml")
    out = sh(repo, "dvc", "repro", "distill@digits-small").stdout
    assert "Running stage 'distill@digits-small'" in out and "train@digits" not in out.replace("'train@digits' didn't", "")
    d = repo / "data/digits-small/distill"
    c = json.loads((d / "comparison.json").read_text())
    teacher, student, baseline = (c["models"][k] for k in ("teacher", "student", "baseline"))
    assert c["teacher"] == "digits" and student["test_rows"] == teacher["test_rows"] > 300
    assert student["parameters"] < teacher["parameters"] / 5 and student["float32_mb"] < teacher["float32_mb"]
    assert student["accuracy"] > 0.85 and baseline["accuracy"] > 0.5
    # The teacher is scored as evaluate scored it (temperature scaling moves no argmax).
    evaluated = json.loads((repo / "data/digits/evaluate/metrics.json").read_text())
    assert teacher["accuracy"] == round(evaluated["accuracy"], 6) and teacher["test_rows"] == evaluated["n_test"]
    figures = json.loads((d / "figures.json").read_text())
    assert figures == {"digits-small": {"accuracy": student["accuracy"], "teacher_accuracy": teacher["accuracy"],
                                        "baseline_accuracy": baseline["accuracy"], "parameters": student["parameters"]}}
    meta = json.loads((d / "model.json").read_text())
    assert meta["distilled_from"] == {"teacher": "digits", "temperature": 4.0, "weight": 0.9}
    # The exported student answers as the torch one does.
    import onnxruntime as ort

    from pipeline.manifest import read_dataset
    from pipeline.models import load_trained

    net, _ = load_trained(d)
    ds = read_dataset(repo / "data/digits/annotate")
    x = ds.images[:64].transpose(0, 3, 1, 2).astype(np.float32)
    import torch

    with torch.inference_mode():
        want = net.eval()(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert (got.argmax(1) == want.argmax(1)).all()
    assert (d / "baseline/model.safetensors").is_file() and not (d / "train_summary.json").exists()
    # git keeps the comparison and the metric (uncached), nothing else of the student's.
    staged = sh(repo, "git", "status", "--porcelain", "--untracked-files=all", "data/digits-small").stdout.split()
    assert sorted(p for p in staged if p.startswith("data/")) == [
        "data/digits-small/distill/comparison.json", "data/digits-small/distill/figures.json"], staged

    # DVC tracks the teacher: its recipe changed, the student is stale with it; the student's
    # own settings re-run only the student.
    assert "up to date" in sh(repo, "dvc", "status", "distill@digits-small").stdout
    edit_params(lambda p: p["distill"]["digits-small"].update(weight=0.5), repo / "params.yaml")
    status = yaml.safe_load(sh(repo, "dvc", "status", "--json").stdout)
    assert set(status) == {"distill@digits-small"}, status
    edit_params(lambda p: p["variants"]["digits"]["train"].update(max_epochs=3), repo / "params.yaml")
    status = yaml.safe_load(sh(repo, "dvc", "status", "--json").stdout)
    assert {"train@digits", "distill@digits-small"} <= set(status), status
