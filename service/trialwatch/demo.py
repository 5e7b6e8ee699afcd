"""The `make run` cohort: `seeds/demo-cohort.template.jsonl` with its dates placed relative to today.

The SBRT window rules depend on the clock (a start 12 days ago is at risk, 20
days ago missed), so a fixed-date cohort would show different rules on
different days. Placeholders `{{day N HH:MM}}` become today + N days at HH:MM
in the sites' UTC offset.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "seeds" / "demo-cohort.template.jsonl"
SITE_TZ = timezone(timedelta(hours=8))  # China Standard Time, as the trial's sites
_PLACEHOLDER = re.compile(r"\{\{day (-?\d+) (\d\d):(\d\d)\}\}")


def today_at_sites() -> date:
    return datetime.now(SITE_TZ).date()


def render(template: str, today: date) -> str:
    def place(match: re.Match[str]) -> str:
        day = today + timedelta(days=int(match.group(1)))
        at = datetime.combine(day, time(int(match.group(2)), int(match.group(3))), SITE_TZ)
        return at.isoformat()

    return _PLACEHOLDER.sub(place, template)


def demo_cohort(today: date | None = None, template: Path = TEMPLATE) -> str:
    """The demo cohort as an event file (one JSON line per event)."""
    return render(template.read_text(encoding="utf-8"), today or today_at_sites())
