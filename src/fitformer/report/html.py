"""The self-contained ``report.html`` of a compress run: plots inlined as base64 PNG, no network, no scripts.

Sections: the constraints and whether the chosen model meets them; teacher and candidates side by side
(measured accuracy, host latency and size, modelled cost per device); predicted against measured host
latency; per device, the searched points (weight-error proxy against the objective) with the Pareto front,
the teacher, the candidates and the chosen model marked; the chosen model's per-layer decisions.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from ..io import write_text_atomic

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.ok{color:#070}
.bad{color:#b00}img{max-width:100%}"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        return html.escape(str(x))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def pareto_figure(front: dict[str, Any], metric: str, evaluation: dict[str, Any], chosen: str | None,
                  device: str) -> str:
    """Two panels: proxy against the objective (all searched points, front, marks) and measured test
    accuracy against the modelled objective (teacher and candidates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    hist = front["history"]
    left.scatter([h["metrics"][metric] for h in hist], [h["metrics"]["proxy_loss"] for h in hist], s=8,
                 c="#bbb", label="searched")
    pts = sorted((h["metrics"][metric], h["metrics"]["proxy_loss"]) for h in front["front"])
    left.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, c="#1f77b4", label="Pareto front")
    left.scatter([front["teacher"][metric]], [0.0], marker="*", s=160, c="k", label="teacher", zorder=5)
    keys = [k for k in evaluation if k != "teacher" and not k.startswith("baseline:")]
    by_key = {h["key"]: h for h in hist}
    for k in keys:
        if k in by_key:
            m = by_key[k]["metrics"]
            is_chosen = k == chosen
            left.scatter([m[metric]], [m["proxy_loss"]], marker="D" if is_chosen else "s", s=70 if is_chosen else 35,
                         c="#d62728" if is_chosen else "#ff7f0e", zorder=6,
                         label="chosen" if is_chosen else None)
    left.set_xlabel(f"{metric} on {device} (modelled)")
    left.set_ylabel("weight-error proxy (lower is better)")
    left.legend(fontsize=8)
    for k, row in evaluation.items():
        x = row["modelled"][device][metric]
        style = {"teacher": ("*", 160, "k")}.get(k, ("D", 70, "#d62728") if k == chosen else ("s", 35, "#ff7f0e"))
        if k.startswith("baseline:"):
            style = ("^", 60, "#2ca02c")
        right.scatter([x], [row["test_accuracy"]], marker=style[0], s=style[1], c=style[2], zorder=5)
        right.annotate(_name(k, 6), (x, row["test_accuracy"]), fontsize=7,
                       textcoords="offset points", xytext=(4, 4))
    right.set_xlabel(f"{metric} on {device} (modelled); triangle: baseline")
    right.set_ylabel("test accuracy (measured)")
    fig.suptitle(device)
    uri = _png(fig)
    plt.close(fig)
    return uri


def _name(key: str, width: int = 12) -> str:
    """Row label: teacher, a baseline's name, or a candidate's short key."""
    return key if key == "teacher" or key.startswith("baseline:") else key[:width]


def layer_rows(spec: dict[str, Any]) -> list[list[Any]]:
    """One row per searched weight: format, rank / TT modes, bits, sparsity, weight bytes and share."""
    from ..search.space import CandidateSpec

    cand = CandidateSpec.from_dict(spec)
    sizes = [x.params * x.bits / 8 for x in cand.all_layers()]
    total = sum(sizes) or 1.0
    rows = []
    for x, size in zip(cand.all_layers(), sizes, strict=True):
        shape = f"{x.in_modes}->{x.out_modes}" if x.format == "tt" else ""
        rows.append([x.name, f"{x.in_features}x{x.out_features}", x.format, x.rank or "", shape, x.bits,
                     x.sparsity, int(size), f"{100 * size / total:.1f}%"])
    return rows


def write_report(path: Path, config, summary: dict[str, Any], fronts: dict[str, Any],
                 candidates: list[dict[str, Any]], evaluation: dict[str, Any]) -> Path:
    """Write the report; every image is inlined, so the file stands alone."""
    metric = config.objective_metric
    chosen = summary["chosen"]["key"] if summary.get("chosen") else None
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fitformer compress report</title>"
             f"<style>{CSS}</style></head><body><h1>fitformer compress: {html.escape(config.model)}</h1>",
             f"<p>Run directory <code>{html.escape(str(path.parent))}</code>; objective <b>{config.objective}</b>; "
             f"target devices {html.escape(', '.join(config.devices))}. Status: <b>{summary['status']}</b>.</p>"]
    parts.append("<h2>Constraints</h2>")
    if summary["constraints"]:
        parts.append(_table(["constraint", "limit", "chosen model", "unit", "met"],
                            [[c["name"], c["limit"], c["value"], c["unit"], "yes" if c["met"] else "NO"]
                             for c in summary["constraints"]]))
    else:
        reason = summary.get("reason") or f"no candidate keeps max_accuracy_drop {config.max_accuracy_drop:g} points"
        parts.append(f"<p class='bad'>{html.escape(reason[0].upper() + reason[1:])}.</p>")
    primary = config.devices[0]
    rows = []
    for k, row in evaluation.items():
        m = row["modelled"][primary]
        rows.append([_name(k) + (" (chosen)" if k == chosen else ""), row.get("runtime", "pytorch"),
                     row["test_accuracy"], row["latency_ms_b1"], row["latency_ms_b32"], row["size_bytes"],
                     row["model_bytes"], m["latency_ms"], m["energy_mj"], m["edp_mjs"]])
    parts += ["<h2>Teacher, baselines and candidates</h2>",
              f"<p>Measured on this host, each model as it ships (quantized: packed integer weights, run in "
              f"onnxruntime on integer kernels): test accuracy, latency at batch 1 and 32 of {config.max_length} "
              "tokens (fewer if the model has fewer positions), "
              f"weights on disk. Modelled on {html.escape(primary)}: latency, energy, EDP (batch "
              f"{config.latency_batch}, {config.seq_len} tokens).</p>",
              _table(["model", "runtime", "test acc", "host ms b1", "host ms b32", "bytes on disk", "predicted bytes",
                      "model ms", "model mJ", "model EDP mJ*s"], rows),
              "<h2>Predicted against measured host latency</h2>",
              f"<p>Predicted: the analytic model of {html.escape(primary)} at the measured shapes.</p>",
              _table(["model", "predicted b1", "measured b1", "predicted b32", "measured b32"],
                     [[_name(k), r["predicted_ms_b1"], r["latency_ms_b1"],
                       r["predicted_ms_b32"], r["latency_ms_b32"]] for k, r in evaluation.items()])]
    parts.append("<h2>Pareto fronts</h2>")
    for device, front in fronts.items():
        parts.append(f"<img alt='Pareto front on {html.escape(device)}' "
                     f"src='{pareto_figure(front, metric, evaluation, chosen, device)}'>")
    if chosen is not None:
        spec = next(c["spec"] for c in candidates if c["key"] == chosen)
        a = spec["arch"]
        parts += ["<h2>Chosen model: per-layer decisions</h2>",
                  f"<p>{a['num_layers']} layers, hidden {a['hidden_size']}, heads {a['heads']}, FFN {a['ffn']}. "
                  "Share: of the searched weights' bytes.</p>",
                  _table(["layer", "in x out", "format", "rank", "TT modes", "bits", "sparsity", "bytes", "share"],
                         layer_rows(spec))]
    parts.append("</body></html>")
    write_text_atomic(path, "\n".join(parts))
    return path
