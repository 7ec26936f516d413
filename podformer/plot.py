"""Training curves as pictures: a run's ``curves.png`` and an overlay of several runs.

    python -m podformer.plot runs/gpt_tiny runs/gpt_longer --out=cmp.png

Drawn from ``metrics.jsonl`` with matplotlib's Agg canvas (no display, no pyplot state), so a training
process can redraw its own picture at every evaluation.
"""

from __future__ import annotations

import io
import json
import os
import sys

from etils import epath

from podformer.core.errors import UserError

# Curves that are not task metrics: the loss terms and the perplexity of the loss panel.
_NOT_TASK = ("loss", "perplexity")


def read(workdir: str) -> list[dict]:
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{workdir}: no metrics.jsonl there; point at a training run's workdir")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def tokens_per_step(rows: list[dict]) -> int | None:
    """The tokens one step trains on. Each log line has tokens_per_sec = tokens_per_step * steps / time
    and step_time = time / steps (podformer/loop.py), so their product is exactly tokens_per_step."""
    for r in rows:
        if r.get("tokens_per_sec") and r.get("step_time"):
            return round(r["tokens_per_sec"] * r["step_time"])
    return None


def task_metrics(rows: list[dict]) -> list[str]:
    """Evaluation metrics other than losses and perplexity (a fine-tuning task's accuracy, F1, ...)."""
    keys = {k for r in rows for k, v in r.items() if k.startswith("eval_") and isinstance(v, int | float)}
    return sorted(k for k in keys if not any(word in k for word in _NOT_TASK))


def _figure(panels: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5 * panels, 4.8), layout="constrained")
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _tokens_axis(ax, per_step: int | None) -> None:
    if per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel(f"tokens ({per_step:,} per step)")


def _save(fig, out: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    epath.Path(out).write_bytes(buf.getvalue())  # gs:// workdirs too
    return out


def curves(workdir: str, out: str | None = None) -> str:
    """``<workdir>/curves.png`` (or ``out``): training and evaluation loss against step and tokens, the
    learning rate on a second axis; a second panel with the task metrics when the run has any."""
    from matplotlib.ticker import FuncFormatter

    rows = read(workdir)
    tasks = task_metrics(rows)
    fig, axes = _figure(2 if tasks else 1)
    ax = axes[0]
    lines = []
    for key, label, style in (
        ("loss", "train loss", dict(color="tab:blue", lw=1.2)),
        ("eval_loss", "eval loss", dict(color="tab:orange", marker="o")),
    ):
        steps, values = _series(rows, key)
        if steps:
            lines += ax.plot(steps, values, label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    _tokens_axis(ax, tokens_per_step(rows))
    steps, lr = _series(rows, "learning_rate")
    if steps:
        ax_lr = ax.twinx()
        lines += ax_lr.plot(steps, lr, color="tab:green", lw=1, ls="--", label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.1e}"))
    # Below the axes: a legend inside would sit under the learning-rate axis' line.
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    ax.set_title(f"{os.path.basename(os.path.normpath(str(workdir)))}: loss and learning rate")
    if tasks:
        ax = axes[1]
        for key in tasks:
            steps, values = _series(rows, key)
            ax.plot(steps, values, marker="o", label=key[len("eval_") :])
        ax.set_xlabel("step")
        ax.set_ylabel("metric")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4)
        ax.set_title("validation metrics")
    return _save(fig, out or str(epath.Path(workdir) / "curves.png"))


def compare(workdirs: list[str], out: str) -> str:
    """Several runs overlaid: training loss (lines) and evaluation loss (markers) against step and against
    tokens, one colour per run."""
    runs = [(w, read(w)) for w in workdirs]
    fig, (by_step, by_tokens) = _figure(2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (w, rows), color in zip(runs, colors, strict=True):
        name = os.path.basename(os.path.normpath(str(w))) or str(w)
        per_step = tokens_per_step(rows) or 0
        for key, style in (("loss", dict(lw=1.2)), ("eval_loss", dict(marker="o", ls=":"))):
            steps, values = _series(rows, key)
            if not steps:
                continue
            label = f"{name} {'train' if key == 'loss' else 'eval'}"
            by_step.plot(steps, values, color=color, label=label, **style)
            if per_step:
                by_tokens.plot([s * per_step for s in steps], values, color=color, label=label, **style)
    for ax, xlabel in ((by_step, "step"), (by_tokens, "tokens")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    by_step.set_title("loss by step")
    by_tokens.set_title("loss by tokens seen")
    return _save(fig, out)


USAGE = "usage: python -m podformer.plot RUN [RUN ...] [--out=cmp.png]   (one RUN and no --out: RUN/curves.png)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    runs = [a for a in argv if not a.startswith("--")]
    flags = [a for a in argv if a.startswith("--")]
    try:
        bad = [f for f in flags if not f.startswith("--out=")]
        if bad or not runs:
            raise UserError(f"unknown flag {bad[0]}\n{USAGE}" if bad else f"name at least one run\n{USAGE}")
        out = flags[-1][len("--out=") :] if flags else None
        if len(runs) == 1 and out is None:
            print(f"wrote {curves(runs[0])}")
        elif out is None:
            raise UserError(f"several runs need --out=FILE.png\n{USAGE}")
        else:
            print(f"wrote {compare(runs, out)}")
    except UserError as e:
        print(f"podformer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
