"""The HTML report: content, order, escaping, relative links, and its script in Chromium."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from anomalyclip.inspection.report import render_report, write_report
from tests.browser import CHROMIUM, CHROMIUM_ARGS, require_browser


class Collector(HTMLParser):
    """Cards (data-score, data-name), image sources and link targets of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, str]] = []
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "figure":
            self.cards.append(attributes)
        elif tag == "img":
            self.images.append(attributes["src"])
        elif tag == "a":
            self.links.append(attributes["href"])


def record(name: str, score: float, anomalous: bool | None, with_files: bool = True) -> dict:
    stem = Path(name).stem
    files = (
        {
            "overlay": f"overlays/{stem}.png",
            "mask": f"masks/{stem}.png",
            "thumbnail": f"thumbnails/{stem}.jpg",
        }
        if with_files
        else {}
    )
    return {
        "image": name,
        "score": score,
        "anomalous": anomalous,
        "defect_fraction": 0.125,
        **files,
    }


SUMMARY = {
    "image_threshold": 0.5,
    "image_threshold_source": "calibrated",
    "pixel_threshold": 2.25,
    "pixel_threshold_source": "given",
    "anomalous": 1,
    "map_range": [0.0, 4.0],
    "skipped": [{"image": "broken.jpg", "reason": "not a recognised image format"}],
}


def test_cards_come_sorted_by_score_with_verdicts_and_thresholds(tmp_path):
    records = [
        record(str(tmp_path / "a.png"), 0.2, False),
        record(str(tmp_path / "b.png"), 0.9, True),
        record(str(tmp_path / "c.png"), 0.4, False),
    ]
    page = render_report(records, SUMMARY, tmp_path)
    collector = Collector()
    collector.feed(page)
    assert [c["data-score"] for c in collector.cards] == ["0.9", "0.4", "0.2"]
    assert [c["class"] for c in collector.cards] == [
        "card anomalous",
        "card normal",
        "card normal",
    ]
    assert "image threshold: <b>0.5 (calibrated)</b>" in page
    assert "pixel threshold: <b>2.25 (given)</b>" in page
    assert '<b id="anomalous-count">1</b>' in page
    assert 'id="threshold" type="number" step="any"\n value="0.5"' in page
    assert "<code>broken.jpg</code>: not a recognised image format" in page
    assert "thumbnails/b.jpg" in collector.images
    assert collector.links[:3] == ["overlays/b.png", "overlays/b.png", "masks/b.png"]
    assert "b.png" in collector.links  # the original, relative to the report's folder


def test_names_are_escaped_and_paths_url_quoted(tmp_path):
    name = str(tmp_path / 'evil <img src=x onerror="alert(1)"> #1.png')
    unset = {**SUMMARY, "image_threshold": None, "image_threshold_source": None}
    page = render_report([record(name, 0.7, None)], unset, tmp_path)
    assert "<img src=x" not in page
    assert "evil &lt;img src=x onerror=&quot;alert(1)&quot;&gt; #1.png" in page
    collector = Collector()
    collector.feed(page)
    original = collector.links[-1]
    assert original == "evil%20%3Cimg%20src%3Dx%20onerror%3D%22alert%281%29%22%3E%20%231.png"
    assert collector.cards[0]["class"] == "card unknown"
    assert "no verdict" in page
    assert "image threshold: <b>none (not set)</b>" in page


def test_originals_are_linked_relative_to_the_report(tmp_path):
    images = tmp_path / "data" / "good"
    page = render_report(
        [record(str(images / "x.png"), 0.1, False), record("<Image>", 0.3, False, False)],
        SUMMARY,
        tmp_path / "out",
    )
    collector = Collector()
    collector.feed(page)
    assert "../data/good/x.png" in collector.links
    # In-memory inputs have neither files nor an original to link to.
    assert len(collector.cards) == 2 and len(collector.images) == 2  # 1 thumbnail + legend


def test_legend_is_inline_and_the_report_needs_no_network(tmp_path):
    path = write_report(tmp_path / "report.html", [record("a.png", 0.5, True)], SUMMARY)
    page = path.read_text(encoding="utf-8")
    assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{40,}"', page)
    assert "http://" not in page and "https://" not in page
    assert "map 0<img" in page and ">4</span>" in page


@pytest.mark.browser
def test_report_sorts_filters_and_relabels_in_chromium(tmp_path):
    require_browser()
    from playwright.sync_api import sync_playwright

    records = [
        record(f"img{i}.png", score, score >= 0.5) for i, score in enumerate([0.3, 0.8, 0.6])
    ]
    for item in records:
        for key, colour in (("thumbnail", "red"), ("overlay", "blue"), ("mask", "white")):
            target = tmp_path / item[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), colour).save(target)
    path = write_report(tmp_path / "report.html", records, {**SUMMARY, "anomalous": 2})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(path.as_uri())

            def scores() -> list[str]:
                return page.eval_on_selector_all(
                    "#grid figure:not([hidden])", "cards => cards.map(c => c.dataset.score)"
                )

            assert scores() == ["0.8", "0.6", "0.3"]
            page.select_option("#sort", "score-asc")
            assert scores() == ["0.3", "0.6", "0.8"]
            page.fill("#threshold", "0.7")
            assert page.inner_text("#anomalous-count") == "1"
            page.select_option("#show", "anomalous")
            assert scores() == ["0.8"]
            page.select_option("#show", "normal")
            assert scores() == ["0.3", "0.6"]
            assert page.inner_text("figure[data-score='0.6'] .verdict") == "normal"
            loaded = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            assert loaded[0] == 200  # the legend
            assert errors == []
        finally:
            browser.close()
