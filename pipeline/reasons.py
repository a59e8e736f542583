"""Failure reasons: img2dataset's error messages grouped into a few named, countable reasons."""

from __future__ import annotations

import re

RETRYABLE = {"timeout", "http_5xx", "connection_error"}


def classify(message: str | None) -> str:
    """Map one img2dataset error message to a reason such as http_404, timeout, decode_error."""
    if not message:
        return "unknown"
    m = message.lower()
    # pipeline.fetch's refusals come first: their messages quote the policy, not the server
    if m.startswith("private address"):
        return "private_address"
    if m.startswith("too large"):
        return "too_large"
    http = re.search(r"http error (\d{3})", m)
    if http:
        code = int(http.group(1))
        if code in (301, 302, 303, 307, 308) or "redirect" in m:
            return "redirect_loop"
        if code >= 500:
            return "http_5xx"
        return f"http_{code}" if code in (403, 404, 410, 429) else "http_4xx"
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if any(s in m for s in ("connection refused", "connection reset", "remote end closed", "urlopen error",
                            "name or service not known", "connection aborted", "broken pipe", "incompleteread")):
        return "connection_error"
    if "cv_io_max_image_pixels" in m:
        return "decompression_bomb"
    if "!buf.empty()" in m:
        return "empty_body"
    if "decoding error" in m:
        return "decode_error"
    for s in ("image too small", "image area too large", "aspect ratio too large"):
        if s in m:
            return s.replace(" ", "_")
    if "disallowed" in m:
        return "disallowed_by_header"
    return "other"
