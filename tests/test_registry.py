"""The step registry (pipeline/steps.py) and dvc.yaml say the same thing, and the runner keeps its promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import steps as registry

REPO = Path(__file__).resolve().parents[1]


def _entries(items) -> dict[str, dict]:
    """dvc.yaml's out/metric/plot list as {path: props}."""
    out = {}
    for item in items or []:
        if isinstance(item, str):
            out[item] = {}
        else:
            (path, props), = item.items()
            out[path] = dict(props or {})
    return out


# How dvc.yaml names a step's own variant, and the variant its inputs come from: a student
# step (foreach over the `distill` mapping) is the entry's key, its inputs its teacher's.
_NAMES = {"enabled": ("${item}", "${item}"), "distill": ("${key}", "${item.teacher}")}


def _expected(step: registry.Step) -> dict[str, dict[str, dict]]:
    own = _NAMES[step.over][0]
    sections: dict[str, dict[str, dict]] = {"outs": {}, "metrics": {}, "plots": {}}
    for path, out in step.out_paths():
        props = {} if out.cache else {"cache": False}
        if out.persist:
            props["persist"] = True
        props.update(out.plot)
        sections[{"out": "outs", "metric": "metrics", "plot": "plots"}[out.kind]][path.replace("{v}", own)] = props
    return sections


def _expected_deps(step: registry.Step) -> set[str]:
    own, inputs = _NAMES[step.over]
    reads = {f"{registry.DATA}/{r}".replace("{v}", inputs) for r in step.reads}
    return {*step.code, *reads, *(s.replace("{v}", own) for s in step.sources)}


def _expected_params(step: registry.Step) -> set[str]:
    own, inputs = _NAMES[step.over]
    owner = "${key}" if step.over == "distill" else None
    return {*(f"variants.{inputs}.{p}" for p in step.params), *([f"distill.{owner}"] if owner else [])}


def dvc_stages(text: str) -> dict:
    return yaml.safe_load(text)["stages"]


def stage_entry(step: registry.Step) -> str:
    """The registry's ``dvc.yaml`` entry for ``step``, as YAML to paste (a new step's stage)."""
    item = lambda p: p.replace("{v}", "${item}")  # noqa: E731
    do: dict = {"cmd": f"fmpipe {step.name} --stage ${{item}}", "deps": [item(d) for d in step.dep_paths()]}
    if step.params:
        do["params"] = [f"variants.${{item}}.{p}" for p in step.params]
    for section, entries in _expected(step).items():
        if entries:
            do[section] = [{p: props} if props else p for p, props in entries.items()]
    return yaml.safe_dump({"stages": {step.name: {"foreach": "${enabled}", "do": do}}}, sort_keys=False)


def disagreements(dvc_yaml: str) -> list[str]:
    stages = dvc_stages(dvc_yaml)
    problems = []
    # The variants' lifecycle in its order, then the student steps.
    students = [s.name for s in registry.STUDENT_STEPS]
    lifecycle = [n for n in stages if n not in students]
    if lifecycle != list(registry.ORDER) or [n for n in stages if n in students] != students:
        problems.append(f"stage order {list(stages)} != registry {[*registry.ORDER, *students]}")
    for step in (*registry.STEPS, *registry.STUDENT_STEPS):
        stage = stages.get(step.name)
        if stage is None:
            problems.append(f"{step.name}: not in dvc.yaml; its entry:\n{stage_entry(step)}")
            continue
        assert stage["foreach"] == f"${{{step.over}}}"
        do = stage["do"]
        if do["cmd"] != f"fmpipe {step.name} --stage {_NAMES[step.over][0]}":
            problems.append(f"{step.name}: cmd {do['cmd']!r}")
        deps = _expected_deps(step)
        if set(do.get("deps") or []) != deps:
            problems.append(f"{step.name}: deps differ: dvc.yaml only {sorted(set(do.get('deps') or []) - deps)}, "
                            f"registry only {sorted(deps - set(do.get('deps') or []))}")
        params = _expected_params(step)
        if set(do.get("params") or []) != params:
            problems.append(f"{step.name}: params {sorted(do.get('params') or [])} != {sorted(params)}")
        for section, expected in _expected(step).items():
            if _entries(do.get(section)) != expected:
                problems.append(f"{step.name}: {section} {_entries(do.get(section))} != {expected}")
    return problems


