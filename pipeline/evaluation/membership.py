"""Membership inference: how well can an attacker tell training rows from held-out rows?

The attack is the loss threshold of Yeom et al. (2018, "Privacy Risk in Machine Learning"): a
model fits its training rows better than rows it never saw, so the lower a row's loss, the
likelier it was trained on. Every threshold on the loss is one attack; over all of them:

- ``auc``: the ROC-AUC of the score ``-loss`` separating members (the train split) from
  non-members (val + test): 0.5 is a coin, 1.0 a certain answer for every row;
- ``tpr_at_1pct_fpr``: the share of members found while wrongly accusing at most 1% of the
  non-members (Carlini et al. 2022, "Membership Inference Attacks From First Principles": the
  low-false-positive end is what puts individuals at risk, which an average such as AUC hides).

Why not a library: TensorFlow Privacy's and ML Privacy Meter's attacks need TensorFlow or their
own training harness; this attack is a sort and a ROC curve (scikit-learn's), tested against a
hand-computed case (tests/test_privacy.py). The loss uses the network's plain logits (no TTA,
no temperature): the attacker queries the model as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ATTACK = "loss_threshold"


def per_row_loss(logits: np.ndarray, labels: np.ndarray, head: str = "softmax") -> np.ndarray:
    """Cross-entropy of each row (binary cross-entropy of the one logit for a sigmoid head)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if head == "sigmoid":
        z = logits.reshape(-1)
        # log(1 + e^-z) for label 1, log(1 + e^z) for label 0, stable for large |z|
        signed = np.where(labels == 1, -z, z)
        return np.logaddexp(0.0, signed)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return log_norm - shifted[np.arange(len(labels)), labels]


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> float:
    """The largest true-positive rate of any threshold whose false-positive rate is <= ``fpr``
    (higher score = "member")."""
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    fprs, tprs, _ = roc_curve(y, np.r_[member_scores, nonmember_scores])
    ok = fprs <= fpr + 1e-12
    return float(tprs[ok].max()) if ok.any() else 0.0


def audit(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> dict[str, Any]:
    """The loss-threshold attack's AUC and TPR at 1% FPR (members: rows trained on)."""
    from sklearn.metrics import roc_auc_score

    m, n = -np.asarray(member_loss, float), -np.asarray(nonmember_loss, float)
    if len(m) == 0 or len(n) == 0:
        return {"attack": ATTACK, "auc": None, "tpr_at_1pct_fpr": None, "members": len(m), "nonmembers": len(n)}
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    return {"attack": ATTACK, "auc": round(float(roc_auc_score(y, np.r_[m, n])), 6),
            "tpr_at_1pct_fpr": round(tpr_at_fpr(m, n, 0.01), 6), "members": int(len(m)), "nonmembers": int(len(n))}


def sample_rows(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """At most ``limit`` of ``n`` row indices, seeded and sorted (all of them when n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
