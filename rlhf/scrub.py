"""The scrubber: personal data taken out of text that leaves the feedback store for training.

The store keeps what users sent, unscrubbed, so that it can be audited and re-scrubbed; everything the refeed
hands to the next cycle goes through `scrub` first.

What it replaces, in this order (a later pattern sees the earlier ones' replacements):
    [EMAIL]  name@host.tld
    [CARD]   a run of 13 or more digits joined by single spaces or dashes: a card number (Luhn-valid or not: a
             typo'd card number is still someone's card number), or several written together
    [IP]     IPv4 dotted quads (each part 0-255) and IPv6 addresses that contain a digit (the full grammar, one
             '::' at most, so 'std::vector', 'abc::def' and '12:30:45' stay)
    [PHONE]  '+', a country code and 7 to 15 digits in all, in groups split by single spaces, dots or dashes
             (parentheses allowed); or North-American style (555) 123-4567, 555-123-4567, 555.123.4567; or
             2-5 / 3-4 / 3-4 digit groups split by dashes or dots (020-7946-0958). Dates (2026-11-23), versions
             (1.2.3) and plain numbers stay.
These are patterns, not a guarantee: names, street addresses and identifiers in free text pass through.

Time is linear in the text, whatever the text: a pattern may start only where its run of characters starts
(the look-behinds), consumes runs possessively (`++`, `*+`: what it took is never re-tried) and backtracks
over a bounded number of steps at most. The e-mail pattern this replaces re-scanned the rest of a run of
name characters from each of its positions: 64 KB of `%.%.` took 2.2 s, 200 KB 22 s.
`benchmarks/serve_load.py --scrub-only` times every pattern on 200 KB shapes built against it.
Each pattern runs only when the text holds the character it needs ('@', a digit, '.', ':').
"""
from __future__ import annotations

import re

_HEX_GROUP = "[0-9A-Fa-f]{1,4}+"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_JOIN = r"(?:\)[ .-]?\(?|[ .-]\(?|\()"  # between two digit groups of an international number

# a name run that starts here (nothing of the name before it), '@', then labels and a top-level domain
EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]++@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# a digit run that starts here (no digit, nor digit and separator, before it), 13 digits, then the rest of the run
CARD = re.compile(r"(?<!\d)(?<!\d[ -])\d(?:[ -]?\d){12}(?:[ -]?\d)*+")
IPV4 = re.compile(rf"(?<![\d.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\d.])")
# a run of hex digits and colons that starts and ends here, has a colon among its first five characters and a
# digit somewhere: eight groups, or at most seven around one '::'
IPV6 = re.compile(
    rf"(?<![\w:])(?=[0-9A-Fa-f]{{0,4}}+:)(?=[A-Fa-f:]*+\d)"
    rf"(?:{_HEX_GROUP}(?::{_HEX_GROUP}){{7}}"
    rf"|(?=:*+(?:[0-9A-Fa-f]++:*+){{0,7}}+(?![\w:]))(?:{_HEX_GROUP}(?::{_HEX_GROUP})*+)?+::"
    rf"(?:{_HEX_GROUP}(?::{_HEX_GROUP})*+)?+)"
    r"(?![\w:])")
PHONE = re.compile(
    r"(?<!\w)(?:"
    rf"\+(?<!\+\+)\d(?:{_JOIN}?\d){{6,14}}\)?(?!\w)"  # international: 7 to 15 digits after the '+'
    r"|(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)"  # North American
    r"|(?<![.-])\d{2,5}[.-]\d{3,4}[.-]\d{3,4}(?![\w.-]|\.\d))"  # grouped national numbers
)
_DIGIT = re.compile(r"\d")


def scrub(text: str) -> tuple[str, list[str]]:
    """Replace e-mail addresses, card-like numbers, IP addresses and phone numbers; return the text and the kinds found.

    Linear in len(text); callers bound that length (serve.scrub_max_chars) and say what they do with longer text.
    """
    digits = _DIGIT.search(text) is not None
    found = []
    for kind, pattern, label, needed in (("email", EMAIL, "[EMAIL]", "@" in text), ("card", CARD, "[CARD]", digits),
                                         ("ip", IPV4, "[IP]", digits and "." in text),
                                         ("ip", IPV6, "[IP]", digits and ":" in text),
                                         ("phone", PHONE, "[PHONE]", digits)):
        if needed:
            text, count = pattern.subn(label, text)
            if count and kind not in found:
                found.append(kind)
    return text, found
