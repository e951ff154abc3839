"""The HTML page of `hepml report`: one self-contained file (every image embedded as a base64 PNG)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timezone

from hepml_dist.evaluate.report_facts import Run


@dataclass
class Section:
    title: str
    anchor: str
    text: str = ""
    images: list[tuple[str, str]] = field(default_factory=list)  # (base64 png, caption)
    table: str = ""



CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.1em} h2{border-bottom:2px solid #3f90da;padding-bottom:.2em;margin-top:2em}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:1em 0;font-size:.95em}
td,th{padding:.35em .8em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f4f6f8} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.better{color:#1a7f37;font-weight:600} figure{margin:1.2em 0} img{max-width:100%;height:auto}
figcaption{color:#555;font-size:.9em} code{background:#f4f6f8;padding:0 .25em;border-radius:3px}
nav a{margin-right:1em} .note{color:#555;font-size:.9em}
"""


def _better(metric: str, texts: dict[str, str]) -> str | None:
    """Which model wins a headline row (None if not comparable)."""
    def number(text: str) -> float | None:
        text = text.replace("&gt;", "").replace(",", "").split("&plusmn;")[0].split("/")[-1 if "resolution" in metric else 0]
        try:
            return float(text.strip().split()[0].rstrip("%"))
        except (ValueError, IndexError):
            return None

    values = {m: number(t) for m, t in texts.items() if m in ("transformer", "baseline")}
    if len(values) < 2 or None in values.values():
        return None
    lower_is_better = "resolution" in metric
    if "response" in metric and not lower_is_better:
        return None
    best = min(values, key=values.get) if lower_is_better else max(values, key=values.get)
    return best if values["transformer"] != values["baseline"] else None


def render_page(run: Run, facts, headline, sections: list[Section], models: list[str], baseline_html: str,
                seconds: float) -> str:
    """The whole page: summary table, run facts, the sections, the baseline's description (HTML from the family's
    evaluation), notes."""
    columns = models + (["reco jet"] if any("reco jet" in v for _, v in headline) else [])
    rows = []
    for metric, values in headline:
        winner = _better(metric, values)
        cells = "".join(
            f'<td class="num{" better" if m == winner else ""}">{values.get(m, "")}</td>' for m in columns)
        rows.append(f"<tr><td>{html.escape(metric)}</td>{cells}</tr>")
    summary = (f"<table><tr><th>metric (test split)</th>{''.join(f'<th>{m}</th>' for m in columns)}</tr>"
               f"{''.join(rows)}</table>")
    facts_html = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts) + "</table>"
    nav = '<a href="#summary">summary</a><a href="#facts">run</a>' + "".join(
        f'<a href="#{s.anchor}">{html.escape(s.title.split(":")[0])}</a>' for s in sections)
    body = []
    for s in sections:
        parts = [f'<h2 id="{s.anchor}">{html.escape(s.title)}</h2>']
        if s.text:
            parts.append(f"<p>{s.text}</p>")
        if s.table:
            parts.append(s.table)
        for png, caption in s.images:
            parts.append(f'<figure><img alt="{html.escape(s.title)}" src="data:image/png;base64,{png}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        body.append("\n".join(parts))
    if baseline_html:
        body.append('<h2 id="baseline">The baseline</h2>' + baseline_html)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in run.notes)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(run.spec.name)}: run report</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(run.spec.name)}</h1>
<p class="sub">run report of <code>{html.escape(str(run.path.resolve()))}</code>, written {generated} by
<code>hepml report</code> in {seconds:.0f} s</p>
<nav>{nav}{'<a href="#baseline">baseline</a>' if baseline_html else ''}</nav>
<h2 id="summary">Summary</h2>{summary}
<p class="note">Green: the better of transformer and baseline. All numbers from the same test jets and the same code.</p>
<h2 id="facts">Run</h2>{facts_html}
{''.join(body)}
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
</body></html>
"""
