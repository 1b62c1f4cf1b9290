"""People's label decisions: read them from ``annotations/<variant>/``, resolve them, apply them.

Where decisions live: ``annotations/<variant>/`` (a dvc.yaml dependency of annotate), in git:

- Label Studio JSON exports, dropped in as exported (``fmpipe review import FILE --stage V``
  checks and copies one): a list of tasks, each with ``data.fmpipe_id`` (written by the review
  step's ``label_studio_tasks.json``) and ``annotations[]``, each annotation with
  ``result[]`` (a ``choices`` result from the ``label`` control: one class name, or ``drop``;
  an optional ``textarea`` result is the note), ``completed_by`` (a user id, or an object with
  ``id``/``email``), ``was_cancelled``, ``created_at``/``updated_at``.
- CSV files with header ``id,label[,note][,annotator][,annotated_at]``; ``label`` is a class
  name, a class index, or ``drop``.

A decision about one item is a *vote*: ``relabel`` or ``confirm`` (the chosen class differs
from, or equals, the label the item has before annotation) or ``drop`` (a duplicate, or
unusable). The rules, applied in this order:

1. Cancelled (skipped) Label Studio annotations and annotations with no choice are ignored
   (counted in the report).
2. One vote per annotator per item: an annotator's latest vote (by ``annotated_at``) replaces
   their earlier ones. This also makes a project exported twice (the same annotations in two
   files) count once.
3. Majority over the remaining votes; a tie goes to the option whose latest vote is the latest.
   A vote without a timestamp (a CSV row with no ``annotated_at``) counts as older than every
   dated one; equal times fall back to file name, then position (deterministic).

Every applied decision is recorded on its row (``label_source``, ``previous_label``,
``decision``, ``annotator``, ``annotated_at``, ``decision_file``) and, with all its votes,
in the annotate report.

Policy on bad decisions: an unknown id, an unknown class, or a malformed file is an error that
names the file and line (annotate stops; its previous output stays). A decision about an id that
clean removed is a warning, listed in the report as ``skipped_removed_by_clean`` with clean's
reason: the item is already out of the dataset for a recorded reason, so there is nothing to
apply, and an old export must not block the pipeline.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from pipeline.errors import FmpipeError
from pipeline.reading import nested_too_deeply, read_text, short_repr

DROP = "drop"
CHOICES_CONTROL = "label"  # the <Choices name="..."> of the label config the review step writes
NOTE_CONTROL = "note"
TASK_ID_KEY = "fmpipe_id"  # key in a Label Studio task's ``data`` naming the dataset row
CSV_COLUMNS = ("id", "label", "note", "annotator", "annotated_at")
IGNORED_FILES = (".gitkeep", "README.md", ".gitignore")
POOL_DIR = "pool"  # production inputs waiting for labels (pipeline/review/pool.py), not decisions

PROVENANCE_COLUMNS = ("label_source", "previous_label", "decision", "annotator", "annotated_at",
                      "decision_file")


@dataclass(frozen=True)
class Vote:
    """One person's decision about one item, as read from one place in one file."""

    id: str
    label: Optional[int]  # class index; None when ``drop``
    drop: bool
    annotator: str
    annotated_at: str  # ISO 8601 as written in the file; "" when unknown
    file: str
    where: str  # "file:line" (and task/annotation index for JSON), for messages
    position: int  # order within the file, for deterministic tie-breaks
    note: str = ""

    @property
    def option(self) -> str:
        """What the vote chooses, as a comparable key: a class index or ``drop``."""
        return DROP if self.drop else str(self.label)


@dataclass
class ReadStats:
    files: list[str]
    votes: int = 0
    cancelled_ignored: int = 0
    empty_ignored: int = 0
    tasks_without_annotations: int = 0


# ---------------------------------------------------------------- reading files

