"""Label Studio export files for tests, in the documented JSON export format.

A Label Studio "JSON" export is a list of tasks; each task has ``id``, ``data`` (what was
imported: here the image and ``fmpipe_id``), ``annotations`` (each with ``id``, ``result``,
``completed_by``, ``was_cancelled``, ``created_at``/``updated_at``, ``lead_time``, ``task``)
and ``predictions``. A ``choices`` result is ``{"from_name", "to_name", "type": "choices",
"value": {"choices": [...]}}``.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Optional

_ids = itertools.count(1000)


def annotation(choice: Optional[str], *, user: Any = 1, at: str = "2026-11-24T10:00:00.000000Z",
               cancelled: bool = False, note: str = "", to_name: str = "image") -> dict[str, Any]:
    result = []
    if choice is not None:
        result.append({"id": f"r{next(_ids)}", "from_name": "label", "to_name": to_name, "type": "choices",
                       "value": {"choices": [choice]}, "origin": "manual"})
    if note:
        result.append({"id": f"r{next(_ids)}", "from_name": "note", "to_name": to_name, "type": "textarea",
                       "value": {"text": [note]}, "origin": "manual"})
    return {"id": next(_ids), "completed_by": user, "result": result, "was_cancelled": cancelled,
            "ground_truth": False, "created_at": at, "updated_at": at, "lead_time": 4.2,
            "prediction": {}, "result_count": len(result), "unique_id": f"u{next(_ids)}",
            "import_id": None, "last_action": None, "bulk_created": False, "task": 0, "project": 1,
            "updated_by": user if isinstance(user, int) else None, "parent_prediction": None,
            "parent_annotation": None, "last_created_by": None}


def task(fmpipe_id: str, annotations: list[dict[str, Any]], *, task_id: Optional[int] = None,
         extra_data: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    tid = task_id if task_id is not None else next(_ids)
    for a in annotations:
        a["task"] = tid
    data = {"image": "data:image/png;base64,iVBORw0KGgo=", "fmpipe_id": fmpipe_id, **(extra_data or {})}
    return {"id": tid, "annotations": annotations, "file_upload": "tasks.json", "drafts": [], "predictions": [],
            "data": data, "meta": {}, "created_at": "2026-11-24T09:00:00.000000Z",
            "updated_at": "2026-11-24T10:00:00.000000Z", "inner_id": tid, "total_annotations": len(annotations),
            "cancelled_annotations": sum(bool(a["was_cancelled"]) for a in annotations),
            "total_predictions": 0, "comment_count": 0, "unresolved_comment_count": 0,
            "last_comment_updated_at": None, "project": 1, "updated_by": None, "comment_authors": []}


def dumps(tasks: list[dict[str, Any]]) -> str:
    # Label Studio writes its export with indentation; line numbers in errors depend on it.
    return json.dumps(tasks, indent=2)
