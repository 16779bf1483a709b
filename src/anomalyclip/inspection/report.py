"""A single-file HTML report of an inspection run, to open from disk in any browser.

Images are linked by paths relative to the report (thumbnails/, overlays/, masks/ beside
it), so the folder can be moved or zipped as a whole; the only inline image is the colour
legend. The page works without JavaScript (cards come sorted by score, highest first);
a few lines of inline script add re-sorting, a verdict filter and a what-if image
threshold that re-labels the cards without touching the files.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from anomalyclip.postprocess import describe_false_alarm
from anomalyclip.utils.atomic import atomic_write_text
from anomalyclip.visualize import colorbar, encode_png

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.4rem;margin:0 0 .5rem}
.facts{display:flex;flex-wrap:wrap;gap:.4rem 1.5rem;margin:.5rem 0 1rem}
.facts b{font-variant-numeric:tabular-nums}
.legend{display:flex;align-items:center;gap:.5rem}
.legend img{height:12px;width:200px;border:1px solid #999}
.controls{display:flex;flex-wrap:wrap;gap:1rem;align-items:center;margin-bottom:1rem}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:1rem}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5rem;margin:0}
.card img{width:100%;aspect-ratio:1;object-fit:contain;display:block;background:#eee}
.card figcaption{font-size:.85rem;margin-top:.4rem;overflow-wrap:anywhere}
.score{font-size:1.1rem;font-weight:600;font-variant-numeric:tabular-nums}
.verdict{display:inline-block;padding:0 .4rem;border-radius:3px;margin-left:.4rem}
.anomalous .verdict{background:#c62828;color:#fff}
.normal .verdict{background:#2e7d32;color:#fff}
.unknown .verdict{background:#bbb}
.anomalous{border-color:#c62828}
.links a{margin-right:.6rem}
.skipped{margin-top:2rem}
"""

_SCRIPT = """
(function () {
  var grid = document.getElementById('grid');
  var sortBy = document.getElementById('sort');
  var show = document.getElementById('show');
  var threshold = document.getElementById('threshold');
  function verdictOf(card) {
    var t = parseFloat(threshold.value);
    if (isNaN(t)) { return 'unknown'; }
    return parseFloat(card.dataset.score) >= t ? 'anomalous' : 'normal';
  }
  function update() {
    var cards = Array.prototype.slice.call(grid.children);
    var key = sortBy.value;
    cards.sort(function (a, b) {
      if (key === 'name') { return a.dataset.name.localeCompare(b.dataset.name); }
      var d = parseFloat(a.dataset.score) - parseFloat(b.dataset.score);
      return key === 'score-asc' ? d : -d;
    });
    var counted = 0;
    cards.forEach(function (card) {
      var verdict = verdictOf(card);
      card.className = 'card ' + verdict;
      card.querySelector('.verdict').textContent = verdict === 'unknown' ? 'no verdict' : verdict;
      card.hidden = show.value !== 'all' && show.value !== verdict;
      if (verdict === 'anomalous') { counted += 1; }
      grid.appendChild(card);
    });
    document.getElementById('anomalous-count').textContent =
      isNaN(parseFloat(threshold.value)) ? 'n/a' : String(counted);
  }
  [sortBy, show, threshold].forEach(function (el) { el.addEventListener('input', update); });
  update();
})();
"""


def _url(path: str) -> str:
    return quote(path.replace(os.sep, "/"), safe="/")


def _original_link(image: str, base: Path) -> str | None:
    """A link to the input file relative to the report, or None for in-memory inputs."""
    if image.startswith("<"):
        return None
    try:
        return _url(os.path.relpath(os.path.abspath(image), os.path.abspath(base)))
    except ValueError:  # another drive on Windows
        return Path(image).resolve().as_uri()


def _format(value: float | None, digits: int = 4) -> str:
    return "none" if value is None else f"{value:.{digits}g}"


def captions(names: Sequence[str]) -> dict[str, str]:
    """Each image's path relative to the folder all of them share: the file name alone
    hides which class or line an image came from when a run spans several folders."""
    folders = [os.path.dirname(name) for name in names]
    try:
        common = os.path.commonpath(folders) if all(folders) else ""
    except ValueError:  # absolute and relative paths mixed
        common = ""
    return {
        name: Path(os.path.relpath(name, common) if common else name).as_posix() for name in names
    }


