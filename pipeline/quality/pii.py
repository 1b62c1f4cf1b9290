"""Personal data in text columns: Microsoft Presidio's pattern recognizers, a policy per variant.

The rule ``pii`` scans every text column a source carries (``source.text_columns`` of a CSV
table; an image source that joins a CSV of metadata hands its text columns the same way:
``Collected.text``) with Presidio's analyzer and applies ``source.pii.policy``:

- ``mask``: each detected span is replaced by ``<ENTITY_TYPE>`` (``<EMAIL_ADDRESS>``);
- ``drop``: a column with any detection is removed (the column, not the rows);
- ``flag``: values are kept as they are; the findings say where personal data is;
- ``off``: no scan.

Why at collect, not clean: collect is where a source's values first enter ``data/`` (and the
DVC cache). Masking any later would leave the raw values in ``data/<v>/collect/`` and in every
cached version of it, so "a masked value never appears in any output" could not hold. The rule
is the data's first quality check; its policy lives in the source's params for the same
reason (collect's DVC stage tracks ``source``).

Only pattern recognizers run (e-mail, phone, credit card, IBAN, IP address, US SSN, crypto
wallet, URL by choice): no spaCy language model is loaded or downloaded. Presidio is given a
``NoOpNlpEngine`` and an explicit registry, so ``AnalyzerEngine`` never tries to load
``en_core_web_lg``. The e-mail recognizer checks domains against tldextract's bundled public
suffix snapshot: plain Presidio asks the network for the latest list on first use, which would
make the result depend on the day and the network (and hang without one).

What leaves this module never holds a value: findings are ``(id, column, entity, start, end,
score)`` and the report counts per column and entity.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.schema import Strict

if TYPE_CHECKING:  # annotations only: PiiSpec is read with params (pipeline.config), pandas is not needed then
    import pandas as pd

PiiPolicy = Literal["drop", "mask", "flag", "off"]

# Presidio's entity names (pattern recognizers, language independent or English context words).
RECOGNIZERS = {
    "EMAIL_ADDRESS": "EmailRecognizer",
    "PHONE_NUMBER": "PhoneRecognizer",
    "CREDIT_CARD": "CreditCardRecognizer",
    "IBAN_CODE": "IbanRecognizer",
    "IP_ADDRESS": "IpRecognizer",
    "US_SSN": "UsSsnRecognizer",
    "CRYPTO": "CryptoRecognizer",
    "URL": "UrlRecognizer",
}
DEFAULT_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN")
FINDING_COLUMNS = ["id", "column", "entity", "start", "end", "score"]
FINDINGS = "pii_findings.parquet"


class PiiSpec(Strict):
    """``source.pii``: what the ``pii`` rule does with personal data in text columns."""

    policy: PiiPolicy = "mask"
    entities: list[Literal[tuple(RECOGNIZERS)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(DEFAULT_ENTITIES), min_length=1)
    # Presidio's confidence at or above which a span counts (its phone recognizer gives 0.4
    # without context words, IP addresses 0.6, Luhn-checked cards and e-mails 1.0).
    score_threshold: float = Field(0.35, ge=0, le=1)
    # Regions whose national formats count for numbers written without a country code (any
    # number with +CC counts whatever the list). Not DE by default: its short local numbers
    # make any 4-digit figure ("ticket 1641") a phone number.
    phone_regions: list[str] = Field(default_factory=lambda: ["US", "GB", "FR", "IN", "CA"], min_length=1)


@dataclass
class Scrubbed:
    text: pd.DataFrame  # the text columns after the policy (dropped ones absent)
    findings: pd.DataFrame  # FINDING_COLUMNS; never a value
    facts: dict[str, Any]  # for report.json: policy, counts per column and entity, dropped columns


@lru_cache(maxsize=8)
def analyzer(entities: tuple[str, ...], phone_regions: tuple[str, ...]):
    """A Presidio AnalyzerEngine with pattern recognizers only and no NLP model."""
    import tldextract
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer import predefined_recognizers as pr
    from presidio_analyzer.nlp_engine import NoOpNlpEngine

    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)  # the bundled snapshot only

    class OfflineEmailRecognizer(pr.EmailRecognizer):
        def validate_result(self, pattern_text: str):  # same check, no network
            return offline(pattern_text).fqdn != ""

    registry = RecognizerRegistry(supported_languages=["en"])
    for entity in entities:
        name = RECOGNIZERS[entity]
        if name == "EmailRecognizer":
            registry.add_recognizer(OfflineEmailRecognizer())
        elif name == "PhoneRecognizer":
            registry.add_recognizer(pr.PhoneRecognizer(supported_regions=list(phone_regions)))
        else:
            registry.add_recognizer(getattr(pr, name)())
    return AnalyzerEngine(registry=registry, supported_languages=["en"],
                          nlp_engine=NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}]))


def scan(ids: list[str], text: pd.DataFrame, spec: PiiSpec) -> pd.DataFrame:
    """Findings (one row per detected span) in ``text``'s columns; values never copied out."""
    import pandas as pd

    engine = analyzer(tuple(spec.entities), tuple(spec.phone_regions))
    rows: list[tuple] = []
    for column in text.columns:
        values = text[column].fillna("").astype(str).tolist()
        found: dict[str, list] = {}  # one analysis per distinct value
        for row, value in enumerate(values):
            if not value.strip():
                continue
            if value not in found:
                found[value] = engine.analyze(value, language="en", entities=list(spec.entities),
                                              score_threshold=spec.score_threshold)
            for r in found[value]:
                rows.append((ids[row], str(column), r.entity_type, int(r.start), int(r.end), float(r.score)))
    frame = pd.DataFrame(rows, columns=FINDING_COLUMNS)
    return frame.sort_values(["column", "id", "start", "entity"], kind="stable").reset_index(drop=True) \
        if len(frame) else frame.astype({"start": "int64", "end": "int64", "score": "float64"})


