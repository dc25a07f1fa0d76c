"""What `torpor policy replay` shows: the rows of a replay as a table, the learned policy
against each fixed timer, and the trade-off curve as a PNG.

Owns: presentation only. The rows come from `policies.replay.sweep` (the semantics live
there); `compare` is a pure function over those rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from assembly.traces import LoadedTrace
from policies.replay import Row
from policies.tiered import format_duration
from torpor.errors import TorporError

__all__ = ["Comparison", "PlotError", "check_plot_available", "compare", "format_report",
           "plot"]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A fixed timer against the learned sweep.

    `learned`: of the learned rows with no more cold starts than `fixed`, the one with the
    least loaded-idle time (then the fewest cold starts); None when every learned row has
    more cold starts. `saving_hours`: `fixed`'s loaded-idle hours minus `learned`'s, so the
    saving at equal or lower cold-start share (negative: the learned policy costs more).
    `dominates`: the learned row also has no more loaded-idle time (saving ≥ 0).
    """

    fixed: Row
    learned: Row | None

    @property
    def saving_hours(self) -> float | None:
        if self.learned is None:
            return None
        return self.fixed.loaded_idle_hours - self.learned.loaded_idle_hours

    @property
    def saving_share(self) -> float | None:
        """The saving as a fraction of the fixed timer's loaded-idle hours."""
        saving = self.saving_hours
        if saving is None or self.fixed.loaded_idle_hours <= 0:
            return None
        return saving / self.fixed.loaded_idle_hours

    @property
    def dominates(self) -> bool:
        saving = self.saving_hours
        return saving is not None and saving >= 0


def compare(rows: Sequence[Row]) -> list[Comparison]:
    """For each fixed-timer row (in order), the best learned row at equal or lower
    cold-start share. Rows of one trace share their windows with calls, so cold starts are
    compared as counts (exact) rather than as shares."""
    learned = [r for r in rows if r.policy != "fixed"]
    result = []
    for fixed in (r for r in rows if r.policy == "fixed"):
        fits = [r for r in learned if r.cold_starts <= fixed.cold_starts]
        best = min(fits, key=lambda r: (r.loaded_idle_hours, r.cold_starts), default=None)
        result.append(Comparison(fixed, best))
    return result


def _percent(share: float) -> str:
    return f"{100 * share:.3f}"


def format_report(loaded: LoadedTrace, rows: Sequence[Row]) -> str:
    """One trace's header, its rows and the comparison, as text."""
    trace = loaded.trace
    lines = [
        f"{trace.name} ({loaded.format}, {loaded.path})",
        f"  {len(trace.services)} services, {trace.windows} windows of "
        f"{format_duration(trace.window)} ({format_duration(trace.windows * trace.window)}), "
        f"{loaded.windows_with_calls} windows with calls",
        "",
    ]
    table = [("policy", "setting", "cold starts %", "loaded-idle h")]
    table += [(r.policy, r.setting, _percent(r.cold_start_share), f"{r.loaded_idle_hours:.1f}")
              for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        lines.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                                row[2].rjust(widths[2]), row[3].rjust(widths[3])]).rstrip())
    lines += ["", "learned vs fixed (the learned setting with no more cold starts and the "
                  "least loaded-idle time):"]
    for c in compare(rows):
        fixed = (f"fixed {c.fixed.setting} ({_percent(c.fixed.cold_start_share)}%, "
                 f"{c.fixed.loaded_idle_hours:.1f} h)")
        if c.learned is None:
            lines.append(f"  {fixed}: none (every learned setting has more cold starts)")
            continue
        saving, share = c.saving_hours or 0.0, c.saving_share
        learned = (f"learned {c.learned.setting} ({_percent(c.learned.cold_start_share)}%, "
                   f"{c.learned.loaded_idle_hours:.1f} h)")
        percent = "" if share is None else f" ({100 * share:.1f}%)"
        if c.dominates:
            lines.append(f"  {fixed}: {learned}, saves {saving:.1f} h loaded-idle{percent}")
        else:
            lines.append(f"  {fixed}: none; at no more cold starts the best is {learned}, "
                         f"{-saving:.1f} h more loaded-idle")
    return "\n".join(lines)


class PlotError(TorporError):
    """--plot cannot work: matplotlib is not installed, or the file cannot be written."""


def check_plot_available() -> None:
    """Raise PlotError now, before a long replay, when --plot cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'torpor[plot]'") from None


def plot(results: Sequence[tuple[LoadedTrace, Sequence[Row]]], path: str | Path) -> None:
    """Cold-start share (x, %) against loaded-idle hours (y), one subplot per trace: the
    fixed timers as labelled points on a line, the learned sweep as a line."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    count = len(results)
    figure, axes = plt.subplots(1, count, figsize=(6.4 * count, 4.8), squeeze=False)
    try:
        for ax, (loaded, rows) in zip(axes[0], results, strict=True):
            fixed = [r for r in rows if r.policy == "fixed"]
            learned = [r for r in rows if r.policy != "fixed" and "prewake" not in r.setting]
            prewake = [r for r in rows if r.policy != "fixed" and "prewake" in r.setting]
            positive = all(r.cold_start_share > 0 for r in rows)
            for series, style, label in ((fixed, "o-", "fixed timer"),
                                         (learned, ".-", "learned (cold-start price)"),
                                         (prewake, ".--", "learned with pre-wake")):
                if series:
                    ax.plot([100 * r.cold_start_share for r in series],
                            [r.loaded_idle_hours for r in series], style, label=label)
            for r in fixed:
                ax.annotate(r.setting, (100 * r.cold_start_share, r.loaded_idle_hours),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
            if positive:
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
                ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
            ax.set_xlabel("cold starts (% of windows with calls)")
            ax.set_ylabel("loaded-idle hours")
            trace = loaded.trace
            ax.set_title(f"{trace.name}: {len(trace.services)} services, "
                         f"{format_duration(trace.window)} windows", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        figure.tight_layout()
        try:
            figure.savefig(path, format="png", dpi=110)
        except OSError as exc:
            raise TorporError(f"{path}: cannot write the plot: {exc.strerror or exc}") from None
    finally:
        plt.close(figure)
