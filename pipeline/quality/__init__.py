"""Data quality: clean's rules, review's finders and the validate gate.

- ``embedders``: images -> vectors (hand-designed ``thumbs``; a trained fmpipe network's layer);
- ``neighbors``: ``near_pairs``, the near-duplicate index (exact or faiss/usearch ANN);
- ``rules``: clean's registered rules and their drop/flag/off policies;
- ``finders``: review's registered finders (label issues, near-duplicates, outliers) and the
  queue they feed; the review step (pipeline/review/) runs them on a trained model's outputs;
- ``clean``: clean as a function of a Dataset; ``sheet``: the offline HTML contact sheet;
- ``expectations``: the curated GX suite per variant (init, load, run, report).
"""
