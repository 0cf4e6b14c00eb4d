"""The reading pilot (issue 13 item 4): reads with an unaided step, reference diagnoses, the System
Usability Scale, and the pilot dashboard's figures.

Reading mode is a per-user setting (`users.reading_mode`, set by administrators on /users). For a
user in reading mode the AI result of a study (label, probabilities, decision, heatmap, OOD check,
other readers' reads) is left out of the pages and the API until that user's unaided read of the
study is saved; then it is revealed and the reader records the final (aided) decision. Users not in
reading mode (and API service accounts) see the AI result at once and record the final read only.

One read per reader and study (`reads`), every saved step appended to `read_revisions`; the unaided
read is write-once (once the AI result has been shown it would no longer be unaided), the final
read is editable (the latest counts). Agreement with the AI is derived from the labels.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from lungcad.errors import LungcadError
from lungcad.web.db import (
    Feedback,
    PilotSetting,
    Read,
    ReadRevision,
    ReferenceDiagnosis,
    Study,
    SusResponse,
    User,
    audit,
    utcnow,
)
from lungcad.web.service import exam_result, read_dict, study_ai_result, wilson  # read_dict: re-exported

__all__ = [
    "REFERENCE_SOURCES",
    "SUS_ITEMS",
    "SUS_SCALE",
    "ReadConflict",
    "ai_hidden",
    "ai_hidden_id",
    "current_period",
    "get_read",
    "grouped_proportion_ci",
    "hidden_study_ids",
    "pilot_stats",
    "read_dict",
    "save_read",
    "save_sus",
    "set_period",
    "set_reference",
    "sus_score",
]

# Brooke J. (1996) SUS: a "quick and dirty" usability scale. The standard wording, in the standard
# order; odd items are positive, even items negative.
SUS_ITEMS = (
    "I think that I would like to use this system frequently.",
    "I found the system unnecessarily complex.",
    "I thought the system was easy to use.",
    "I think that I would need the support of a technical person to be able to use this system.",
    "I found the various functions in this system were well integrated.",
    "I thought there was too much inconsistency in this system.",
    "I would imagine that most people would learn to use this system very quickly.",
    "I found the system very cumbersome to use.",
    "I felt very confident using the system.",
    "I needed to learn a lot of things before I could get going with this system.",
)
SUS_SCALE = ((1, "Strongly disagree"), (2, ""), (3, ""), (4, ""), (5, "Strongly agree"))
REFERENCE_SOURCES = ("pathology", "follow-up", "other")
DEFAULT_PERIOD = "pilot-1"
POSITIVE = "malignant"  # sensitivity and specificity are for malignant vs. not


class ReadConflict(LungcadError):
    """A read step that is not allowed now (unaided after reveal, aided before the unaided read): HTTP 409."""


# ------------------------------------------------------------------------------------------ hiding


def _read_started(session: Session, user: User, study_ids: Iterable[str]) -> set[str]:
    """Studies `user` has an unaided read of, or a final read (made before reading mode was switched
    on: that reader has seen the AI result already, hiding it again would only force a fake unaided read)."""
    ids = list(study_ids)
    if not ids:
        return set()
    return set(session.scalars(select(Read.study_id).where(
        Read.user_id == user.id, Read.study_id.in_(ids),
        Read.unaided_label.is_not(None) | Read.final_label.is_not(None))))


def ai_hidden(session: Session, user: User, study: Study) -> bool:
    """True while `user` is in reading mode and has not saved their unaided read of `study`."""
    return bool(user.reading_mode) and study.id not in _read_started(session, user, [study.id])


def ai_hidden_id(session: Session, user: User, study_id: str) -> bool:
    """`ai_hidden` for a study id (an image's or a series' exam)."""
    return bool(user.reading_mode) and study_id not in _read_started(session, user, [study_id])


def hidden_study_ids(session: Session, user: User, study_ids: Iterable[str]) -> set[str]:
    """The studies among `study_ids` whose AI result `user` may not see yet."""
    ids = set(study_ids)
    if not user.reading_mode:
        return set()
    return ids - _read_started(session, user, ids)


# ------------------------------------------------------------------------------------------ reads


def get_read(session: Session, study: Study, user: User) -> Read | None:
    return session.scalar(select(Read).where(Read.study_id == study.id, Read.user_id == user.id))


def _validate(label: str, confidence: int, comment: str, classes: list[str]) -> None:
    if label not in classes:
        raise LungcadError(f"label must be one of {', '.join(classes)}")
    if not 1 <= int(confidence) <= 5:
        raise LungcadError("confidence must be 1-5")
    if len(comment) > 4000:
        raise LungcadError("comment too long (4000 characters at most)")


def save_read(session: Session, study: Study, user: User, stage: str, label: str, confidence: int,
              classes: list[str], comment: str = "", source: str = "form") -> tuple[Read, bool]:
    """Record one step of `user`'s read of `study`: (the read, whether anything changed).

    stage "unaided": reading-mode users only, once, before the AI result is shown.
    stage "aided": the final decision; for reading-mode users only after their unaided read. Saving
    the same label, confidence and comment again changes nothing (no revision is added).
    """
    if stage not in ("unaided", "aided"):
        raise LungcadError("stage must be unaided or aided")
    comment = (comment or "").strip()
    _validate(label, confidence, comment, classes)
    read = get_read(session, study, user)
    now = utcnow()
    if stage == "unaided":
        if not user.reading_mode:
            raise ReadConflict("unaided reads are for readers in reading mode (the AI result is already in view)")
        if read is not None:  # an unaided read saved, or a final read made with the AI result in view
            raise ReadConflict("the AI result has been revealed to you for this study: an unaided read cannot be "
                               "recorded or changed any more")
    elif user.reading_mode and read is None:
        raise ReadConflict("record your unaided read first (reading mode)")
    ai_label = study_ai_result(study).label
    if read is None:
        read = Read(study_id=study.id, user_id=user.id, created_at=now, updated_at=now,
                    mode="pilot" if stage == "unaided" else "direct", comment="", model_label="",
                    model_sha256=study.model_sha256, revisions=0)
        try:
            with session.begin_nested():  # a concurrent first save of the same reader and study
                session.add(read)
        except IntegrityError:
            read = get_read(session, study, user)
            if read is None:
                raise
            return save_read(session, study, user, stage, label, confidence, classes, comment, source)
    if stage == "aided" and (read.final_label, read.final_confidence, read.comment) == (label, int(confidence), comment):
        return read, False  # a resubmission: nothing new
    if stage == "unaided":
        read.unaided_label, read.unaided_confidence, read.unaided_at = label, int(confidence), now
        read.comment = comment or read.comment
    else:
        read.final_label, read.final_confidence, read.final_at = label, int(confidence), now
        read.comment = comment
        read.model_label, read.model_sha256 = ai_label, study.model_sha256
    read.updated_at = now
    read.revisions = (read.revisions or 0) + 1
    session.add(ReadRevision(read_id=read.id, at=now, stage=stage, label=label, confidence=int(confidence),
                             comment=comment, model_label=ai_label if stage == "aided" else "", source=source))
    session.flush()
    audit(session, "read", user, target=study.id, input_sha256=study.input_sha256, model_sha256=study.model_sha256,
          read_id=read.id, stage=stage, label=label, confidence=int(confidence), via=source,
          **({"agree": read.agree} if stage == "aided" else {}))
    return read, True


def revisions_of(session: Session, read: Read) -> list[ReadRevision]:
    return list(session.scalars(select(ReadRevision).where(ReadRevision.read_id == read.id).order_by(ReadRevision.id)))


# ------------------------------------------------------------------------------------------ reference


def set_reference(session: Session, study: Study, user: User, label: str, source: str, diagnosed_on: str,
                  note: str, classes: list[str]) -> ReferenceDiagnosis:
    """Enter or correct the reference diagnosis of a study (audited with the previous values)."""
    if label not in classes:
        raise LungcadError(f"reference label must be one of {', '.join(classes)}")
    if source not in REFERENCE_SOURCES:
        raise LungcadError(f"reference source must be one of {', '.join(REFERENCE_SOURCES)}")
    try:
        day = dt.date.fromisoformat(diagnosed_on)
    except (TypeError, ValueError):
        raise LungcadError("reference date must be a date (YYYY-MM-DD)") from None
    if day > utcnow().date() + dt.timedelta(days=1):
        raise LungcadError("reference date is in the future")
    if len(note) > 2000:
        raise LungcadError("note too long (2000 characters at most)")
    ref = session.get(ReferenceDiagnosis, study.id)
    previous = None if ref is None else {"label": ref.label, "source": ref.source, "date": ref.diagnosed_on.isoformat()}
    if ref is None:
        ref = ReferenceDiagnosis(study_id=study.id)
        session.add(ref)
    ref.label, ref.source, ref.diagnosed_on, ref.note = label, source, day, note.strip()
    ref.entered_by, ref.entered_at = user.id, utcnow()
    session.flush()
    audit(session, "reference", user, target=study.id, input_sha256=study.input_sha256, label=label, source=source,
          date=day.isoformat(), previous=previous)
    return ref


# ------------------------------------------------------------------------------------------ SUS


def sus_score(answers: list[int]) -> float:
    """The standard SUS score 0-100: odd items (1st, 3rd, ...) score - 1, even items 5 - score, sum x 2.5."""
    if len(answers) != 10 or any(not isinstance(a, int) or not 1 <= a <= 5 for a in answers):
        raise LungcadError("the SUS needs an answer 1-5 to each of its 10 items")
    return 2.5 * sum((a - 1) if i % 2 == 0 else (5 - a) for i, a in enumerate(answers))


def current_period(session: Session) -> str:
    row = session.get(PilotSetting, "period")
    return row.value if row else DEFAULT_PERIOD


def set_period(session: Session, user: User, period: str) -> None:
    period = period.strip()
    if not period or len(period) > 64:
        raise LungcadError("the pilot period needs a name of 1-64 characters")
    row = session.get(PilotSetting, "period")
    previous = row.value if row else DEFAULT_PERIOD
    if row is None:
        session.add(PilotSetting(key="period", value=period))
    else:
        row.value = period
    audit(session, "pilot_period", user, target=period[:64], previous=previous)


def save_sus(session: Session, user: User, answers: list[int]) -> SusResponse:
    """The user's questionnaire for the current pilot period (created, or replaced: one per user and period)."""
    score = sus_score(answers)
    period = current_period(session)
    row = session.scalar(select(SusResponse).where(SusResponse.user_id == user.id, SusResponse.period == period))
    now = utcnow()
    if row is None:
        row = SusResponse(user_id=user.id, period=period, created_at=now)
        session.add(row)
    row.answers, row.score, row.updated_at = list(answers), score, now
    session.flush()
    audit(session, "sus", user, target=period[:64], score=score, answers=list(answers))
    return row


