"""The JSON shapes of samples and pages, as the cloud receives them.

A sample is one object:

    {"name": "line1.speed", "value": 12.5, "quality": "good", "ts_ms": 1764806400123,
     "epoch": 3, "seq": 41}

value is a number, true or false, or a string for a string tag. A good sample of a tag with
an engineering unit adds "unit": "kPa" after the value; consumers must accept it and other
optional fields. value is null and a "reason" key is added when quality is "bad". ts_ms is
the source timestamp in UTC milliseconds since the Unix epoch. seq counts the reader's
samples from 0 within epoch, and epoch grows by one at every reader start, so a gap in seq
within an epoch means lost samples and a new epoch shows a reader restart.

A page is what one MQTT message carries:

    {"page_seq": 1042, "samples": [<sample>, ...]}

page_seq grows by one for every page the buffer seals, across restarts, so the cloud side
can drop a page it has already seen.
"""

from __future__ import annotations

import json
from typing import Any

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"


def encode_samples(samples: list[dict[str, Any]]) -> bytes:
    """Encode samples as a JSON array, the payload of one batch."""
    return json.dumps(samples, separators=(",", ":")).encode()


def join_arrays(arrays: list[bytes]) -> bytes:
    """Join JSON arrays into the comma-separated body of one array, without parsing them."""
    bodies = [array[1:-1] for array in arrays if len(array) > 2]
    return b",".join(bodies)


def build_page(page_seq: int, batch_arrays: list[bytes]) -> bytes:
    """Build a page from the JSON arrays of the batches it holds, in arrival order."""
    return b'{"page_seq":%d,"samples":[%s]}' % (page_seq, join_arrays(batch_arrays))


def parse_page(payload: bytes) -> tuple[int, list[dict[str, Any]]]:
    """Return the page sequence number and samples of a page; raise ValueError if malformed."""
    page = json.loads(payload)
    if not isinstance(page, dict) or "page_seq" not in page or "samples" not in page:
        raise ValueError(f"not a plcbridge page: {payload[:80]!r}")
    return int(page["page_seq"]), list(page["samples"])
