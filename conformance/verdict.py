"""Verdicts: FAIL (wrong), LIMIT (not offered), WARN (correct but wasteful or noisy), PASS; one per level.

A check that passes may still warn (``observe.warn(...)``, kept on the check's own Observer): it then
ends WARN with that message. A check whose level or method the implementation does not offer ends LIMIT
(``limit(...)``, a skip with a marked reason).
"""

from __future__ import annotations

import pytest

from .levels import DESCRIPTIONS, LEVELS

LIMIT_PREFIX = "LIMIT: "
STATES = ("pass", "warn", "fail", "limit", "skip", "xfail", "xpass")


def limit(why: str) -> None:
    pytest.skip(LIMIT_PREFIX + why)


def skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr or "")


def level_lines(outcomes: dict[str, dict[str, str]]) -> list[str]:
    """One verdict per level: FAIL (which checks), not offered (why), PASS (with WARN and LIMIT counts)."""
    lines = []
    for level in LEVELS:
        mine = {k: v for k, v in outcomes.items() if v.get("level", "core") == level}
        if not mine:
            continue
        lines.append(f"{level}: {level_verdict(mine)}")
    return lines


def level_verdict(mine: dict[str, dict[str, str]]) -> str:
    states = [v["outcome"] for v in mine.values()]
    failed = sorted(k for k, v in mine.items() if v["outcome"] == "fail")
    limited = sorted(k for k, v in mine.items() if v["outcome"] == "limit")
    warned = sum(s == "warn" for s in states)
    ran = sum(s in ("pass", "warn", "fail") for s in states)
    if failed:
        return f"FAIL ({len(failed)} of {ran}: {', '.join(failed)})"
    if not ran and limited:
        why = mine[limited[0]]["message"]
        return f"LIMIT (not offered: {why})"
    if not ran:
        return f"no check ran ({', '.join(sorted(set(states)))})"
    text = f"PASS ({ran} check{'' if ran == 1 else 's'}"
    if warned:
        text += f", {warned} WARN"
    if limited:
        text += f"; {len(limited)} LIMIT: partly offered"
    return text + ")"


def level_summary_cell(mine: dict[str, dict[str, str]]) -> str:
    """The verdict as one word for a matrix: FAIL, LIMIT, WARN, PASS (or '-')."""
    states = [v["outcome"] for v in mine.values()]
    if not states:
        return "-"
    if "fail" in states:
        return "FAIL"
    if not any(s in ("pass", "warn") for s in states):
        return "LIMIT" if "limit" in states else "-"
    return "WARN" if "warn" in states else "PASS"


__all__ = ["DESCRIPTIONS", "LIMIT_PREFIX", "STATES", "level_lines", "level_summary_cell", "level_verdict", "limit",
           "skip_reason"]
