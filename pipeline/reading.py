"""Reading files people give fmpipe: one clear line for anything that is not what was expected.

- :func:`require_file`: a path that is a directory, a named pipe (FIFO), a device or a socket
  is said to be one, not "not found"; a FIFO is never opened (that would block until a writer
  comes) and a device such as ``/dev/zero`` never read (it never ends).
- :func:`read_text`: the bytes of a regular file as UTF-8, or one line naming the first bad byte.
- :func:`loads_json`: ``json.loads`` whose recursion limit (a document nested thousands of
  levels deep) is one line, not a ``RecursionError`` traceback.
- :class:`BoundedYamlLoader`: PyYAML's safe loader with a budget on what aliases expand to;
  :class:`MachineYamlLoader`: the same on libyaml, for machine-written files (``dvc.lock``).
  A few hundred bytes of nested anchors (a "billion laughs") expand to billions of values;
  PyYAML builds them cheaply as shared references, but the first thing that walks the value
  (pydantic, an error message's repr) allocates all of them. The budget is checked on the
  composed node graph, before any Python value exists. Aliases themselves stay allowed
  (people use anchors to share a block between variants).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.errors import FmpipeError

# What aliases may expand a YAML document to, in nodes (scalars, sequences, mappings). The
# project's params.yaml is about 700 nodes; sharing whole variant sections with anchors stays
# far below this, and a "billion laughs" of even 5 levels of 10 is above it.
YAML_MAX_EXPANDED_NODES = 100_000


def path_kind(path: str | os.PathLike) -> Optional[str]:
    """None for a regular file (symlinks followed); otherwise what the path is, in words:
    ``not found``, ``a directory``, ``a FIFO (named pipe)``, ``a character device``, ..."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "not found"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def not_a_file(path: str | os.PathLike, expected: str) -> Optional[FmpipeError]:
    """None for a regular file; else the one-line error saying what ``path`` is instead (a
    FIFO is never opened, a device never read: that would block, or never end)."""
    kind = path_kind(path)
    if kind is None:
        return None
    if kind == "not found" or kind.startswith("unreadable"):
        return FmpipeError(f"{path}: {kind} (expected {expected})")
    return FmpipeError(f"{path}: {kind}, not a regular file; expected {expected}")


def require_file(path: str | os.PathLike, expected: str) -> Path:
    """``path`` if it is a regular file; else one line saying what it is and what was expected."""
    error = not_a_file(path, expected)
    if error is not None:
        raise error
    return Path(path)


def read_text(path: str | os.PathLike, expected: str) -> str:
    """The text of a regular file (UTF-8, a BOM allowed)."""
    return decode_text(require_file(path, expected).read_bytes(), path, expected)


def decode_text(data: bytes, path: str | os.PathLike, expected: str) -> str:
    """``data`` (read from ``path``) as UTF-8, a BOM allowed, or one line naming the bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FmpipeError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}; expected {expected})") from None


def loads_json(text: str, where: str) -> Any:
    """``json.loads``; invalid or absurdly nested JSON is one line naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FmpipeError(f"{where}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise nested_too_deeply(where) from None


def nested_too_deeply(where: str) -> FmpipeError:
    return FmpipeError(f"{where}: not read: nested too deeply (thousands of levels; no fmpipe file "
                       "nests more than a few)")


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr`` for an error line, cut to ``limit`` characters without building the whole text
    (a huge list's full repr can take gigabytes)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 6, 6, 6, 6
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class AliasRefused(yaml.constructor.ConstructorError):
    """A document refused by the alias budget (valid YAML, but not read)."""


class _AliasBudget:
    """Refuses a document whose aliases expand it past :data:`YAML_MAX_EXPANDED_NODES` nodes,
    or that holds a recursive alias (a value that contains itself), before constructing any
    value. Mixed into a PyYAML loader."""

    max_expanded_nodes = YAML_MAX_EXPANDED_NODES

    def construct_document(self, node):
        _check_expansion(node, self.max_expanded_nodes)
        return super().construct_document(node)


class BoundedYamlLoader(_AliasBudget, yaml.SafeLoader):
    """``yaml.SafeLoader`` with the alias budget: for files people write (its error messages
    name the offending character and what was expected)."""


class MachineYamlLoader(_AliasBudget, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """The same, parsed by libyaml where PyYAML has it: for files a program writes, such as
    ``dvc.lock``, read once per version by the audit (7x faster on a 71 KB lock: 0.015 vs
    0.11 s; the same values). Its messages on broken input are libyaml's, terser."""


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root, limit: int) -> None:
    """Count the nodes of the document with every alias expanded (memoised per node, so the
    count itself stays linear in the composed document), iteratively (no recursion limit)."""
    size: dict[int, int] = {}
    ancestors: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            ancestors.discard(key)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > limit:
                raise AliasRefused(
                    None, None,
                    f"refused: aliases expand this value to more than {limit:,} values (a YAML "
                    "alias bomb?); write the values out, or share less through anchors",
                    node.start_mark)
            size[key] = total
            continue
        if key in size:
            continue
        if key in ancestors:
            raise AliasRefused(
                None, None, "refused: a recursive alias (a value that contains itself)", node.start_mark)
        ancestors.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


def load_yaml(text: str, where: str, loader: type = BoundedYamlLoader) -> Any:
    """A YAML document, with one line (``where:LINE: not valid YAML: ...``) for anything wrong."""
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        # One line: PyYAML's own message spans several, with a context snippet.
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        problem = " ".join(str(problem).split())
        what = "" if isinstance(exc, AliasRefused) else "not valid YAML: "
        raise FmpipeError(f"{where}{line}: {what}{problem}") from None
    except RecursionError:
        raise nested_too_deeply(where) from None