def read_decisions(directory: str | os.PathLike, classes: list[str]) -> tuple[list[Vote], ReadStats]:
    """Every vote in ``directory`` (``*.json`` Label Studio exports, ``*.csv``), in file order.

    A missing directory means no decisions. Any other file is an error: a decision someone
    dropped in must never be ignored silently.
    """
    directory = Path(directory)
    stats = ReadStats(files=[])
    votes: list[Vote] = []
    if not directory.exists():
        return votes, stats
    if not directory.is_dir():
        raise FmpipeError(f"{directory}: expected a directory of decision files (Label Studio JSON exports, CSV)")
    for path in sorted(p for p in directory.iterdir()):
        if path.name in IGNORED_FILES or path.name.startswith(".") or (path.name == POOL_DIR and path.is_dir()):
            continue
        suffix = path.suffix.lower()
        expected = f"Label Studio JSON exports *.json or id,label,note *.csv in {directory}/"
        if path.is_dir() or suffix not in (".json", ".csv"):
            raise FmpipeError(f"{path}: not a decision file (expected {expected})")
        text = read_text(path, expected)
        if suffix == ".json":
            found = parse_label_studio_export(text, str(path), classes, stats)
        else:
            found = parse_decisions_csv(text, str(path), classes)
        stats.files.append(str(path))
        votes.extend(found)
    stats.votes = len(votes)
    return votes, stats


def parse_decisions_csv(text: str, file: str, classes: list[str]) -> list[Vote]:
    """Votes from an ``id,label[,note][,annotator][,annotated_at]`` CSV (line numbers 1-based)."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise FmpipeError(f"{file}: empty file (expected a header line: id,label,note)") from None
    except csv.Error as exc:
        raise FmpipeError(f"{file}:1: not readable CSV: {exc}") from None
    header = [h.strip() for h in header]
    if header[:2] != ["id", "label"] or any(h not in CSV_COLUMNS for h in header) or len(set(header)) != len(header):
        raise FmpipeError(
            f"{file}:1: expected columns id,label[,note][,annotator][,annotated_at], got {','.join(header)}"
        )
    votes: list[Vote] = []
    seen: dict[str, int] = {}
    default_annotator = f"csv:{Path(file).name}"
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                raise FmpipeError(f"{file}:{line}: {len(row)} fields, the header has {len(header)}")
            rec = dict(zip(header, (cell.strip() for cell in row)))
            id_ = rec.get("id", "")
            if not id_:
                raise FmpipeError(f"{file}:{line}: empty id")
            if id_ in seen:
                raise FmpipeError(f"{file}:{line}: id {id_!r} is annotated twice (first on line {seen[id_]})")
            seen[id_] = line
            label, drop = parse_choice(rec.get("label", ""), classes, f"{file}:{line}", id_, allow_index=True)
            when = rec.get("annotated_at", "")
            if when:
                _parse_time(when, f"{file}:{line}")
            votes.append(Vote(id=id_, label=label, drop=drop, annotator=rec.get("annotator") or default_annotator,
                              annotated_at=when, file=file, where=f"{file}:{line}", position=len(votes),
                              note=rec.get("note", "")))
    except csv.Error as exc:
        raise FmpipeError(f"{file}:{reader.line_num}: not readable CSV: {exc}") from None
    return votes


def parse_choice(value: str, classes: list[str], where: str, id_: str,
                 allow_index: bool = False) -> tuple[Optional[int], bool]:
    """A decision's label: ``(class index, False)`` or ``(None, True)`` for ``drop``."""
    value = value.strip()
    if value == DROP:
        return None, True
    if value in classes:
        return classes.index(value), False
    if allow_index and value.isdigit() and int(value) < len(classes):
        return int(value), False
    accepted = f"a class name in {classes}" + (f", an index 0..{len(classes) - 1}" if allow_index else "")
    raise FmpipeError(f"{where}: label {value!r} for id {id_!r} is not a class (expected {accepted}, or {DROP!r})")


