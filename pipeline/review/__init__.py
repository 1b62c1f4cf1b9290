"""The review loop: the trained model ranks suspect labels, near-duplicates and outliers into a
queue for people (``scoring``; the finders and the queue in pipeline/quality/finders.py; ``export``); people's decisions come back
through ``annotations/<variant>/`` and the annotate step applies them (``decisions``).

Nothing here imports torch, cleanlab or scikit-learn at module level.
"""