# ------------------------------------------------------------------------------------------ statistics


@dataclass
class Proportion:
    k: int
    n: int
    rate: float | None
    ci: tuple[float, float] | None
    method: str


def _group_bootstrap_mean(values: np.ndarray, groups: np.ndarray, n_boot: int | None,
                          seed: int) -> tuple[tuple[float, float] | None, str]:
    """95 % percentile interval of the mean of per-read `values`, whole studies resampled (reads of
    one study by several readers are not independent); the caller checks there are enough studies."""
    from lungcad.evaluation.bootstrap import LEVEL, MAX_UNDEFINED, N_BOOT, group_weights

    w = group_weights(np.asarray(groups), n_boot or N_BOOT, np.random.default_rng(seed))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (w @ values) / w.sum(axis=1)
    alpha = (1 - LEVEL) / 2
    if np.isnan(means).mean() > MAX_UNDEFINED:
        return None, "undefined in too many resamples"
    low, high = np.nanquantile(means, [alpha, 1 - alpha])
    return (float(low), float(high)), f"group bootstrap by study ({len(np.unique(groups))} studies, {len(means)} resamples)"


def grouped_proportion_ci(hits: np.ndarray, groups: np.ndarray, n_boot: int | None = None,
                          seed: int = 0) -> tuple[tuple[float, float] | None, str]:
    """95 % interval of a proportion of reads, and how it was computed.

    With at least `bootstrap.MIN_GROUPS` studies: the project's group (cluster) bootstrap, whole
    studies resampled. With fewer, a percentile bootstrap says more about the resampling than the
    data: Wilson's score interval on the reads instead (which treats them as independent, so it is
    too narrow with several readers).
    """
    from lungcad.evaluation.bootstrap import MIN_GROUPS

    hits = np.asarray(hits, dtype=float)
    n = len(hits)
    if n == 0:
        return None, ""
    n_groups = len(np.unique(groups))
    if n_groups < MIN_GROUPS:
        return wilson(int(hits.sum()), n), f"Wilson (reads; {n_groups} studies < {MIN_GROUPS} for a bootstrap)"
    return _group_bootstrap_mean(hits, np.asarray(groups), n_boot, seed)


