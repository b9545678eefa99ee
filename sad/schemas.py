"""pandera schemas for the tables that cross stage boundaries.

* :class:`StepSchema` - trajectories, one row per step;
* :class:`SpanSchema` - REASON/ACT spans with character and token positions;
* :class:`WindowSchema` - token windows with their binary masks ``m_r`` and ``m_a``;
* :class:`CoverageSchema` - spans against masks: per window and kind, the spans' tokens are
  exactly the mask's tokens (coverage), and each span lies inside its window (lengths).

:func:`validate` runs a schema lazily and raises :class:`SchemaViolation`, whose message
names the failed checks and the episodes they concern.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

SPAN_KINDS = ("reason", "act")


class SchemaViolation(ValueError):
    """A table failed its schema; the message names the check and the episode(s)."""


class StepSchema(pa.DataFrameModel):
    episode_id: Series[str] = pa.Field(str_length={"min_value": 1})
    step: Series[int] = pa.Field(ge=0)
    thought: Series[str]
    action: Series[str]
    observation: Series[str]
    valid: Series[bool]
    imitate: Series[bool]
    success: Series[bool]

    class Config:
        strict = True
        unique = ["episode_id", "step"]

    @pa.dataframe_check(error="steps of an episode must be numbered 0..n-1 in order")
    def steps_contiguous(cls, df: pd.DataFrame) -> Series[bool]:
        expected = df.groupby("episode_id", sort=False).cumcount()
        return df["step"] == expected

    @pa.dataframe_check(error="an action must be a single non-empty line for a valid step")
    def valid_steps_have_actions(cls, df: pd.DataFrame) -> Series[bool]:
        return ~df["valid"] | ((df["action"].str.len() > 0) & ~df["action"].str.contains("\n"))


class SpanSchema(pa.DataFrameModel):
    episode_id: Series[str] = pa.Field(str_length={"min_value": 1})
    window: Series[int] = pa.Field(ge=0)
    span: Series[int] = pa.Field(ge=0)
    kind: Series[str] = pa.Field(isin=list(SPAN_KINDS))
    char_start: Series[int] = pa.Field(ge=0)
    char_end: Series[int] = pa.Field(ge=0)
    tok_start: Series[int] = pa.Field(ge=0)
    tok_end: Series[int] = pa.Field(ge=0)

    class Config:
        strict = True
        unique = ["episode_id", "window", "span"]

    @pa.dataframe_check(error="a span must be non-empty: char_start < char_end and tok_start < tok_end")
    def non_empty(cls, df: pd.DataFrame) -> Series[bool]:
        return (df["char_start"] < df["char_end"]) & (df["tok_start"] < df["tok_end"])

    @pa.dataframe_check(error="spans of a window must be ordered and must not overlap")
    def ordered_non_overlapping(cls, df: pd.DataFrame) -> Series[bool]:
        prev_end = df.groupby(["episode_id", "window"], sort=False)["tok_end"].shift(1)
        prev_char = df.groupby(["episode_id", "window"], sort=False)["char_end"].shift(1)
        return (prev_end.isna() | (df["tok_start"] >= prev_end)) & (prev_char.isna() | (df["char_start"] >= prev_char))


class WindowSchema(pa.DataFrameModel):
    episode_id: Series[str] = pa.Field(str_length={"min_value": 1})
    window: Series[int] = pa.Field(ge=0)
    success: Series[bool]
    n_tokens: Series[int] = pa.Field(gt=0)
    input_ids: Series[object]
    reason_mask: Series[object]
    act_mask: Series[object]

    class Config:
        strict = True
        unique = ["episode_id", "window"]

    @pa.dataframe_check(error="input_ids, reason_mask and act_mask must all have n_tokens entries")
    def lengths_match(cls, df: pd.DataFrame) -> Series[bool]:
        return pd.Series(
            [len(a) == n and len(r) == n and len(m) == n
             for a, r, m, n in zip(df["input_ids"], df["reason_mask"], df["act_mask"], df["n_tokens"])],
            index=df.index,
        )

    @pa.dataframe_check(error="masks must be binary and disjoint (m_r + m_a <= 1)")
    def masks_binary_disjoint(cls, df: pd.DataFrame) -> Series[bool]:
        def ok(r, a) -> bool:
            return all(x in (0, 1) and y in (0, 1) and x + y <= 1 for x, y in zip(r, a))

        return pd.Series([ok(r, a) for r, a in zip(df["reason_mask"], df["act_mask"])], index=df.index)

    @pa.dataframe_check(error="a window must hold at least one generated (REASON or ACT) token")
    def has_generated_tokens(cls, df: pd.DataFrame) -> Series[bool]:
        return pd.Series([sum(r) + sum(a) > 0 for r, a in zip(df["reason_mask"], df["act_mask"])], index=df.index)


class CoverageSchema(pa.DataFrameModel):
    """One row per (episode, window, kind): token counts from the masks and from the spans."""

    episode_id: Series[str]
    window: Series[int] = pa.Field(ge=0)
    kind: Series[str] = pa.Field(isin=list(SPAN_KINDS))
    mask_tokens: Series[int] = pa.Field(ge=0)
    span_tokens: Series[int] = pa.Field(ge=0)
    mask_tokens_in_spans: Series[int] = pa.Field(ge=0)
    max_tok_end: Series[int] = pa.Field(ge=0)
    n_tokens: Series[int] = pa.Field(gt=0)

    class Config:
        strict = True

    @pa.dataframe_check(error="spans must cover exactly the masked tokens of their kind (coverage)")
    def spans_cover_mask(cls, df: pd.DataFrame) -> Series[bool]:
        return (df["mask_tokens"] == df["span_tokens"]) & (df["mask_tokens_in_spans"] == df["mask_tokens"])

    @pa.dataframe_check(error="a span must end inside its window (tok_end <= n_tokens)")
    def spans_inside_window(cls, df: pd.DataFrame) -> Series[bool]:
        return df["max_tok_end"] <= df["n_tokens"]


def coverage_frame(windows: pd.DataFrame, spans: pd.DataFrame) -> pd.DataFrame:
    """Per window and kind: masked tokens, span tokens, masked tokens inside spans, last span end."""
    by_key: dict[tuple[str, int, str], list[tuple[int, int]]] = {}
    for e, w, k, a, b in spans[["episode_id", "window", "kind", "tok_start", "tok_end"]].itertuples(index=False):
        by_key.setdefault((e, int(w), k), []).append((int(a), int(b)))
    rows = []
    for e, w, n, r, a in windows[["episode_id", "window", "n_tokens", "reason_mask", "act_mask"]].itertuples(index=False):
        for kind, mask in (("reason", r), ("act", a)):
            ranges = by_key.get((e, int(w), kind), [])
            rows.append({
                "episode_id": e, "window": int(w), "kind": kind, "mask_tokens": int(sum(mask)),
                "span_tokens": sum(b - a for a, b in ranges),
                "mask_tokens_in_spans": sum(int(sum(mask[a:b])) for a, b in ranges),
                "max_tok_end": max((b for _, b in ranges), default=0), "n_tokens": int(n),
            })
    columns = ["episode_id", "window", "kind", "mask_tokens", "span_tokens", "mask_tokens_in_spans", "max_tok_end", "n_tokens"]
    return pd.DataFrame(rows, columns=columns).astype({c: "int64" for c in columns[3:] + ["window"]})


def check_coverage(windows: pd.DataFrame, spans: pd.DataFrame, what: str) -> None:
    """Spans and masks must describe the same tokens; raises SchemaViolation naming episodes."""
    keys = set(zip(spans["episode_id"], spans["window"]))
    orphans = sorted({str(e) for e, w in keys - set(zip(windows["episode_id"], windows["window"]))})
    if orphans:
        raise SchemaViolation(f"{what} (spans): CoverageSchema failed\n  - check spans_have_window: spans of "
                              f"window(s) missing from the window table in episode(s) {', '.join(orphans[:5])}")
    validate(coverage_frame(windows, spans), CoverageSchema, f"{what} (coverage)")


def validate(df: pd.DataFrame, schema: type[pa.DataFrameModel], what: str) -> pd.DataFrame:
    """Validate ``df``; on failure raise SchemaViolation naming checks and episodes."""
    try:
        return schema.validate(df, lazy=True)
    except (pa.errors.SchemaErrors, pa.errors.SchemaError) as exc:
        cases = getattr(exc, "failure_cases", None)
        lines = [f"{what}: {schema.__name__} failed"]
        if cases is not None and len(cases):
            cases = cases.copy()
            if "schema_context" in cases and "index" in cases:  # a check of whole rows: once per row, not per column
                rows = (cases["schema_context"] == "DataFrameSchema") & cases["index"].notna()
                cases.loc[rows, "column"] = None
                cases = cases[~rows | ~cases.duplicated(subset=["check", "column", "index"])]
            for (check, column), group in cases.groupby(["check", "column"], dropna=False, sort=False):
                episodes = []
                if "episode_id" in df.columns and "index" in group:
                    idx = [i for i in group["index"].tolist() if i is not None and i in df.index]
                    episodes = sorted({str(e) for e in df.loc[idx, "episode_id"].tolist()})
                where = f" in episode(s) {', '.join(episodes[:5])}" + (" …" if len(episodes) > 5 else "") if episodes else ""
                col = "" if pd.isna(column) else f" [column {column}]"
                named = ""
                if str(check) in ("column_in_dataframe", "column_in_schema") and "failure_case" in group:
                    named = " (" + ", ".join(sorted(str(c) for c in group["failure_case"])) + ")"
                lines.append(f"  - check {check!s}{col}{named}{where}: {len(group)} failure(s)")
        else:
            lines.append(f"  - {exc}")
        raise SchemaViolation("\n".join(lines)) from None