def mask_value(value: str, spans: list[tuple[int, int, str]]) -> str:
    """``value`` with each span replaced by ``<ENTITY>``; overlapping spans merge into one
    (named after the first, i.e. leftmost and then longest)."""
    merged: list[list] = []
    for start, end, entity in sorted(spans, key=lambda s: (s[0], -s[1])):
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end, entity])
    out, pos = [], 0
    for start, end, entity in merged:
        out += [value[pos:start], f"<{entity}>"]
        pos = end
    out.append(value[pos:])
    return "".join(out)


def scrub(ids: list[str], text: pd.DataFrame, spec: PiiSpec) -> Scrubbed:
    """Scan ``text`` (row-aligned with ``ids``) and apply ``spec.policy``."""
    import pandas as pd

    if spec.policy == "off" or text.shape[1] == 0:
        return Scrubbed(text=text, findings=pd.DataFrame(columns=FINDING_COLUMNS),
                        facts={"policy": spec.policy, "columns": {}, "dropped_columns": []})
    findings = scan(ids, text, spec)
    columns: dict[str, Any] = {}
    for column in text.columns:
        f = findings[findings["column"] == str(column)]
        columns[str(column)] = {"values_with_pii": int(f["id"].nunique()), "spans": int(len(f)),
                                "by_entity": {k: int(v) for k, v in f.groupby("entity").size().items()}}
    out = text.copy()
    dropped: list[str] = []
    if spec.policy == "drop":
        dropped = [c for c in text.columns if columns[str(c)]["spans"]]
        out = out.drop(columns=dropped)
    elif spec.policy == "mask" and len(findings):
        row_of = {i: r for r, i in enumerate(ids)}
        for (column, rid), group in findings.groupby(["column", "id"], sort=False):
            r = row_of[rid]
            spans = list(zip(group["start"], group["end"], group["entity"]))
            out.iat[r, out.columns.get_loc(column)] = mask_value(str(out.iat[r, out.columns.get_loc(column)]), spans)
    facts = {"policy": spec.policy, "entities": list(spec.entities), "score_threshold": spec.score_threshold,
             "columns": columns, "dropped_columns": [str(c) for c in dropped],
             "values_with_pii": int(findings[["id", "column"]].drop_duplicates().shape[0]) if len(findings) else 0}
    return Scrubbed(text=out, findings=findings, facts=facts)


def summary(facts: dict[str, Any]) -> str:
    """A short phrase for collect's summary line ("" when nothing was found)."""
    n = facts.get("values_with_pii", 0)
    if not n:
        return ""
    policy = facts["policy"]
    done = {"mask": "masked", "drop": f"column(s) {', '.join(facts['dropped_columns'])} dropped",
            "flag": "flagged"}[policy]
    return f"personal data in {n} text values: {done}"
