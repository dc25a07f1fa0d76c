"""The waking page, pure: who gets it, and what it says."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

from activator.waking_page import (
    DEFAULT_TEMPLATE,
    WakeView,
    load_template,
    render,
    wants_waking_page,
)
from torpor.wording import for_people

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
           "Sec-Fetch-Mode": "navigate"}


@pytest.mark.parametrize(("method", "headers", "page"), [
    ("GET", BROWSER, True),
    ("GET", {"Accept": "text/html"}, True),  # no Sec-Fetch-* headers (an older browser)
    ("GET", {"accept": "TEXT/HTML; q=1"}, True),
    ("HEAD", BROWSER, False),
    ("POST", BROWSER, False),  # a form post is held: it must reach the service
    ("GET", {"Accept": "application/json"}, False),
    ("GET", {"Accept": "*/*"}, False),  # curl and most API clients
    ("GET", {}, False),
    ("GET", {**BROWSER, "Sec-Fetch-Mode": "cors"}, False),  # a page's fetch()
    ("GET", {"Accept": "text/html", "X-Requested-With": "XMLHttpRequest"}, False),
    ("GET", {**BROWSER, "Upgrade": "websocket", "Connection": "Upgrade"}, False),
])
def test_who_gets_the_waking_page(method: str, headers: dict[str, str], page: bool) -> None:
    assert wants_waking_page(method, headers) is page


@pytest.mark.parametrize(("seconds", "text"), [
    (0.2, "less than a second"), (1.4, "1 s"), (59.4, "59 s"), (60, "1 min"),
    (125, "2 min 5 s"), (3600, "1 h"), (3780, "1 h 3 min"),
    (119.99975936099997, "2 min"),  # what a timer really measures, said as people say it
])
def test_durations_are_rounded_for_people(seconds: float, text: str) -> None:
    assert for_people(seconds) == text


def test_the_page_says_what_wakes_how_far_and_reloads_itself() -> None:
    page = render(WakeView("sentiment", elapsed=4.2, ready=1, replicas=3, typical=12.0))
    assert '<meta http-equiv="refresh" content="2">' in page
    assert "<code>sentiment</code> is waking up" in page
    assert "1 of 3 replicas ready" in page
    assert "Waking for 4 s; a wake of it usually takes 12 s." in page
    unknown = render(WakeView("sentiment", elapsed=0.1))
    assert "starting its replicas" in unknown and "a few seconds" in unknown


def test_values_are_escaped() -> None:
    page = render(WakeView("<script>x</script>", elapsed=1))
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page


def test_a_custom_template(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text("<p>$service: $progress ($elapsed, usually $typical), again in "
                    "$refresh s; costs $$0</p>")
    page = render(WakeView("echo", elapsed=3, ready=0, replicas=1), load_template(path))
    assert page == "<p>echo: 0 of 1 replica ready (3 s, usually a few seconds), again in 2 s;" \
                   " costs $0</p>"
    assert load_template(None).template == string.Template(DEFAULT_TEMPLATE).template


@pytest.mark.parametrize(("text", "problem"), [
    ("<p>$service $colour</p>", "unknown placeholder(s) $colour"),
    ("<p>costs $5</p>", "write $$ for a dollar sign"),
])
def test_a_bad_template_says_why(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "page.html"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem.replace("$", r"\$").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_template(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_template(tmp_path / "missing.html")
