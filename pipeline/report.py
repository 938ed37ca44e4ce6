"""`pipeline report`: a static, self-contained `report.html` to review an output folder.

No network and no external script: one HTML file with its CSS and JS inline, and thumbnails made
once into `thumbs/` (a JPEG of at most 256 px a side, remade only when its image is newer). A grid
of cards (thumbnail, prompt, id, aspect ratio, size), filters by job and by status, the failures
with their reasons, and the last run's figures. Every text from a prompt or a provider is escaped.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.state import State
from pipeline.storage import Store

THUMB_PX = 256
MAX_CARDS = 5000  # beyond this the page would be too heavy to be useful; status has the counts


def write_report(store: Store, state: State) -> str:
    """Write `report.html` (and the thumbnails it needs) into the output; where it is."""
    with state:
        images = [json.loads(line) for _, line in zip(range(MAX_CARDS), state.images(), strict=False)]
        failures = list(state.failures())
        counts, last = state.counts() | {"done_by_model": state.done_by_model()}, state.last_run()
    store.prepare()
    try:
        for row in images:
            row["thumb"] = _thumbnail(store, row["file_name"])
        page = store.spool / ".report.html.tmp"
        page.write_text(_html(store.url, images, failures, counts, last), encoding="utf-8")
        store.put(page, "report.html", replace=True)
    finally:
        store.close()
    return f"{store.url}/report.html"


def _thumbnail(store: Store, file_name: str) -> str:
    """A thumbnail, made once (again when its image is newer, in a local folder)."""
    relative = f"thumbs/{Path(file_name).stem}.jpg"
    if store.exists(relative) and (
        store.local is None
        or (store.local / relative).stat().st_mtime >= (store.local / file_name).stat().st_mtime
    ):
        return relative
    tmp = store.spool / f".{Path(relative).name}"
    with store.open(file_name) as source, Image.open(source) as image:
        image.thumbnail((THUMB_PX, THUMB_PX))
        image.convert("RGB").save(tmp, "JPEG", quality=80)
    store.put(tmp, relative, replace=True)
    return relative


def _html(
    output: str,
    images: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    counts: dict[str, Any],
    last: dict[str, Any] | None,
) -> str:
    jobs = sorted({row["id"] for row in images} | {f["id"] for f in failures})
    cards = "\n".join(_card(row) for row in images) + "\n".join(_failed_card(f) for f in failures)
    rows = "\n".join(
        f"<tr data-job='{escape(f['id'])}'><td>{escape(f['id'])}_{f['index']}</td>"
        f"<td>{escape(str(f['error_type']))}</td><td>{escape(str(f['message']))}</td>"
        f"<td>{f['attempts']}</td></tr>"
        for f in failures
    )
    options = "".join(f"<option>{escape(job)}</option>" for job in jobs)
    return PAGE.format(
        title=escape(output),
        figures=_figures(counts, last),
        options=options,
        cards=cards,
        failures=rows or "<tr><td colspan='4'>No failures.</td></tr>",
        failure_count=len(failures),
        shown=len(images),
        more=f" (first {MAX_CARDS} shown)" if counts["done"] > len(images) else "",
    )


def _card(row: dict[str, Any]) -> str:
    status = "warning" if row.get("aspect_ratio_mismatch") else "done"
    return (
        f"<figure class='card {status}' data-job='{escape(row['id'])}' data-status='{status}'>"
        f"<a href='{escape(row['file_name'])}'><img src='{escape(row['thumb'])}' alt='' loading='lazy'></a>"
        f"<figcaption><p class='prompt'>{escape(row['prompt'])}</p>"
        f"<p class='meta'>{escape(row['id'])}_{row['index']} · {escape(str(row['aspect_ratio']))}"
        f" · {row['width']}x{row['height']}{' · size differs from the preset' * (status == 'warning')}</p>"
        f"</figcaption></figure>"
    )


def _failed_card(failure: dict[str, Any]) -> str:
    return (
        f"<figure class='card failed' data-job='{escape(failure['id'])}' data-status='failed'>"
        f"<div class='noimage'>{escape(str(failure['error_type']))}</div>"
        f"<figcaption><p class='prompt'>{escape(failure['prompt'])}</p>"
        f"<p class='meta'>{escape(failure['id'])}_{failure['index']} · failed: "
        f"{escape(str(failure['message']))}</p></figcaption></figure>"
    )


def _figures(counts: dict[str, Any], last: dict[str, Any] | None) -> str:
    figures = [
        ("images", counts["done"]),
        ("failed", counts["failed"]),
        ("in progress", counts["in_progress"]),
    ]
    figures += [(f"model {name}", n) for name, n in sorted(counts["done_by_model"].items())]
    summary = (last or {}).get("summary") or {}
    if last:
        figures += [
            ("last run", f"#{last['run']}, exit {last['exit_code']}"),
            ("started", last["started_at"]),
            ("requests", summary.get("requests", "")),
            ("retries", sum((summary.get("retries") or {}).values())),
            ("elapsed", f"{summary.get('elapsed_s', '')} s"),
        ]
        for name, p in (summary.get("providers") or {}).items():
            state = f", disabled: {p['disabled']}" if p.get("disabled") else ""
            figures.append(
                (
                    f"provider {name}",
                    f"{p['images']} images, {p['requests']} requests, ${p['cost_usd']:.2f}{state}",
                )
            )
    return "".join(
        f"<div><dt>{escape(name)}</dt><dd>{escape(str(value))}</dd></div>" for name, value in figures
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Report: {title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }}
h1 {{ font-size: 1.3rem; }} h2 {{ font-size: 1.1rem; margin-top: 2rem; }}
dl {{ display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; }} dt {{ color: #666; font-size: .8rem; }}
dd {{ margin: 0; font-weight: 600; }}
.filters {{ margin: 1rem 0; display: flex; gap: 1rem; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 1rem; }}
.card {{ margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; overflow: hidden; }}
.card img {{ width: 100%; height: 200px; object-fit: contain; background: #eee; display: block; }}
.card.warning {{ border-color: #e0a800; }} .card.failed {{ border-color: #c0392b; }}
.noimage {{ height: 200px; display: grid; place-items: center; background: #fbeaea; color: #c0392b; }}
figcaption {{ padding: .5rem; }} .prompt {{ margin: 0 0 .3rem; }} .meta {{ margin: 0; color: #666; }}
table {{ border-collapse: collapse; width: 100%; background: #fff; }}
td, th {{ border: 1px solid #ddd; padding: .3rem .5rem; text-align: left; vertical-align: top; }}
.hidden {{ display: none; }}
</style></head>
<body>
<h1>Report: {title}</h1>
<dl class="figures">{figures}</dl>
<div class="filters">
<label>Job <select id="job"><option value="">all</option>{options}</select></label>
<label>Status <select id="status"><option value="">all</option><option>done</option>
<option>warning</option><option>failed</option></select></label>
<span id="shown">{shown} images{more}</span>
</div>
<div class="grid" id="grid">
{cards}
</div>
<h2 id="failures">Failures ({failure_count})</h2>
<table><thead><tr><th>item</th><th>reason</th><th>message</th><th>attempts</th></tr></thead>
<tbody>
{failures}
</tbody></table>
<script>
const job = document.getElementById("job"), status = document.getElementById("status");
function apply() {{
  let shown = 0;
  for (const el of document.querySelectorAll("[data-job]")) {{
    const ok = (!job.value || el.dataset.job === job.value)
      && (!status.value || !el.dataset.status || el.dataset.status === status.value);
    el.classList.toggle("hidden", !ok);
    if (ok && el.tagName === "FIGURE") shown++;
  }}
  document.getElementById("shown").textContent = shown + " shown";
}}
job.addEventListener("change", apply);
status.addEventListener("change", apply);
</script>
</body></html>
"""
