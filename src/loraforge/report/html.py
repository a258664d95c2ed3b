"""`report.html` in a run folder: one self-contained page (inline CSS, no scripts, no network,
relative links only) with the config, the dataset, the loss curve and the previews per epoch.

It links only files that exist when it is written, and escapes every string that came from a
user (run names, prompts, tags, config values).
"""

from __future__ import annotations

import glob
import html
import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from loraforge import runs
from loraforge.errors import ForgeError
from loraforge.fsutil import DEFAULT_FILE_MODE, save_atomic, write_atomic
from loraforge.train import previews
from loraforge.train.separation import signed_percent

REPORT = "report.html"
LOSS_PNG = "report-loss.png"
HISTORY = "history.jsonl"
DATASET = "dataset.json"
TOP_TAGS_SHOWN = 12
THUMB = 256

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       margin: 0 auto; max-width: 1200px; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px;
  border-bottom: 1px solid #ddd; padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
.status { display: inline-block; padding: 1px 8px; border-radius: 9px; font-size: 13px;
          background: #eee; vertical-align: middle; }
.status-finished { background: #d8f0dc; } .status-running { background: #dbe8fb; }
.status-failed { background: #f8d7d7; }
.status-interrupted, .status-stopped { background: #fbeed0; }
.facts { color: #555; margin: 4px 0 0; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; background: #fafafa; }
code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 600; }
img { max-width: 100%; height: auto; }
.chart { border: 1px solid #eee; }
.previews { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 260px; } figure img { border: 1px solid #eee; }
figcaption { font-size: 12px; color: #444; word-wrap: break-word; }
.muted { color: #888; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def writable(text: str) -> str:
    """`text` as UTF-8 can hold it: a name that is not UTF-8 (a concept folder unzipped from a
    Windows zip, `caf\\xe9_mage`) shows its bytes escaped instead of failing the write."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte (from a JSON file)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def href(run_dir: Path, path: Path) -> str:
    """A relative, URL-quoted, HTML-escaped link from report.html to `path` (a name that is
    not UTF-8 is quoted by its bytes, so the link still opens the file)."""
    relative = path.relative_to(run_dir)
    return esc("/".join(quote(os.fsencode(part)) for part in relative.parts))


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """`history.jsonl` entries by step. A resumed run rewrites steps it had already logged: a
    step that goes back to S drops every kept entry from S on (so the last occurrence of each
    step wins, and a stale tail of an interrupted attempt is dropped too). Unreadable lines
    (a line cut short by a kill) are skipped."""
    path = Path(run_dir) / HISTORY
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    kept: dict[int, dict[str, Any]] = {}
    last = None
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        step = item.get("step") if isinstance(item, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if last is not None and step <= last:
            for old in [s for s in kept if s >= step]:
                del kept[old]
        kept[step] = item
        last = step
    return [kept[step] for step in sorted(kept)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else esc(value)
    if isinstance(value, float):
        return esc(f"{value:.{digits}g}") if math.isfinite(value) else esc(value)
    return esc(f"{value:,}")


def _value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f'<span class="mono">{esc(json.dumps(value, ensure_ascii=False))}</span>'
    if value is None:
        return '<span class="muted">—</span>'
    return esc(value)


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], total: list[str] | None = None,
           numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in [*rows, *([total] if total else [])]:
        css = ' class="total"' if row is total else ""
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                        for i, c in enumerate(row))
        out.append(f"<tr{css}>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


# --- sections ---------------------------------------------------------------------------------
def _header(run_dir: Path, record: dict[str, Any]) -> str:
    status = runs.status(record)
    facts = []
    recorded = record.get("name")
    if recorded and recorded != run_dir.name:  # its record names the original until trained
        facts.append(f"copied or renamed from {esc(recorded)}")
    if record.get("step") is not None:
        total = record.get("total_steps")
        facts.append(f"step {_number(record.get('step'))}"
                     + (f" of {_number(total)}" if total is not None else ""))
    if record.get("epochs") is not None:
        facts.append(f"{_number(record['epochs'])} epochs")
    if record.get("final_loss") is not None:
        facts.append(f"final loss {_number(record['final_loss'])}")
    if record.get("device"):
        facts.append(f"device {esc(record['device'])}")
    started = record.get("started_at_unix")
    if isinstance(started, (int, float)) and not isinstance(started, bool):
        facts.append("started " + esc(time.strftime("%Y-%m-%d %H:%M", time.localtime(started))))
    if record.get("finished_at"):
        facts.append(f"finished {esc(record['finished_at'])}")
    if record.get("error"):
        facts.append(f"error: {esc(record['error'])}")
    return (f"<h1>{esc(run_dir.name)} <span class=\"status status-{esc(status)}\">"
            f"{esc(status)}</span>"
            f"</h1><p class=\"facts\">{' · '.join(facts)}</p>")


def _config_section(record: dict[str, Any]) -> str:
    config = record.get("config")
    if not isinstance(config, dict) or not config:
        return "<h2>Configuration</h2><p class=\"muted\">not recorded</p>"
    parts = ["<h2>Configuration</h2><details><summary>resolved config (every section)</summary>"]
    for section, values in config.items():
        parts.append(f"<h3>[{esc(section)}]</h3>")
        if isinstance(values, dict):
            parts.append(_table(("key", "value"),
                                ((f"<code>{esc(k)}</code>", _value(v)) for k, v in
                                 values.items())))
        else:
            parts.append(f"<p>{_value(values)}</p>")
    parts.append("</details>")
    return "".join(parts)


def _concepts(run_dir: Path, record: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Concept rows from dataset.json, else from run.json's dataset summary."""
    data = _read_json(Path(run_dir) / DATASET)
    if isinstance(data, dict) and isinstance(data.get("concepts"), (list, dict)):
        data = data["concepts"]
    if isinstance(data, dict):
        data = [{"folder": key, **value} if isinstance(value, dict) else value
                for key, value in data.items()]
    if isinstance(data, list) and all(isinstance(c, dict) for c in data):
        return data, DATASET
    summary = (record.get("dataset") or {}).get("concepts") or {}
    rows = []
    for folder, info in summary.items() if isinstance(summary, dict) else ():
        info = info if isinstance(info, dict) else {}
        images, repeats = info.get("img_count"), info.get("n_repeats")
        rows.append({"name": folder.split("_", 1)[-1], "folder": folder, "images": images,
                     "repeats": repeats,
                     "images_x_repeats": images * repeats if isinstance(images, int)
                     and isinstance(repeats, int) else None})
    return rows, "run.json"


def _tags(value: Any) -> str:
    if not isinstance(value, list) or not value:
        return '<span class="muted">—</span>'
    shown = []
    for item in value[:TOP_TAGS_SHOWN]:  # {"tag", "count"}, as dataset.json holds them
        if isinstance(item, dict) and "tag" in item:
            shown.append(f"{esc(item['tag'])}&nbsp;<span class=\"muted\">"
                         f"{esc(item.get('count', ''))}</span>")
        else:
            shown.append(esc(item))
    more = len(value) - TOP_TAGS_SHOWN
    return ", ".join(shown) + (f", <span class=\"muted\">+{more} more</span>" if more > 0 else "")


def _buckets(value: Any) -> str:
    if not isinstance(value, dict) or not value:
        return '<span class="muted">—</span>'
    return "<br>".join(f"<span class=\"mono\">{esc(size)}</span>: {_number(count)}"
                       for size, count in value.items())


def _dataset_section(run_dir: Path, record: dict[str, Any]) -> str:
    concepts, source = _concepts(run_dir, record)
    if not concepts:
        return "<h2>Dataset</h2><p class=\"muted\">not recorded</p>"
    head = ("concept", "folder", "images", "captioned", "repeats", "images × repeats", "top tags",
            "buckets")
    rows = [[esc(c.get("name", "")), f"<code>{esc(c.get('folder', ''))}</code>",
             _number(c.get("images")), _number(c.get("captioned")), _number(c.get("repeats")),
             _number(c.get("images_x_repeats")), _tags(c.get("top_tags")),
             _buckets(c.get("buckets"))] for c in concepts]

    def total(key: str) -> str:
        values = [c.get(key) for c in concepts]
        ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        return _number(sum(ints)) if ints and len(ints) == len(values) else ""

    totals = ["total", "", total("images"), total("captioned"), "", total("images_x_repeats"),
              "", ""]
    return (f"<h2>Dataset</h2>{_table(head, rows, totals, numeric={2, 3, 4, 5})}"
            f"<p class=\"muted\">from {esc(source)}</p>")


def _loss_section(run_dir: Path, history: list[dict[str, Any]], mode: int) -> str:
    if not history:  # a chart left by an attempt that --restart replaced is not this one's
        (Path(run_dir) / LOSS_PNG).unlink(missing_ok=True)
        return "<h2>Loss</h2><p class=\"muted\">no loss history yet</p>"
    from loraforge.report.chart import loss_chart

    image = loss_chart(history)
    dest = Path(run_dir) / LOSS_PNG
    save_atomic(dest, lambda tmp: image.save(tmp, format="PNG"), mode)
    smoothed = [h.get("loss_smoothed") for h in history
                if isinstance(h.get("loss_smoothed"), (int, float))]
    facts = [f"{len(history):,} steps logged", f"last step {_number(history[-1].get('step'))}",
             f"last loss {_number(history[-1].get('loss'))}"]
    if smoothed:
        facts.append(f"smoothed {_number(smoothed[-1])} (lowest {_number(min(smoothed))})")
    return (f"<h2>Loss</h2><img class=\"chart\" src=\"{href(run_dir, dest)}\" "
            f"width=\"{image.width}\" height=\"{image.height}\" alt=\"loss curve\">"
            f"<p class=\"facts\">{' · '.join(facts)}</p>")


def _loss(value: Any) -> str:
    """A loss to 4 decimals: separation differences show in the third or fourth."""
    if isinstance(value, float) and math.isfinite(value):
        return esc(f"{value:.4f}")
    return _number(value)


def _measured_with(data: dict[str, Any]) -> str:
    """What separation.json was measured with: base model, dataset, held-out pictures, and
    what eval warned of (nothing for a file from before eval recorded them)."""
    facts = [f"{label} <code>{esc(data[key])}</code>" for key, label in
             (("base_model", "base model"), ("dataset", "dataset"), ("held_out", "held-out"))
             if isinstance(data.get(key), str) and data[key]]
    notes = [f"<p>note: {esc(note)}</p>" for note in data.get("notes") or []]
    shown = f"<p class=\"facts\">measured with {' · '.join(facts)}</p>" if facts else ""
    return shown + "".join(notes)


def _separation_section(run_dir: Path) -> str:
    """`loraforge eval`'s table, when it has been run: loss by trigger, per concept."""
    data = _read_json(Path(run_dir) / runs.SEPARATION)
    concepts = data.get("concepts") if isinstance(data, dict) else None
    if not isinstance(concepts, list) or not all(isinstance(c, dict) for c in concepts):
        return ""
    triggers = [str(c.get("trigger")) for c in concepts]
    head = ("concept", "images", *(f"“{t}”" for t in triggers), "no LoRA", "margin")
    rows = []
    for c in concepts:
        loss = c.get("loss") if isinstance(c.get("loss"), dict) else {}
        cells = [f"<b>{_loss(loss.get(t))}</b>" if t == c.get("trigger")
                 else _loss(loss.get(t)) for t in triggers]
        margin = c.get("margin")
        shown = (signed_percent(margin) if isinstance(margin, (int, float))
                 and not isinstance(margin, bool) else "—")
        source = "held-out" if c.get("held_out") else "training, fresh noise"
        rows.append([esc(c.get("name", "")), f"{_number(c.get('images'))} ({source})", *cells,
                     _loss(c.get("no_lora")), esc(shown)])
    pairs = [f"{esc(' / '.join(map(str, p['concepts'])))}: {signed_percent(p['separation'])}"
             for p in data.get("pairs") or [] if isinstance(p, dict)
             and isinstance(p.get("concepts"), list) and isinstance(p.get("separation"), float)]
    shown_pairs = f"<p>pair separation: {' · '.join(pairs)}</p>" if pairs else ""
    return (f"<h2>Concept separation</h2>{_measured_with(data)}"
            f"{_table(head, rows, numeric=set(range(2, len(head))))}{shown_pairs}"
            "<p class=\"muted\">denoising loss of each concept's images at fixed noise and "
            "timesteps (lower is better), prompted with each trigger alone; bold: the concept's "
            "own trigger. margin: how much lower the own trigger is than the best other one "
            "(near 0 or negative: the LoRA does not tell the concepts apart). Pair separation: "
            "both concepts' losses under each other's trigger minus under their own, relative "
            "to their own (a prompt that suits every image cancels out of it). From "
            f"{esc(runs.SEPARATION)}, written by <code>loraforge eval</code>.</p>")


def _prompts(record: dict[str, Any]) -> list[previews.SamplePrompt]:
    config = record.get("config")
    if not isinstance(config, dict):
        return []
    lines = (config.get("train") or {}).get("sample_prompts") or []
    try:
        return previews.parse_sample_prompts([str(line) for line in lines],
                                             previews.defaults_from_config(config))
    except (ForgeError, TypeError, ValueError):
        return []


def _lora_names(run_dir: Path, record: dict[str, Any]) -> list[str]:
    """The names the run's LoRA files go by: the folder's, and for a copied or renamed run
    folder the name its files were saved under (its record's)."""
    return list(dict.fromkeys([run_dir.name, *([record["name"]] if record.get("name") else [])]))


def _final_file(run_dir: Path, record: dict[str, Any]) -> Path:
    """The final LoRA file (by the first of `_lora_names` that has one; may not exist)."""
    finals = [run_dir / f"{name}.safetensors" for name in _lora_names(run_dir, record)]
    return next((path for path in finals if path.is_file()), finals[0])


def _epoch_files(run_dir: Path, record: dict[str, Any]) -> dict[int, Path]:
    """Epoch -> LoRA file that exists: epoch files, and the final file for the last epoch."""
    found: dict[int, Path] = {}
    for name in reversed(_lora_names(run_dir, record)):  # the folder's own name wins
        for path in run_dir.glob(f"{glob.escape(name)}-*.safetensors"):
            number = path.name[len(name) + 1:-len(".safetensors")]
            if number.isdigit() and path.is_file():
                found[int(number)] = path
    final = _final_file(run_dir, record)
    last = record.get("epochs")
    if final.is_file():
        key = last if isinstance(last, int) and not isinstance(last, bool) else \
            max([*found, 0]) + 1
        found[key] = final
    return found


def _size(path: Path) -> str:
    try:
        size = path.stat().st_size
        return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
    except OSError:
        return ""


def _caption(run_dir: Path, epoch: int, index: int, path: Path,
             prompts: list[previews.SamplePrompt]) -> str:
    """The prompt behind a preview, when the config's prompt `index` names this very file."""
    if index < len(prompts) and previews.preview_path(run_dir, epoch, index,
                                                      prompts[index]) == path:
        p = prompts[index]
        text = f"<b>{index}</b> {esc(p.prompt)}"
        if p.negative:
            text += f"<br><span class=\"muted\">negative: {esc(p.negative)}</span>"
        return (f"{text}<br><span class=\"muted\">seed {p.seed} · {p.width}×{p.height} · "
                f"{p.steps} steps · CFG {p.cfg:g}</span>")
    return f"<b>{index}</b> <span class=\"mono\">{esc(path.name)}</span>"


def _grids(run_dir: Path) -> dict[int, Path]:
    found = {}
    for path in (run_dir / previews.SAMPLES_DIR).glob("grid-epoch-*.png"):
        number = path.stem[len("grid-epoch-"):]
        if number.isdigit() and path.is_file():
            found[int(number)] = path
    return found


def _epochs_section(run_dir: Path, record: dict[str, Any]) -> str:
    sampled = previews.sample_epochs(run_dir)
    files = _epoch_files(run_dir, record)
    grids = _grids(run_dir)
    epochs = sorted({*sampled, *files, *grids}, reverse=True)
    if not epochs:
        return "<h2>Epochs</h2><p class=\"muted\">no epoch saved yet</p>"
    prompts = _prompts(record)
    parts = ["<h2>Epochs</h2>"]
    if grids:
        newest = max(grids)
        parts.append(f"<h3>Previews, epoch by epoch (up to epoch {newest})</h3>"
                     f"<a href=\"{href(run_dir, grids[newest])}\"><img src=\""
                     f"{href(run_dir, grids[newest])}\" alt=\"preview grid\"></a>")
    final = _final_file(run_dir, record)
    for epoch in epochs:
        links = []
        if epoch in files:
            label = "final LoRA" if files[epoch] == final else "LoRA"
            links.append(f"{label}: <a href=\"{href(run_dir, files[epoch])}\"><code>"
                         f"{esc(files[epoch].name)}</code></a> <span class=\"muted\">"
                         f"{esc(_size(files[epoch]))}</span>")
        if epoch in grids:
            links.append(f"<a href=\"{href(run_dir, grids[epoch])}\">grid up to this epoch</a>")
        parts.append(f"<h3>Epoch {epoch}</h3>")
        if links:
            parts.append(f"<p>{' · '.join(links)}</p>")
        images = previews.epoch_previews(run_dir, epoch)
        if images:
            parts.append("<div class=\"previews\">")
            for index, path in images:
                link = href(run_dir, path)
                caption = _caption(run_dir, epoch, index, path, prompts)
                parts.append(f"<figure><a href=\"{link}\"><img src=\"{link}\" width=\"{THUMB}\" "
                             f"alt=\"preview {index}\" loading=\"lazy\"></a><figcaption>"
                             f"{caption}</figcaption></figure>")
            parts.append("</div>")
    return "".join(parts)


def render_report(run_dir: Path, mode: int = DEFAULT_FILE_MODE) -> str:
    """The page's HTML (writes the loss PNG it links to, when there is a history)."""
    run_dir = Path(run_dir)
    record = runs.shown_record(run_dir) or {}  # a damaged run.json said, not "unknown"
    body = [_header(run_dir, record), _config_section(record),
            _dataset_section(run_dir, record), _loss_section(run_dir, read_history(run_dir), mode),
            _separation_section(run_dir),
            _epochs_section(run_dir, record),
            f"<p class=\"muted\">written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))} by "
            "loraforge</p>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(run_dir.name)}: LoRA Forge run report</title><style>{CSS}</style></head>"
            f"<body>\n{''.join(body)}\n</body></html>\n")


def write_report(run_dir: Path, mode: int = DEFAULT_FILE_MODE) -> Path:
    """Write `report.html` (and `report-loss.png` beside it) atomically; return its path."""
    run_dir = Path(run_dir)
    dest = run_dir / REPORT
    write_atomic(dest, writable(render_report(run_dir, mode)), mode)
    return dest