def parse_label_studio_export(text: str, file: str, classes: list[str],
                              stats: Optional[ReadStats] = None) -> list[Vote]:
    """Votes from a Label Studio JSON export (the full "JSON" format, a list of tasks)."""
    stats = stats if stats is not None else ReadStats(files=[])
    votes: list[Vote] = []
    for t_index, (task, line) in enumerate(_top_level_items(text, file)):
        where = f"{file}:{line}: task {t_index}"
        if not isinstance(task, dict):
            raise FmpipeError(f"{where}: expected a task object, got {type(task).__name__}")
        data = task.get("data")
        if not isinstance(data, dict):
            if "annotations" not in task and TASK_ID_KEY in task:
                raise FmpipeError(f"{where}: looks like Label Studio's JSON-MIN export; export as JSON instead")
            raise FmpipeError(f"{where}: no 'data' object (expected a Label Studio JSON export)")
        id_ = data.get(TASK_ID_KEY)
        if id_ is None or id_ == "":
            raise FmpipeError(
                f"{where}: data.{TASK_ID_KEY} is missing (tasks must come from the review step's "
                "label_studio_tasks.json)"
            )
        if not isinstance(id_, str):
            # Ids are strings in the contract; a number here was retyped or converted by some
            # tool, and str(3) might not be the id the task was made for ("003", "row/3").
            raise FmpipeError(
                f"{where}: data.{TASK_ID_KEY} is {type(id_).__name__} {short_repr(id_, 40)}, expected a string "
                "(the id exactly as in the review step's label_studio_tasks.json)"
            )
        where = f"{where} (id {id_})"
        annotations = task.get("annotations", [])
        if not isinstance(annotations, list):
            raise FmpipeError(f"{where}: 'annotations' must be a list")
        if not annotations:
            stats.tasks_without_annotations += 1
        for a_index, ann in enumerate(annotations):
            a_where = f"{where}, annotation {a_index}"
            if not isinstance(ann, dict):
                raise FmpipeError(f"{a_where}: expected an object")
            if ann.get("was_cancelled"):
                stats.cancelled_ignored += 1
                continue
            choice, note = _read_result(ann.get("result"), a_where)
            if choice is None:
                stats.empty_ignored += 1
                continue
            label, drop = parse_choice(choice, classes, a_where, id_)
            when = str(ann.get("updated_at") or ann.get("created_at") or "")
            if when:
                _parse_time(when, a_where)
            votes.append(Vote(id=id_, label=label, drop=drop, annotator=_annotator(ann.get("completed_by"), a_where),
                              annotated_at=when, file=file, where=a_where, position=len(votes), note=note))
    return votes


def _read_result(result: Any, where: str) -> tuple[Optional[str], str]:
    if result is None:
        return None, ""
    if not isinstance(result, list):
        raise FmpipeError(f"{where}: 'result' must be a list")
    choice: Optional[str] = None
    note = ""
    for r in result:
        if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
            raise FmpipeError(f"{where}: each result needs a 'value' object")
        value = r["value"]
        if r.get("type") == "choices" or "choices" in value:
            if r.get("from_name", CHOICES_CONTROL) != CHOICES_CONTROL:
                continue  # another control of a customised config: not the label decision
            chosen = value.get("choices")
            if not isinstance(chosen, list) or len(chosen) != 1 or not isinstance(chosen[0], str):
                raise FmpipeError(f"{where}: expected exactly one choice in value.choices, got {chosen!r}")
            if choice is not None:
                raise FmpipeError(f"{where}: two '{CHOICES_CONTROL}' choices in one annotation")
            choice = chosen[0]
        elif r.get("type") == "textarea" and r.get("from_name", NOTE_CONTROL) == NOTE_CONTROL:
            text = value.get("text")
            note = " ".join(text) if isinstance(text, list) else str(text or "")
    return choice, note


def _annotator(completed_by: Any, where: str) -> str:
    if isinstance(completed_by, dict):
        email = completed_by.get("email")
        if email:
            return str(email)
        completed_by = completed_by.get("id")
    if isinstance(completed_by, (int, str)) and not isinstance(completed_by, bool) and str(completed_by):
        return f"label-studio-user:{completed_by}"
    raise FmpipeError(f"{where}: 'completed_by' is missing (who made this annotation?)")