def _card(record: Mapping[str, Any], base: Path, caption: str) -> str:
    escape = html.escape
    anomalous = record.get("anomalous")
    verdict = "unknown" if anomalous is None else ("anomalous" if anomalous else "normal")
    name = record["image"]
    links = []
    for label, key in (("overlay", "overlay"), ("mask", "mask")):
        if record.get(key):
            links.append(f'<a href="{escape(_url(record[key]))}">{label}</a>')
    original = _original_link(name, base)
    if original:
        links.append(f'<a href="{escape(original)}">original</a>')
    thumbnail = record.get("thumbnail")
    picture = (
        f'<a href="{escape(_url(record.get("overlay") or thumbnail))}">'
        f'<img src="{escape(_url(thumbnail))}" loading="lazy" '
        f'alt="heatmap overlay of {escape(name)}"></a>'
        if thumbnail
        else ""
    )
    fraction = record.get("defect_fraction")
    defect = "" if fraction is None else f" &middot; defect area {100 * fraction:.2f}%"
    share = record.get("scored_share")
    if share is not None:
        defect += (
            f' &middot; <span class="unscored">scored {100 * share:.0f}% of the image '
            "(centre square; the grey strips were not scored)</span>"
        )
    return (
        f'<figure class="card {verdict}" data-score="{record["score"]!r}" '
        f'data-name="{escape(name)}">{picture}<figcaption>'
        f'<span class="score">{record["score"]:.4f}</span>'
        f'<span class="verdict">{"no verdict" if verdict == "unknown" else verdict}</span>'
        f"<br>{escape(caption)}{defect}"
        f'<div class="links">{" ".join(links)}</div></figcaption></figure>'
    )


def render_report(
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    base: str | Path = ".",
    title: str = "AnomalyCLIP inspection",
) -> str:
    """The report's HTML; ``base`` is the folder it will be written to (for relative links).

    records: as in predictions.jsonl ("image", "score", "anomalous", "defect_fraction",
    "thumbnail", "overlay", "mask"); summary: as in summary.json.
    """
    escape = html.escape
    base = Path(base)
    ordered = sorted(records, key=lambda r: r["score"], reverse=True)
    image_threshold = summary.get("image_threshold")
    skipped = summary.get("skipped") or []
    low, high = summary.get("colour_scale") or summary.get("map_range") or (0.0, 1.0)
    scale_source = summary.get("colour_scale_source") or "the method's map range"
    colours = colorbar(200, 12, summary.get("colour_map") or "jet")  # the overlays' own
    legend = base64.b64encode(encode_png(colours)).decode("ascii")
    anomalous = summary.get("anomalous")
    image_source = summary.get("image_threshold_source") or "not set"
    pixel_source = summary.get("pixel_threshold_source") or "default"
    facts = [
        ("images scored", str(len(records)), ""),
        ("anomalous", "n/a" if anomalous is None else str(anomalous), ' id="anomalous-count"'),
        ("skipped", str(len(skipped)), ""),
        ("image threshold", f"{_format(image_threshold)} ({image_source})", ""),
        ("pixel threshold", f"{_format(summary.get('pixel_threshold'))} ({pixel_source})", ""),
    ]
    partial = sum(record.get("scored_share") is not None for record in records)
    if partial:
        facts.append(
            (
                "not scored whole",
                f"{partial} images: only their centre square was scored (grey on the overlays)",
                ' id="unscored"',
            )
        )
    if summary.get("false_alarm"):
        promise = summary["false_alarm"]
        promised = f"{describe_false_alarm(promise)}, for the {' and '.join(promise['applies_to'])}"
        facts.append(("thresholds set for", promised + " threshold", ' id="false-alarm"'))
    fact_html = "".join(
        f"<span>{label}: <b{attributes}>{escape(value)}</b></span>"
        for label, value, attributes in facts
    )
    skipped_html = ""
    if skipped:
        items = "".join(
            f"<li><code>{escape(str(s['image']))}</code>: {escape(str(s['reason']))}</li>"
            for s in skipped
        )
        skipped_html = (
            f'<section class="skipped"><h2>Skipped ({len(skipped)} unreadable)</h2>'
            f"<ul>{items}</ul></section>"
        )
    threshold_value = "" if image_threshold is None else repr(float(image_threshold))
    shown = captions([record["image"] for record in ordered])
    cards = "\n".join(_card(record, base, shown[record["image"]]) for record in ordered)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{escape(title)}</h1>
<div class="facts">{fact_html}
<span class="legend">map {low:.4g}<img alt="colour scale"
 src="data:image/png;base64,{legend}">{high:.4g}</span>
<small class="scale-source">colour scale: {escape(scale_source)}</small>
</div>
<div class="controls">
<label>Sort <select id="sort">
<option value="score-desc">score, highest first</option>
<option value="score-asc">score, lowest first</option>
<option value="name">name</option>
</select></label>
<label>Show <select id="show">
<option value="all">all</option>
<option value="anomalous">anomalous</option>
<option value="normal">normal</option>
</select></label>
<label>Image threshold (what-if) <input id="threshold" type="number" step="any"
 value="{threshold_value}"></label>
</div>
<main id="grid">
{cards}
</main>
{skipped_html}
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_report(
    path: str | Path,
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    title: str = "AnomalyCLIP inspection",
) -> Path:
    """Write :func:`render_report` atomically to ``path``; links are relative to its folder."""
    path = Path(path)
    atomic_write_text(path, render_report(records, summary, path.parent, title))
    return path
