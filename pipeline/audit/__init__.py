"""Audit: which data made a model, what changed between two data versions, every version.

A *version* of a variant's data is a git revision of this repo: its ``dvc.lock`` names the
md5 of every output (``<step>@<variant>`` entries), and the bytes live in DVC's
content-addressed cache (or a DVC remote). So a revision is read without checking it out:
``dvc.lock`` comes from git (``git cat-file``), each output from DVC's cache by the md5 the
lock names (through DVC's own ``Repo``: its local cache, else its default remote). The
workspace, the index and HEAD are never touched. ``cache: false`` outputs (metrics) are
committed to git and read from the revision's tree.

- ``history``: every commit where the variant's ``dvc.lock`` entries changed, with the data
  hash per step, rows per split/class, removals by reason, the validation result, label
  changes and annotators, the model's metrics and blessing.
- ``diff_versions``: row level between two revisions (or the workspace): added, removed (with
  clean's reason), relabelled (old -> new, source, annotator), content changed, moved between
  splits, and a per-class summary.
- ``audit_model``: from a package directory or archive alone, the data version, params and code
  in its ``lineage.json``; with the repository, the commit(s) that recorded them and the diff
  of its data against the current data.

Modules, one per concern: ``git`` (a repository read without checkout), ``store`` (DVC
objects by hash), ``version`` (a revision's data), ``diff``, ``history``, ``model``.

Every failure a user can cause (unknown revision, variant absent at a revision, data in
neither cache nor remote, shallow clone) is an ``FmpipeError`` with one clear line.
"""
