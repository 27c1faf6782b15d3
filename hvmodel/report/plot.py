"""The timeline picture: per VM, where its memory is over guest time, and the host state.

``hvmodel run … --plot out.png`` (or ``out.html``, ``out.svg``) draws, for every VM, a
stacked area of its guest pages that are consumed (private frames), shared,
ballooned, compressed and swapped, its allocation target as a line, and along
the top a band coloured by the host memory state (high … low) — the picture a
person looks at first to see the reclamation policy at work.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from ..machine.pool import PAGE_SIZE

MB = 1 << 20
SERIES = (("consumed", "#4c78a8"), ("shared", "#72b7b2"), ("ballooned", "#f58518"),
          ("compressed", "#e45756"), ("swapped", "#54a24b"))
STATE_COLORS = {"high": "#d9f0d3", "clear": "#a6dba0", "soft": "#fee08b", "hard": "#fdae61", "low": "#d73027"}


def _figure(timeline: list[dict], title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = sorted({n for p in timeline for n in p["vms"]})
    fig, axes = plt.subplots(len(names) + 1, 1, figsize=(10, 1.2 + 2.2 * len(names)), sharex=True,
                             gridspec_kw={"height_ratios": [0.35] + [1] * len(names)})
    t = [p["time_s"] for p in timeline]
    band = axes[0]
    for i, p in enumerate(timeline):
        x0 = t[i - 1] if i else 0.0
        band.axvspan(x0, t[i], color=STATE_COLORS.get(p["state"], "#ccc"), lw=0)
    band.set_yticks([])
    band.set_title(title)
    band.legend(handles=[Patch(color=c, label=s) for s, c in STATE_COLORS.items()], ncol=5, loc="upper center",
                bbox_to_anchor=(0.5, -0.05), fontsize=7, frameon=False)
    for ax, name in zip(axes[1:], names):
        pts = [p["vms"].get(name) for p in timeline]
        ys = [[(q[key] if q else 0) * PAGE_SIZE / MB for q in pts] for key, _ in SERIES]
        ax.stackplot(t, *ys, labels=[k for k, _ in SERIES], colors=[c for _, c in SERIES], alpha=0.9)
        ax.plot(t, [(q["target"] if q else 0) * PAGE_SIZE / MB for q in pts], color="black", lw=1,
                ls="--", label="target")
        ax.set_ylabel(f"{name}\nMB", fontsize=8)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=6, loc="upper right")
    axes[-1].set_xlabel("guest time (s)")
    fig.tight_layout()
    return fig


def write(timeline: list[dict], path: str | Path, title: str = "hvmodel: memory over guest time") -> Path:
    """Write the picture to ``path``: .png, .svg, or .html (an SVG inside a small page)."""
    p = Path(path)
    if not timeline:
        raise ValueError("nothing to plot: the run recorded no timeline")
    fig = _figure(timeline, title)
    suffix = p.suffix.lower()
    if suffix in (".png", ".svg"):
        fig.savefig(p, dpi=110)
    elif suffix in (".html", ".htm"):
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        last = timeline[-1]
        rows = "".join(
            f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{v[k] * PAGE_SIZE / MB:.1f}</td>" for k, _ in SERIES)
            + f"<td>{v['target'] * PAGE_SIZE / MB:.1f}</td></tr>" for n, v in sorted(last["vms"].items()))
        p.write_text(f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>
<body style="font-family: sans-serif"><h1>{html.escape(title)}</h1>{buf.getvalue()}
<h2>At the end (MB), host state {html.escape(last['state'])}</h2>
<table border="1" cellpadding="4"><tr><th>VM</th>{''.join(f'<th>{k}</th>' for k, _ in SERIES)}<th>target</th></tr>
{rows}</table></body>""")
    else:
        raise ValueError(f"--plot: use a .png, .svg or .html file name, not {p.name}")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return p
