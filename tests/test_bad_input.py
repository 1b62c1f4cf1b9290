"""Bad params, unknown variants and bad annotations: a clear error, a non-zero exit, and
existing outputs left exactly as they were."""

from __future__ import annotations

import pytest

from helpers import edit_params, fmpipe, run_data_steps
from pipeline.config import load_params
from pipeline.errors import FmpipeError
from pipeline.io import sha256_file
from pipeline.runner import run_step


def test_unknown_key_names_its_path_and_the_allowed_keys(project):
    edit_params(lambda p: p["variants"]["digits"]["train"].update(max_epoch=3))
    with pytest.raises(FmpipeError) as err:
        load_params()
    message = str(err.value)
    assert "variants.digits.train.max_epoch: unknown key" in message
    assert "max_epochs" in message  # the key the user meant is among the suggestions


def test_wrong_type_names_key_and_value(project):
    edit_params(lambda p: p["variants"]["iris"]["train"].update(batch_size="sixteen"))
    with pytest.raises(FmpipeError, match=r"variants\.iris\.train\.batch_size: .*'sixteen'"):
        load_params()


def test_enabled_variant_must_be_defined(project):
    edit_params(lambda p: p["enabled"].append("imagenet"))
    with pytest.raises(FmpipeError, match="imagenet"):
        load_params()


def test_bad_params_key_fails_cli_and_leaves_outputs_untouched(project):
    run_step("collect", "iris")
    before = sha256_file("data/iris/collect/manifest.parquet")
    edit_params(lambda p: p["variants"]["iris"]["split"].update(sed=1))
    result = fmpipe("collect", "--stage", "iris")
    assert result.returncode != 0
    assert "variants.iris.split.sed: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    assert sha256_file("data/iris/collect/manifest.parquet") == before


def test_unknown_variant_lists_known_ones(project):
    result = fmpipe("collect", "--stage", "imagenet")
    assert result.returncode != 0
    assert "unknown variant 'imagenet'" in result.stderr
    assert "digits" in result.stderr and "iris" in result.stderr


@pytest.mark.parametrize(
    "row, expected",
    [
        ("iris/000,not-a-flower", "is not a class"),
        ("iris/999,setosa", "not in the cleaned dataset"),
        ("iris/000,7", "is not a class"),
    ],
)
def test_bad_annotation_row_is_an_error_and_keeps_previous_output(project, row, expected):
    run_data_steps("iris", "collect", "clean", "validate", "annotate")
    before = sha256_file("data/iris/annotate/manifest.parquet")
    with open("annotations/iris/labels.csv", "a") as fh:
        fh.write(row + "\n")
    result = fmpipe("annotate", "--stage", "iris")
    assert result.returncode != 0
    assert expected in result.stderr and "annotations/iris/labels.csv" in result.stderr
    assert sha256_file("data/iris/annotate/manifest.parquet") == before


def test_annotation_overrides_label_and_records_source(project):
    run_data_steps("iris", "collect", "clean", "validate")
    with open("annotations/iris/labels.csv", "a") as fh:
        fh.write("iris/000,versicolor,relabelled in review\n")
    report = run_step("annotate", "iris")
    assert report["overrides_applied"] == 1 and report["labels_changed"] == 1
    from pipeline.manifest import read_dataset

    m = read_dataset("data/iris/annotate").manifest.set_index("id")
    assert m.at["iris/000", "label_name"] == "versicolor"
    assert m.at["iris/000", "label_source"] == "annotation"
    assert m.at["iris/000", "source_label"] == 0
    assert (m.drop(index="iris/000")["label_source"] == "source").all()