def test_dvc_yaml_agrees_with_the_registry():
    problems = disagreements((REPO / "dvc.yaml").read_text())
    assert not problems, "dvc.yaml and pipeline/steps.py disagree:\n" + "\n".join(problems)


@pytest.mark.parametrize("edit", [
    lambda t: t.replace("        - stages/clean.py\n", "", 1),                      # a dep dropped
    lambda t: t.replace("variants.${item}.clean", "variants.${item}.split", 1),   # a params section
    lambda t: t.replace("data/${item}/evaluate/blessing.json\n", "data/${item}/evaluate/verdict.json\n", 1),
    lambda t: t.replace("fmpipe train --stage", "fmpipe fit --stage", 1),
])
def test_the_check_fails_when_dvc_yaml_changes_alone(edit):
    text = (REPO / "dvc.yaml").read_text()
    changed = edit(text)
    assert changed != text
    assert disagreements(changed)


def test_a_new_step_fails_the_check_with_its_dvc_yaml_entry(monkeypatch):
    text = (REPO / "dvc.yaml").read_text()
    new = registry.Step(name="example_step", help="", module="stages.example_step", reads=("annotate",),
                        code=("stages/example_step.py",), params=("example_step",))
    monkeypatch.setattr(registry, "STEPS", (*registry.STEPS, new))
    monkeypatch.setattr(registry, "ORDER", (*registry.ORDER, "example_step"))
    problem = next(p for p in disagreements(text) if p.startswith("example_step: not in dvc.yaml"))
    entry = problem.split("\n", 1)[1]
    # Pasted into dvc.yaml, the entry satisfies the check.
    assert disagreements(text + entry.split("stages:\n", 1)[1]) == []
    assert "cmd: fmpipe example_step --stage ${item}" in entry and "- data/${item}/annotate" in entry


def test_the_check_fails_when_the_registry_changes_alone(monkeypatch):
    text = (REPO / "dvc.yaml").read_text()
    clean = registry.get("clean")
    monkeypatch.setattr(registry, "STEPS", tuple(
        registry.Step(**{**s.__dict__, "code": (*s.code, "pipeline/extra.py")}) if s is clean else s
        for s in registry.STEPS))
    assert any("clean: deps differ" in p for p in disagreements(text))


def test_cli_lists_exactly_the_registered_steps_in_order():
    from typer.main import get_command

    from pipeline.cli import app

    # list_commands: the order `fmpipe --help` shows (review is a sub-app, for `review import`).
    names = list(get_command(app).list_commands(None))
    assert names[:len(registry.ORDER)] == list(registry.ORDER)


def test_upstream_is_transitive_and_in_lifecycle_order():
    up = registry.upstream_of("package")
    # package's lineage covers the data, the model and its evaluation, in lifecycle order...
    assert {"collect", "clean", "validate", "annotate", "train", "evaluate"} <= set(up)
    assert up == [s for s in registry.ORDER if s in up]
    # ...and nothing that reads package or only the trained model (review never reads package).
    assert not {"package", "dist", "review", "report"} & set(up)
    assert registry.upstream_of("dist") == [*up, "package"]
    assert registry.upstream_of("collect") == []


def test_a_missing_input_names_the_command_that_writes_it(project):
    from helpers import fmpipe

    result = fmpipe("clean", "--stage", "iris")
    assert (result.returncode, result.stderr.splitlines()) == (1, [
        "fmpipe clean --stage iris: error: data/iris/collect: not a dataset directory (no dataset.json); "
        "run `fmpipe collect --stage iris` first"])