@dataclass
class Difference:
    """Final (with AI) minus own read, on the same reads: the AI's effect on a rate."""

    n: int  # paired reads
    value: float | None
    ci: tuple[float, float] | None
    method: str


def paired_difference(own: list[bool], final: list[bool], groups: list[str], n_boot: int | None = None,
                      seed: int = 0) -> Difference:
    """Rate of `final` minus rate of `own` over the same reads, with a 95 % group-bootstrap interval
    (studies resampled, each read keeping its own pair: the pairing is what makes it narrow). With
    fewer than `bootstrap.MIN_GROUPS` studies: no interval, and the method says why."""
    from lungcad.evaluation.bootstrap import MIN_GROUPS

    d = np.asarray(final, dtype=float) - np.asarray(own, dtype=float)
    if len(d) == 0:
        return Difference(0, None, None, "")
    n_groups = len(set(groups))
    if n_groups < MIN_GROUPS:
        return Difference(len(d), float(d.mean()), None, f"no interval: {n_groups} studies < {MIN_GROUPS}")
    ci, method = _group_bootstrap_mean(d, np.asarray(groups), n_boot, seed)
    return Difference(len(d), float(d.mean()), ci, "paired " + method)


def _proportion(hits: list[bool], groups: list[str]) -> Proportion:
    n, k = len(hits), int(sum(hits))
    ci, method = grouped_proportion_ci(np.array(hits, dtype=float), np.array(groups))
    return Proportion(k, n, k / n if n else None, ci, method)


