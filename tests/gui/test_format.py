"""Human units and the utilisation colour scale."""

from __future__ import annotations

import math

import pytest

from cloudmon.ui import format as fmt

pytestmark = pytest.mark.gui


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B/s"),
        (1023, "1023 B/s"),
        (1536, "1.50 KiB/s"),
        (12.5 * 1024**2, "12.5 MiB/s"),
        (300 * 1024**3, "300 GiB/s"),
        (None, "–"),
        (math.nan, "–"),
    ],
)
def test_human_rate(value: float | None, text: str) -> None:
    assert fmt.human_rate(value) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "just now"), (3.2, "3 s ago"), (150, "2 min ago"), (7200, "2 h ago"), (3 * 86400, "3 d ago")],
)
def test_ago(seconds: float, text: str) -> None:
    assert fmt.ago(seconds) == text


def test_short_id_drops_the_repeated_hostname() -> None:
    assert fmt.short_id("web-01-a1b2c3d4", "web-01") == "a1b2c3d4"
    assert fmt.short_id("0123456789abcdef", "web-01") == "01234567…"
    assert fmt.short_id("n1", "") == "n1"


def test_load_colour_goes_from_green_to_red_and_stays_light() -> None:
    low, mid, high = fmt.load_colour(5), fmt.load_colour(80), fmt.load_colour(100)
    assert low[1] > low[0]  # greenish
    assert high[0] > high[1]
    assert high[0] > high[2]
    assert mid[0] > mid[2]
    assert mid[1] > mid[2]
    # Pastel: black text must stay readable (relative luminance well above 0.4).
    for r, g, b in (low, mid, high):
        assert 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.4 * 255
    assert fmt.load_colour(-10) == fmt.load_colour(0)
    assert fmt.load_colour(250) == fmt.load_colour(100)