def _parse_time(value: str, where: str) -> datetime:
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FmpipeError(f"{where}: timestamp {value!r} is not ISO 8601") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _top_level_items(text: str, file: str) -> list[tuple[Any, int]]:
    """The elements of a top-level JSON list, each with the line it starts on."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip(pos: int) -> int:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def fail(pos: int, what: str) -> FmpipeError:
        line = text.count("\n", 0, pos) + 1
        return FmpipeError(f"{file}:{line}: not a Label Studio JSON export: {what}")

    pos = skip(0)
    if pos >= n or text[pos] != "[":
        raise fail(pos, "expected a list of tasks ('[' at the start)")
    items: list[tuple[Any, int]] = []
    pos = skip(pos + 1)
    if pos < n and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise FmpipeError(f"{file}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
            except RecursionError:
                raise nested_too_deeply(f"{file}:{text.count(chr(10), 0, pos) + 1}") from None
            items.append((obj, text.count("\n", 0, pos) + 1))
            pos = skip(end)
            if pos < n and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < n and text[pos] == "]":
                pos += 1
                break
            raise fail(pos, "expected ',' or ']' after a task")
    if skip(pos) != n:
        raise fail(pos, "text after the closing ']'")
    return items


# ---------------------------------------------------------------- resolving votes

@dataclass(frozen=True)
class Resolution:
    id: str
    label: Optional[int]
    drop: bool
    rule: str  # "single" | "unanimous" | "majority" | "tie, latest wins"
    winners: tuple[Vote, ...]  # the votes for the chosen option, oldest first
    votes: tuple[Vote, ...]  # every counted vote (one per annotator)
    superseded: int  # older votes of the same annotators, replaced by their latest

    @property
    def latest(self) -> Vote:
        return self.winners[-1]


def _order_key(v: Vote) -> tuple:
    # Undated votes sort before every dated one; then file name, then position in the file.
    when = _parse_time(v.annotated_at, v.where) if v.annotated_at else None
    return (when is not None, when or datetime.min.replace(tzinfo=timezone.utc), v.file, v.position)


def resolve(votes: Iterable[Vote]) -> dict[str, Resolution]:
    """One decision per item from its votes (rules 2 and 3 of the module docstring)."""
    by_id: dict[str, list[Vote]] = {}
    for v in votes:
        by_id.setdefault(v.id, []).append(v)
    out: dict[str, Resolution] = {}
    for id_, vs in by_id.items():
        vs = sorted(vs, key=_order_key)
        latest_per_annotator: dict[str, Vote] = {}
        for v in vs:  # in time order, so the last one written per annotator is their latest
            latest_per_annotator[v.annotator] = v
        counted = sorted(latest_per_annotator.values(), key=_order_key)
        tally: dict[str, list[Vote]] = {}
        for v in counted:
            tally.setdefault(v.option, []).append(v)
        top = max(len(group) for group in tally.values())
        leaders = [opt for opt, group in tally.items() if len(group) == top]
        if len(leaders) == 1:
            option = leaders[0]
            rule = "single" if len(counted) == 1 else ("unanimous" if len(tally) == 1 else "majority")
        else:
            option = max(leaders, key=lambda o: _order_key(tally[o][-1]))
            rule = "tie, latest wins"
        winners = tuple(tally[option])
        first = winners[0]
        out[id_] = Resolution(id=id_, label=first.label, drop=first.drop, rule=rule, winners=winners,
                              votes=tuple(counted), superseded=len(vs) - len(counted))
    return out


# ---------------------------------------------------------------- applying decisions

def apply_decisions(manifest: pd.DataFrame, classes: list[str], resolutions: dict[str, Resolution],
                    removed_by_clean: Optional[dict[str, str]] = None,
                    root: str | os.PathLike = ".") -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """Apply resolved decisions to a manifest (clean's). Pure: returns new data, changes nothing.

    Returns ``(manifest with provenance columns, keep mask, findings)``. Rows without a
    decision keep every value; ``keep`` is False for dropped rows (the caller takes them out
    of the payload too). ``findings`` has every count and change for the report. An id that
    is neither in the manifest nor in ``removed_by_clean`` is an error naming where the
    decision was written.
    """
    removed_by_clean = removed_by_clean or {}
    m = manifest.copy()
    n = len(m)
    row_of = {id_: row for row, id_ in enumerate(m["id"].astype(str))}

    skipped, unknown = [], []
    for id_, res in resolutions.items():
        if id_ in row_of:
            continue
        if id_ in removed_by_clean:
            skipped.append({"id": id_, "clean_reason": removed_by_clean[id_],
                            "decision_files": sorted({_rel(v.file, root) for v in res.votes})})
        else:
            unknown.append(res)
    if unknown:
        first = min((v for r in unknown for v in r.votes), key=lambda v: (v.file, v.position))
        more = f" (and {len(unknown) - 1} more unknown id(s))" if len(unknown) > 1 else ""
        raise FmpipeError(f"{first.where}: id {first.id!r} is not in the cleaned dataset (and clean did not remove it){more}")

    labels = m["label"].to_numpy().astype(np.int64).copy()
    source_label = labels.copy()
    label_source = np.array(["source"] * n, dtype=object)
    previous = [pd.NA] * n
    decision: list[Any] = [pd.NA] * n
    annotator: list[Any] = [pd.NA] * n
    annotated_at: list[Any] = [pd.NA] * n
    decision_file: list[Any] = [pd.NA] * n
    keep = np.ones(n, dtype=bool)
    changes: list[dict[str, Any]] = []
    counts = {"relabelled": 0, "confirmed": 0, "dropped": 0}
    contested = 0
    removed: list[dict[str, Any]] = []

    for id_ in sorted(r for r in resolutions if r in row_of):
        res = resolutions[id_]
        row = row_of[id_]
        old = int(labels[row])
        latest = res.latest
        if res.drop:
            kind = "drop"
            keep[row] = False
            counts["dropped"] += 1
        elif res.label == old:
            kind = "confirm"
            counts["confirmed"] += 1
        else:
            kind = "relabel"
            counts["relabelled"] += 1
            labels[row] = int(res.label)
        if len({v.option for v in res.votes}) > 1:
            contested += 1
        label_source[row] = "annotation"
        previous[row] = old
        decision[row] = kind
        annotator[row] = ", ".join(sorted({v.annotator for v in res.winners}))
        annotated_at[row] = latest.annotated_at or pd.NA
        decision_file[row] = _rel(latest.file, root)
        change = {
            "id": id_, "decision": kind, "from": classes[old],
            "to": None if res.drop else classes[int(res.label)],
            "annotator": annotator[row], "annotated_at": latest.annotated_at or None,
            "decision_file": decision_file[row], "rule": res.rule,
            "note": "; ".join(v.note for v in res.winners if v.note),
        }
        if len(res.votes) > 1 or res.superseded:
            change["votes"] = [{"annotator": v.annotator, "choice": DROP if v.drop else classes[v.label],
                                "annotated_at": v.annotated_at or None, "file": _rel(v.file, root)}
                               for v in res.votes]
            change["superseded_votes"] = res.superseded
        changes.append(change)
        if res.drop:
            removed.append({"id": id_, "reason": "dropped_by_annotation", "annotator": annotator[row],
                            "decision_file": decision_file[row]})

    m["label"] = labels
    m["label_name"] = pd.array([classes[i] for i in labels], dtype="string")
    m["source_label"] = source_label
    m["label_source"] = pd.array(label_source, dtype="string")
    m["previous_label"] = pd.array(previous, dtype="Int64")
    m["decision"] = pd.array(decision, dtype="string")
    m["annotator"] = pd.array(annotator, dtype="string")
    m["annotated_at"] = pd.array(annotated_at, dtype="string")
    m["decision_file"] = pd.array(decision_file, dtype="string")

    findings = {
        "decisions_applied": counts["relabelled"] + counts["confirmed"] + counts["dropped"],
        **counts,
        "untouched": int(n - counts["relabelled"] - counts["confirmed"] - counts["dropped"]),
        "contested": contested,
        "superseded_votes": int(sum(r.superseded for r in resolutions.values())),
        "skipped_removed_by_clean": skipped,
        "changes": changes,
        "removed": removed,
    }
    return m, keep, findings


def _rel(path: str, root: str | os.PathLike) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:
        return Path(path).as_posix()

