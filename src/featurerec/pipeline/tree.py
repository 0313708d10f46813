"""The spec's execution tree for a run record::

Pipeline Run: 2026-02-28 04:00 UTC
  ├── build_interaction_matrix ......... PASSED (22m 18s, 4.2M rows)
  ├── quality_gate
  │   ├── interaction_matrix_coverage .. PASSED (72,400 users)
  │   └── feature_coverage ............. PASSED (10 features)
  └── evaluate_and_promote
      ├── ndcg@5 ....................... 0.41 (threshold: 0.35) PASSED
      └── promotion .................... Promoted to production
"""

from __future__ import annotations

from featurerec.pipeline.history import CheckRecord, RunRecord, StageRecord

#: Column (from the start of the line) where the status starts.
STATUS_COLUMN = 42


def fmt_duration(seconds: float | None) -> str:
    """``22m 18s`` as in the spec; ``4.2s`` under a minute; ``1h 02m 03s`` over an hour."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _fmt_number(v: float) -> str:
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:,.2f}"


def _dots(prefix: str, name: str) -> str:
    fill = max(2, STATUS_COLUMN - len(prefix) - len(name) - 2)
    return f"{prefix}{name} {'.' * fill} "


def _stage_status(st: StageRecord) -> str:
    if st.status == "passed":
        bits = [fmt_duration(st.duration_s)]
        if st.summary:
            bits.append(st.summary)
        text = f"PASSED ({', '.join(bits)})"
        if st.attempts > 1:
            text += f" after {st.attempts} attempts"
        return text
    if st.status == "failed":
        return f"FAILED ({fmt_duration(st.duration_s)}): {_short(st.error)}"
    if st.status == "skipped":
        return f"SKIPPED ({st.error})" if st.error else "SKIPPED"
    return st.status.upper()


def _short(text: str | None, limit: int = 160) -> str:
    t = (text or "").replace("\n", " ")
    return t if len(t) <= limit else t[: limit - 1] + "…"


def _check_status(c: CheckRecord) -> str:
    if c.error:
        word = "FAILED" if c.severity == "critical" else "WARNING"
        return f"{word} ({_short(c.error, 100)})"
    value = "no value" if c.value is None else _fmt_number(c.value)
    if c.unit and c.value is not None:
        value += f" {c.unit}"
    if c.passed:
        return f"PASSED ({value})"
    bound = (
        f"min {_fmt_number(c.min_value)}"
        if c.min_value is not None and (c.value is None or c.value < c.min_value)
        else f"max {_fmt_number(c.max_value or 0)}"
    )
    word = "FAILED" if c.severity == "critical" else "WARNING"
    return f"{word} ({value}, {bound})"


def render_tree(run: RunRecord) -> list[str]:
    """The execution tree as lines of text (no colour)."""
    head = f"Pipeline Run: {run.started_at:%Y-%m-%d %H:%M} UTC"
    lines = [
        head,
        f"  {run.pipeline} · run {run.run_id} · as of {run.as_of:%Y-%m-%d %H:%M:%S}"
        f" · {run.status.upper()}",
    ]
    names = list(run.stages)
    for i, name in enumerate(names):
        st = run.stages[name]
        last = i == len(names) - 1
        branch = "  └── " if last else "  ├── "
        pipe = "      " if last else "  │   "
        subs: list[tuple[str, str]] = []
        for chk in st.checks:
            subs.append((chk.name, _check_status(chk)))
        if st.type == "model_evaluation" and st.status == "passed":
            crit = {cr.metric: cr for cr in st.criteria}
            # the stage's declared metrics (all of them when it declares none)
            declared = st.params.get("metrics") or list(st.metrics)
            shown = list(dict.fromkeys([*crit, *declared]))
            for m in shown:
                cr = crit.get(m)
                value = st.metrics.get(m)
                vtxt = "missing" if value is None else f"{value:.2f}"
                if cr is None:
                    subs.append((m, vtxt))
                else:
                    word = "PASSED" if cr.passed else "FAILED"
                    subs.append((m, f"{vtxt} (threshold: {cr.op} {cr.threshold:g}) {word}"))
            p = st.promotion
            if p is not None:
                if p.promoted:
                    subs.append(("promotion", f"Promoted to {p.to}"))
                else:
                    subs.append(("promotion", "Not promoted: " + "; ".join(p.reasons)))
        for w in st.warnings:
            if not w.startswith("check "):
                subs.append(("warning", _short(w)))
        if subs and st.status == "passed":
            lines.append(f"{branch}{name}")
        else:
            lines.append(_dots(branch, name) + _stage_status(st))
        for j, (label, text) in enumerate(subs):
            sub_branch = "└── " if j == len(subs) - 1 else "├── "
            lines.append(_dots(pipe + sub_branch, label) + text)
    return lines