def test_hints_and_paths_come_from_the_registry():
    """Hints name the step that writes an output; paths are the registry's, for any variant."""
    from pipeline.runner import StepContext

    assert registry.rerun_hint("evaluate/blessing.json", "v") == "run `fmpipe evaluate --stage v` first"
    assert registry.rerun_hint("package", "v", then="again") == "run `fmpipe package --stage v` again"
    assert registry.output("train/model.json", "v").as_posix() == "data/v/train/model.json"
    assert registry.get("dist").path("v").as_posix() == "data/v/dist"
    ctx = StepContext(registry.get("package"), "v", "params.yaml", None, Path("unused"))
    assert ctx.rerun("train/model.safetensors") == "run `fmpipe train --stage v` first"
    with pytest.raises(KeyError, match="does not declare 'review'"):
        ctx.rerun("review")  # a hint only for what the step reads
    assert registry.DATASET_STEPS == tuple(s.name for s in registry.STEPS if s.writes_dataset)
    with pytest.raises(KeyError, match="unknown step 'no_such_step'"):
        registry.rerun_hint("no_such_step", "v")


def test_confusion_plot_has_actual_on_y_like_the_report_png():
    """DVC's Vega confusion matrix and the report's PNG agree: actual down the side, predicted across."""
    from pipeline import steps as registry

    out = next(o for o in registry.get("evaluate").outs if o.path == "confusion.csv")
    assert (out.plot["x"], out.plot["y"]) == ("predicted", "actual")
def code_drift(steps=None) -> list[str]:
    """Differences between each step's declared code deps and what its module imports."""
    from pipeline.imports import code_deps, expand, schema_files

    steps = steps or (*registry.STEPS, *registry.STUDENT_STEPS)
    by_name = {s.name: s for s in steps}
    problems = []
    for step in steps:
        expected = code_deps(step.module)
        if step.name == "package":  # depends on every upstream step's code too (lineage), and on
            for up in registry.upstream_of("package"):  # every section's defaults (its params record)
                expected |= code_deps(by_name[up].module)
            expected |= schema_files()
        declared = expand(step.code)
        if declared != expected:
            problems.append(f"{step.name}: imports but does not declare {sorted(expected - declared)}; "
                            f"declares but does not import {sorted(declared - expected)}")
    return problems


def test_code_deps_are_what_each_step_imports():
    """dvc.yaml's code deps (equal to the registry's, test above) are computed from imports."""
    assert code_drift() == []


def test_the_import_check_fails_on_a_missing_or_extra_code_dep():
    evaluate = registry.get("evaluate")
    # The issue #21 case: evaluate without the module that holds the TTA views.
    dropped = registry.Step(**{**evaluate.__dict__,
                               "code": tuple(c for c in evaluate.code if c != "pipeline/inference/tta.py")})
    (problem,) = code_drift([dropped])
    assert "pipeline/inference/tta.py" in problem
    extra = registry.Step(**{**evaluate.__dict__, "code": (*evaluate.code, "pipeline/audit/diff.py")})
    assert "declares but does not import ['pipeline/audit/diff.py']" in code_drift([extra])[0]


def test_no_import_runs_back_up_the_layers():
    """Every package of pipeline/ (and each top-level module) sits on a level below all that
    import it: no two units import each other, lazily or not (the inference <-> packaging
    loop of issue #23 was one)."""
    from pipeline.imports import levels, unit_imports

    graph = unit_imports()
    level = levels(graph)  # raises, naming the cycle, when there is one
    for a, imported in graph.items():
        for b in imported:
            assert level[b] < level[a], f"{a} (level {level[a]}) imports {b} (level {level[b]})"
    # The glue is the top: no library module imports a stage.
    assert all("stages" not in imported for a, imported in graph.items() if a != "stages")
    assert level["pipeline.errors"] == 1 and level["pipeline.filenames"] == 1


def test_no_two_modules_import_each_other():
    """File by file too (inside a package: the report's page and its sections were one loop).
    A package's own ``__init__``, which importing any of its modules runs, is left aside."""
    from pipeline.imports import direct_imports, levels, project_modules

    levels({m: {d for d in direct_imports(m) if not m.startswith(d + ".")} for m in project_modules()})


def test_the_layer_check_names_a_cycle():
    from pipeline.imports import levels

    with pytest.raises(ValueError, match="pipeline.inference -> pipeline.packaging -> pipeline.inference"):
        levels({"pipeline.inference": {"pipeline.packaging"}, "pipeline.packaging": {"pipeline.inference"}})
