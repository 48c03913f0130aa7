"""Every event type the cabinet records reads as a sentence on the dashboard."""

from __future__ import annotations

import json
from pathlib import Path

from web.app import EVENT_TYPES, describe

SCHEMA = Path(__file__).parents[1] / "controller" / "schemas" / "event.json"


def test_every_event_type_has_a_sentence_and_a_filter():
    types = json.loads(SCHEMA.read_text())["properties"]["type"]["enum"]
    sample = {"user": {"name": "Ann"}, "unit": {"serial": "D-1", "product": "Drill"}, "data": {}}
    for t in types:
        assert t in EVENT_TYPES, f"{t} cannot be filtered on the events page"
        text = describe({"type": t, **sample})
        assert text != t, f"{t} falls through to its raw type name"