def _mean_ci(values: list[float]) -> tuple[float, float] | None:
    """95 % Student t interval of a mean (None for fewer than two values)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    arr = np.asarray(values, dtype=float)
    half = float(t.ppf(0.975, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr)))
    return float(arr.mean() - half), float(arr.mean() + half)


def _judged(rows: list[tuple[Read, str]]) -> dict:
    """figure -> (the reads it is over, whether a label is right against the reference): accuracy over
    every read, sensitivity (malignant) over malignant references, specificity over the others."""
    return {
        "accuracy": (rows, lambda label, ref: label == ref),
        "sensitivity": ([x for x in rows if x[1] == POSITIVE], lambda label, ref: label == POSITIVE),
        "specificity": ([x for x in rows if x[1] != POSITIVE], lambda label, ref: label != POSITIVE),
    }


def _ai_effect(rows: list[tuple[Read, str]]) -> dict:
    """Final minus own read for accuracy, sensitivity and specificity (malignant), on the same reads."""
    return {name: paired_difference([right(r.unaided_label, ref) for r, ref in subset],
                                    [right(r.final_label, ref) for r, ref in subset], [r.study_id for r, _ in subset])
            for name, (subset, right) in _judged(rows).items()}


def _accuracy_block(rows: list[tuple[Read, str]], which: str) -> dict:
    """Accuracy, sensitivity and specificity for malignant of the `which` (unaided / final) labels."""
    label = (lambda r: r.unaided_label) if which == "unaided" else (lambda r: r.final_label)
    return {name: _proportion([right(label(r), ref) for r, ref in subset], [r.study_id for r, _ in subset])
            for name, (subset, right) in _judged(rows).items()}


def pilot_stats(session: Session, classes: list[str]) -> dict:
    """Everything the pilot dashboard shows; every figure with its counts."""
    reads = list(session.scalars(select(Read).where(Read.final_label.is_not(None))
                                 .options(selectinload(Read.user)).order_by(Read.id)))
    refs = {r.study_id: r.label for r in session.scalars(select(ReferenceDiagnosis))}
    n = len(reads)
    k_agree = sum(bool(r.agree) for r in reads)
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=int)  # rows: reader's final label, columns: AI
    for r in reads:
        if r.final_label in index and r.model_label in index:
            confusion[index[r.final_label], index[r.model_label]] += 1
    # the AI's effect: reads with both steps
    paired = [r for r in reads if r.unaided_label]
    awaiting_final = session.scalar(select(func.count()).select_from(Read).where(
        Read.unaided_label.is_not(None), Read.final_label.is_(None))) or 0
    changed = [r for r in paired if r.changed]
    transitions = np.zeros((len(classes), len(classes)), dtype=int)  # rows: unaided, columns: final
    for r in paired:
        if r.unaided_label in index and r.final_label in index:
            transitions[index[r.unaided_label], index[r.final_label]] += 1
    directions = [{"from": classes[i], "to": classes[j], "n": int(transitions[i, j])}
                  for i in range(len(classes)) for j in range(len(classes)) if i != j and transitions[i, j]]
    with_ref = [(r, refs[r.study_id]) for r in paired if r.study_id in refs]
    changes_judged = {
        "wrong_to_right": sum(r.unaided_label != ref and r.final_label == ref for r, ref in with_ref if r.changed),
        "right_to_wrong": sum(r.unaided_label == ref and r.final_label != ref for r, ref in with_ref if r.changed),
        "wrong_to_wrong": sum(r.unaided_label != ref and r.final_label != ref for r, ref in with_ref if r.changed),
    }
    # usability
    period = current_period(session)
    sus = list(session.scalars(select(SusResponse).options(selectinload(SusResponse.user))
                               .order_by(SusResponse.period, SusResponse.id)))
    periods: dict[str, list[float]] = {}
    for s in sus:
        periods.setdefault(s.period, []).append(s.score)
    sus_periods = [{"period": p, "n": len(v), "mean": float(np.mean(v)), "ci": _mean_ci(v)} for p, v in periods.items()]
    legacy = [f.usability for f in session.scalars(select(Feedback).where(Feedback.usability.is_not(None)))]
    exams = [exam_result(e) for e in session.scalars(select(Study).options(selectinload(Study.series)))]
    return {
        "exams_flagged": sum(r.decision == "malignant" for r in exams),  # the AI's exam-level decisions
        "exams_ood": sum(r.ood for r in exams),
        "reads": n,
        "readers": len({r.user_id for r in reads}),
        "studies_read": len({r.study_id for r in reads}),
        "studies": session.scalar(select(func.count()).select_from(Study)) or 0,
        "agree": k_agree,
        "agreement": k_agree / n if n else None,
        "agreement_ci": wilson(k_agree, n),
        "classes": classes,
        "confusion": confusion.tolist(),
        "paired": len(paired),
        "awaiting_final": awaiting_final,
        "changed": _proportion([bool(r.changed) for r in paired], [r.study_id for r in paired]),
        "changed_toward_ai": sum(r.final_label == r.model_label for r in changed),
        "changed_away_from_ai": sum(r.final_label != r.model_label for r in changed),
        "transitions": transitions.tolist(),
        "directions": directions,
        "references": len(refs),
        "with_reference": len(with_ref),
        "with_reference_studies": len({r.study_id for r, _ in with_ref}),
        "unaided": _accuracy_block(with_ref, "unaided"),
        "aided": _accuracy_block(with_ref, "final"),
        "ai_effect": _ai_effect(with_ref),
        "changes_judged": changes_judged,
        "period": period,
        "sus_periods": sus_periods,
        "sus_current": next((p for p in sus_periods if p["period"] == period), None),
        "legacy_usability_n": len(legacy),
        "legacy_usability_mean": float(np.mean(legacy)) if legacy else None,
        "comments": [read_dict(r) for r in sorted(reads, key=lambda r: r.updated_at, reverse=True) if r.comment][:100],
    }
