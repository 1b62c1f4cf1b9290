"""What a deployed package meets, brought back to the data (issue #28).

- ``log``: the request log ``fmpipe serve --log`` / ``fmpipe predict --log`` write: each scored
  input content-addressed on disk, one JSON line per input with its prediction, confidence and
  embedding; size-bounded segments, readable while written.
- ``drift``: ``fmpipe monitor``: logged inputs against the variant's held-out data, two-sample
  tests with one decision and one reason line; a typed report (``artefacts.MonitorReport``).
- ``page``: the report-page section of a monitor run (most atypical inputs as thumbnails);
- ``queue``: ``fmpipe review pool``: pool a log (``pipeline.review.pool``: the pool's files,
  and how annotate adds its labelled inputs to the dataset, a layer below this one), rank the
  undecided inputs (uncertainty, drift, diversity) and export the top ones to Label Studio.

Like ``pipeline.inference.runtime``, ``log`` imports only numpy: ``serve`` and ``predict`` load it.
"""
