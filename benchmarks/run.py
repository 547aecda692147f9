"""Run the voxpipe-vs-Pipecat benchmarks side by side and report them.

    python benchmarks/run.py                 # everything, report sizes (~3 min)
    python benchmarks/run.py --quick         # smoke run (~1-2 min)
    python benchmarks/run.py --only a        # a: per-frame overhead, b: interrupt, c: concurrent calls + memory

Both sides run in the same invocation, with alternating repetitions, so a busy machine hurts both alike. The
concurrent-calls sweep and the idle-memory figure run each point in a fresh subprocess (``--one-concurrent`` /
``--one-memory``) pinned to one core with ``taskset``, so every point starts from a clean interpreter and
"per core" means one core. The in-process benchmarks pin this process to the same core.

Writes ``benchmarks/results/latest.json`` (raw figures; sections not re-run are kept from the previous file),
``benchmarks/results/latest.md`` (the markdown block for ``docs/benchmarks.md``, also printed) and PNG plots in
``docs/img/``. Without Pipecat installed it runs the voxpipe side alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
IMG = ROOT / "docs" / "img"
sys.path.insert(0, str(HERE))

import voxpipe_side  # noqa: E402  (needs the path above)

INSTALL_HINT = "install the bench extra: pip install -e .[bench]"
P99_BUDGET_MS = 5.0
OVERLOADED_P99_MS = 100.0  # stop a sweep once a side is this far gone: larger N only gets worse
SIDES = ("voxpipe", "pipecat")
console = Console(stderr=True)  # progress on stderr, so stdout is the pasteable markdown


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is; ``--quick`` shrinks everything to a smoke run."""

    overhead_stages: tuple[int, ...] = (1, 8)
    overhead_frames: int = 5000
    overhead_reps: int = 9
    interrupt_reps: int = 20
    pipecat_realtime_reps: int = 3  # Pipecat with a sink that plays in real time: slow, so few
    seconds: float = 5.0
    voxpipe_ns: tuple[int, ...] = (100, 200, 400, 600, 800, 1000, 1200, 1400, 1600, 1800)
    pipecat_ns: tuple[int, ...] = (25, 50, 100, 150, 200)
    idle_n: int = 200


QUICK = Sizes(
    overhead_stages=(8,),
    overhead_frames=2000,
    overhead_reps=3,
    interrupt_reps=3,
    pipecat_realtime_reps=0,
    seconds=2.5,
    voxpipe_ns=(100, 600),
    pipecat_ns=(100, 200),
    idle_n=50,
)


# ------------------------------------------------------------------------------------------ sides


def load_sides() -> dict[str, ModuleType]:
    """The benchmark modules to run: voxpipe always, Pipecat when it is installed."""
    sides: dict[str, ModuleType] = {"voxpipe": voxpipe_side}
    try:
        import pipecat_side
    except ImportError as exc:
        reason = exc.__cause__ or exc  # pipecat_side re-raises with the hint; show what was really missing
        console.print(f"[yellow]Pipecat is not importable ({reason}): {INSTALL_HINT}. Running voxpipe only.")
    else:
        sides["pipecat"] = pipecat_side
    return sides


def side_module(name: str) -> ModuleType:
    """Import one side by name (for the subprocess modes)."""
    if name == "voxpipe":
        return voxpipe_side
    if name == "pipecat":
        try:
            import pipecat_side
        except ImportError as exc:
            raise SystemExit(f"{INSTALL_HINT} ({exc})") from exc
        return pipecat_side
    raise SystemExit(f"unknown side {name!r}; expected one of {SIDES}")


def accepts(fn: Callable[..., Any], keyword: str) -> bool:
    return keyword in inspect.signature(fn).parameters


# ------------------------------------------------------------------------------------ statistics


def pct(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile; NaN for no values (a side that did not run)."""
    return float(np.percentile(values, q)) if values else float("nan")


def stats(values: Sequence[float]) -> dict[str, float]:
    return {"median": pct(values, 50), "p95": pct(values, 95), "max": max(values, default=float("nan"))}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# -------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """What the figures were measured on; read before this process pins itself to one core."""
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):
        nproc = os.cpu_count() or 0
    return {
        "nproc": nproc,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "pipecat": package_version("pipecat-ai"),
        "voxpipe": package_version("voxpipe"),
        "loadavg_at_start": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pin_command(core: int) -> list[str]:
    """``taskset -c CORE`` when taskset exists and the core is ours to use; else nothing (noted in results)."""
    if shutil.which("taskset") and core in os.sched_getaffinity(0):
        return ["taskset", "-c", str(core)]
    console.print(f"[yellow]cannot pin to core {core} (no taskset or core unavailable): running unpinned")
    return []


# ------------------------------------------------------------------------------------- progress


@contextmanager
def progress_bar() -> Iterator[Progress]:
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        yield progress


def fresh_run(coro: Any) -> Any:
    """Run one repetition in a fresh event loop, after collecting the previous one's garbage."""
    gc.collect()
    return asyncio.run(coro)


# -------------------------------------------------------------------------- a. per-frame overhead


def bench_overhead(sides: dict[str, ModuleType], sizes: Sizes, lean: bool, progress: Progress) -> dict[str, Any]:
    """Alternating repetitions (v,p then p,v …) per stage count: drift and warm caches hit both sides alike."""
    runs: dict[str, dict[str, list[float]]] = {str(n): {name: [] for name in sides} for n in sizes.overhead_stages}
    task = progress.add_task("a. per-frame overhead", total=len(runs) * len(sides) * sizes.overhead_reps, last="")
    for n_stages in sizes.overhead_stages:
        for rep in range(sizes.overhead_reps):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for name in order:
                us = fresh_run(sides[name].per_frame_overhead(n_stages, sizes.overhead_frames, lean))
                runs[str(n_stages)][name].append(us)
                progress.update(task, advance=1, last=f"{name} {n_stages} stages: {us:.2f} µs")
    return {"frames": sizes.overhead_frames, "reps": sizes.overhead_reps, "runs": runs}


# ---------------------------------------------------------------------------- b. interrupt latency


def interrupt_plan(sides: dict[str, ModuleType], sizes: Sizes) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(label, side, mode, extra kwargs) in run order; the labels are the rows of the report."""
    plan: list[tuple[str, str, str, dict[str, Any]]] = []
    for mode in ("steady", "burst"):
        plan += [(mode, name, mode, {}) for name in sides]
    plan.append(("burst-buffered", "voxpipe", "burst-buffered", {}))
    pipecat = sides.get("pipecat")
    if pipecat is not None and sizes.pipecat_realtime_reps and accepts(pipecat.interrupt_latency, "play_realtime"):
        plan += [(f"{mode}, real-time sink", "pipecat", mode, {"play_realtime": True}) for mode in ("steady", "burst")]
    return plan


def bench_interrupt(sides: dict[str, ModuleType], sizes: Sizes, lean: bool, progress: Progress) -> dict[str, Any]:
    plan = interrupt_plan(sides, sizes)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    reps_of = {
        label: sizes.pipecat_realtime_reps if "real-time" in label else sizes.interrupt_reps for label, *_ in plan
    }
    task = progress.add_task("b. interrupt → silence", total=sum(reps_of[label] for label, *_ in plan), last="")
    for rep in range(sizes.interrupt_reps):
        for label, name, mode, extra in plan:
            if rep >= reps_of[label]:
                continue
            result = fresh_run(sides[name].interrupt_latency(mode, lean, **extra))
            runs.setdefault(label, {}).setdefault(name, []).append(result)
            progress.update(task, advance=1, last=f"{name} {label}: {result['to_silence_ms']:.2f} ms")
    return {"reps": sizes.interrupt_reps, "runs": runs}


# --------------------------------------------------------------- c. concurrent calls and idle memory


def run_child(args: list[str], pin: list[str], timeout: float) -> Any:
    """Run this script in a pinned subprocess and return the JSON it prints last."""
    command = [*pin, sys.executable, str(Path(__file__).resolve()), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{tail}")
    return json.loads(lines[-1])


def sweep(
    name: str, ns: Sequence[int], sizes: Sizes, lean: bool, pin: list[str], progress: Progress, task: Any
) -> list[dict[str, Any]]:
    """One subprocess per N, smallest first; stops once two points in a row are hopelessly overloaded."""
    points: list[dict[str, Any]] = []
    for i, n in enumerate(ns):
        args = ["--one-concurrent", name, str(n), str(sizes.seconds), *([] if lean else ["--pipecat-defaults"])]
        point = {"n": n, **run_child(args, pin, timeout=sizes.seconds + 180 + 0.5 * n)}
        points.append(point)
        progress.update(task, advance=1, last=f"{name} N={n}: p99 {point['p99_ms']:.2f} ms")
        if len(points) >= 2 and all(p["p99_ms"] > OVERLOADED_P99_MS for p in points[-2:]):
            progress.update(task, advance=len(ns) - i - 1)
            break
    return points


def largest_within_budget(points: Sequence[dict[str, Any]]) -> int | None:
    """The largest N tried whose p99 lateness is within budget (None if none is)."""
    ok = [p["n"] for p in points if p["p99_ms"] <= P99_BUDGET_MS]
    return max(ok) if ok else None


def bench_concurrency(
    sides: dict[str, ModuleType], sizes: Sizes, lean: bool, pin: list[str], progress: Progress
) -> dict[str, Any]:
    ns = {"voxpipe": sizes.voxpipe_ns, "pipecat": sizes.pipecat_ns}
    task = progress.add_task("c. concurrent calls (1 core)", total=sum(len(ns[name]) for name in sides), last="")
    curves = {name: sweep(name, ns[name], sizes, lean, pin, progress, task) for name in sides}
    task = progress.add_task("c. idle memory", total=len(sides), last="")
    memory: dict[str, float] = {}
    for name in sides:
        args = ["--one-memory", name, str(sizes.idle_n), *([] if lean else ["--pipecat-defaults"])]
        memory[name] = run_child(args, pin, timeout=300)["kib"]
        progress.update(task, advance=1, last=f"{name}: {memory[name]:.1f} KiB")
    return {
        "seconds": sizes.seconds,
        "pinned": " ".join(pin) or "unpinned",
        "curves": curves,
        "largest_n_within_budget": {name: largest_within_budget(points) for name, points in curves.items()},
        "idle_n": sizes.idle_n,
        "idle_kib": memory,
    }


def one_concurrent(side: str, n: int, seconds: float, lean: bool) -> None:
    """Subprocess mode: one concurrent-calls point, printed as JSON."""
    print(json.dumps(side_module(side).concurrent_calls(n, seconds, lean)), flush=True)


def one_memory(side: str, n: int, lean: bool) -> None:
    """Subprocess mode: idle memory per call, printed as JSON."""
    print(json.dumps({"kib": side_module(side).idle_memory_kib(n, lean)}), flush=True)


# ------------------------------------------------------------------------------------- results


def load_previous() -> dict[str, Any]:
    """The last results file, so ``--only`` refreshes one section and keeps the others."""
    path = RESULTS / "latest.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def save(results: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    (RESULTS / "latest.md").write_text(markdown)


# ------------------------------------------------------------------------------------- markdown


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # None or NaN
        return "—"
    return f"{value:.{digits}f}"


def md_overhead(section: dict[str, Any]) -> list[str]:
    lines = [
        f"#### Per-frame overhead — µs per frame per stage ({section['frames']} frames back to back, "
        f"{section['reps']} alternating repetitions; {section['command']})",
        "",
        "| stages | voxpipe median | voxpipe p95 | Pipecat median | Pipecat p95 | Pipecat / voxpipe (medians) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n_stages, by_side in section["runs"].items():
        v, p = stats(by_side.get("voxpipe", [])), stats(by_side.get("pipecat", []))
        lines.append(
            f"| {n_stages} | {fmt(v['median'])} | {fmt(v['p95'])} | {fmt(p['median'])} | {fmt(p['p95'])} "
            f"| {fmt(ratio(p['median'], v['median']), 1)}x |"
        )
    return lines


def interrupt_cells(results: Sequence[dict[str, float]]) -> tuple[str, str, str, str]:
    """Median and p95 to-silence, and the worst stale counts over the repetitions ('—' if not run)."""
    if not results:
        return "—", "—", "—", "—"
    silence = stats([r["to_silence_ms"] for r in results])
    played = max(int(r["stale_after_interrupt"]) for r in results)
    reached = max(int(r.get("stale_reaching_output", r["stale_after_interrupt"])) for r in results)
    return fmt(silence["median"], 3), fmt(silence["p95"], 3), str(played), str(reached)


def md_interrupt(section: dict[str, Any]) -> list[str]:
    lines = [
        f"#### Barge-in → silence ({section['reps']} repetitions per mode; {section['command']})",
        "",
        "To-silence: ms from the interrupt decision until the output has flushed (voxpipe: end of "
        "`PlayoutOutput.on_interrupt`; Pipecat: last stale frame reaching its output sink, or the interruption "
        "reaching it). Stale: old-reply frames after the decision, worst repetition — played by the sink / "
        "reaching the output stage (Pipecat's sink has no playout, so both are arrivals at the sink).",
        "",
        "| mode | voxpipe median ms | voxpipe p95 ms | voxpipe stale played / reached | "
        "Pipecat median ms | Pipecat p95 ms | Pipecat stale played / reached |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, by_side in section["runs"].items():
        vm, vp, vs, vr = interrupt_cells(by_side.get("voxpipe", []))
        pm, pp, ps, pr = interrupt_cells(by_side.get("pipecat", []))
        lines.append(f"| {label} | {vm} | {vp} | {vs} / {vr} | {pm} | {pp} | {ps} / {pr} |")
    return lines


def md_concurrency(section: dict[str, Any]) -> list[str]:
    curves = section["curves"]
    ns = sorted({p["n"] for points in curves.values() for p in points})
    by_n = {name: {p["n"]: p for p in points} for name, points in curves.items()}
    lines = [
        f"#### Concurrent real-time calls on one core ({section['pinned']}; {section['seconds']} s per point, "
        f"first second ignored; {section['command']})",
        "",
        "Each call: source (one 20 ms frame every 20 ms) → 4 pass-through stages → sink; lateness = sink time - "
        "frame due time, in ms.",
        "",
        "| calls | voxpipe p50 | voxpipe p99 | voxpipe max | Pipecat p50 | Pipecat p99 | Pipecat max |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in ns:
        cells = []
        for name in SIDES:
            p = by_n.get(name, {}).get(n)
            cells += [fmt(p["p50_ms"]), fmt(p["p99_ms"]), fmt(p["max_ms"])] if p else ["—"] * 3
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    best = section["largest_n_within_budget"]
    lines += [
        "",
        "Largest N tried with p99 ≤ 5 ms: "
        + ", ".join(
            f"{name} **{best.get(name) if best.get(name) is not None else 'none'}**" for name in SIDES if name in best
        ),
    ]
    lines += [
        "",
        f"Idle memory (tracemalloc, {section['idle_n']} idle running calls): "
        + ", ".join(f"{name} **{fmt(kib, 1)} KiB** per call" for name, kib in section["idle_kib"].items()),
    ]
    return lines


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """DESIGN §11 targets for voxpipe: (target, measured, met); met is None when the section did not run."""
    rows: list[tuple[str, str, bool | None]] = []
    if "overhead" in results:
        worst = max(stats(by["voxpipe"])["median"] for by in results["overhead"]["runs"].values())
        rows.append(("≤ 4 µs per frame per stage", f"{worst:.2f} µs (worst median)", worst <= 4.0))
    if "interrupt" in results:
        runs = [r for by in results["interrupt"]["runs"].values() for r in by.get("voxpipe", [])]
        worst_ms = max(r["to_silence_ms"] for r in runs)
        stale = max(max(r["stale_after_interrupt"], r["stale_reaching_output"]) for r in runs)
        rows.append(("≤ 1 ms barge-in → silence", f"{worst_ms:.3f} ms (worst of all runs)", worst_ms <= 1.0))
        rows.append(("0 stale frames after it, burst included", f"{stale} (worst)", stale == 0))
    if "concurrency" in results:
        best = results["concurrency"]["largest_n_within_budget"].get("voxpipe")
        kib = results["concurrency"]["idle_kib"].get("voxpipe", float("nan"))
        rows.append(
            (
                "≥ 600 calls per core at p99 ≤ 5 ms",
                f"{best if best is not None else 'none'} (largest N tried)",
                best is not None and best >= 600,
            )
        )
        rows.append(("≤ 100 KiB per idle call", f"{kib:.1f} KiB", kib <= 100))
    return rows


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"### voxpipe vs Pipecat {m['pipecat'] or '(not installed)'} — {m['date']}",
        "",
        f"Machine: {m['cpu']}, nproc {m['nproc']}, Python {m['python']}, voxpipe {m['voxpipe']}, "
        f"pipecat-ai {m['pipecat'] or 'not installed'}; load average at start {m['loadavg_at_start']:.2f}. "
        f"Pipecat settings: {results.get('pipecat_settings', 'lean')}.",
    ]
    for key, render in (("overhead", md_overhead), ("interrupt", md_interrupt), ("concurrency", md_concurrency)):
        if key in results:
            lines += ["", *render(results[key])]
    lines += ["", "#### voxpipe targets (DESIGN §11)", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in targets(results):
        lines.append(f"| {target} | {measured} | {'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ plots


def plot_all(results: dict[str, Any]) -> list[Path]:
    """PNG plots in docs/img; skipped (with a note) if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print(f"[yellow]matplotlib not installed: no plots ({INSTALL_HINT})")
        return []
    IMG.mkdir(parents=True, exist_ok=True)
    written = []
    for key, plot in (("overhead", plot_overhead), ("interrupt", plot_interrupt), ("concurrency", plot_concurrency)):
        if key in results:
            fig = plot(plt, results[key])
            path = IMG / f"bench_{key}.png"
            fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


COLORS = {"voxpipe": "#2a7ab0", "pipecat": "#d9822b"}


def grouped_bars(
    plt: Any,
    groups: list[str],
    values: dict[str, list[float]],
    upper: dict[str, list[float]],
    ylabel: str,
    title: str,
    log: bool,
) -> Any:
    """Median bars per side with a whisker up to the p95."""
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(values), 1)
    for i, (name, medians) in enumerate(values.items()):
        xs = [g + (i - (len(values) - 1) / 2) * width for g in range(len(groups))]
        err = [[0.0] * len(medians), [max(u - m, 0.0) for u, m in zip(upper[name], medians, strict=True)]]
        ax.bar(xs, medians, width, yerr=err, capsize=3, label=name, color=COLORS.get(name))
        for x, m, u in zip(xs, medians, upper[name], strict=True):
            label_bar(ax, x, m, u)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        log_axis(ax)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * (2.0 if log else 1.08))  # head-room for the labels above the whiskers
    ax.legend()
    return fig


def label_bar(ax: Any, x: float, median: float, top: float) -> None:
    """Write the median above the bar's whisker, where it cannot collide with it."""
    if median != median:  # NaN: this side did not run this group
        return
    y = top if top == top and top > median else median
    ax.annotate(
        f"{median:.3g}", (x, y), ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points"
    )


def log_axis(ax: Any) -> None:
    """Log scale with plain-number tick labels (0.1, 1, 10 rather than 10^-1 …)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_overhead(plt: Any, section: dict[str, Any]) -> Any:
    groups = list(section["runs"])
    names = [n for n in SIDES if any(n in section["runs"][g] for g in groups)]
    med = {n: [stats(section["runs"][g].get(n, []))["median"] for g in groups] for n in names}
    p95 = {n: [stats(section["runs"][g].get(n, []))["p95"] for g in groups] for n in names}
    return grouped_bars(
        plt,
        [f"{g} stage{'' if g == '1' else 's'}" for g in groups],
        med,
        p95,
        "µs per frame per stage (median, p95)",
        "Per-frame overhead (lower is better)",
        log=False,
    )


def plot_interrupt(plt: Any, section: dict[str, Any]) -> Any:
    groups = [label for label in section["runs"] if "real-time" not in label]
    names = [n for n in SIDES if any(n in section["runs"][g] for g in groups)]

    def column(name: str, q: float) -> list[float]:
        return [pct([r["to_silence_ms"] for r in section["runs"][g].get(name, [])], q) for g in groups]

    return grouped_bars(
        plt,
        groups,
        {n: column(n, 50) for n in names},
        {n: column(n, 95) for n in names},
        "ms, interrupt decision → silence (median, p95)",
        "Barge-in to silence (lower is better)",
        log=True,
    )


def plot_concurrency(plt: Any, section: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in section["curves"].items():
        ax.plot(
            [p["n"] for p in points],
            [p["p99_ms"] for p in points],
            marker="o",
            label=f"{name} p99",
            color=COLORS.get(name),
        )
        ax.plot(
            [p["n"] for p in points],
            [p["p50_ms"] for p in points],
            marker=".",
            linestyle=":",
            label=f"{name} p50",
            color=COLORS.get(name),
        )
    ax.axhline(P99_BUDGET_MS, color="grey", linestyle="--", label="5 ms budget")
    log_axis(ax)
    ax.set_xlabel("concurrent calls on one core")
    ax.set_ylabel("sink lateness, ms")
    ax.set_title("Real-time lateness vs concurrent calls (lower is better)")
    ax.legend()
    return fig


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="voxpipe vs Pipecat benchmarks, side by side")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of ~1-2 minutes")
    parser.add_argument(
        "--only",
        choices=("a", "b", "c"),
        action="append",
        help="a: per-frame overhead, b: interrupt latency, c: concurrent calls + idle memory (repeatable; default all)",
    )
    parser.add_argument("--core", type=int, default=0, help="the core to pin to (default 0)")
    parser.add_argument(
        "--pipecat-defaults", action="store_true", help="run Pipecat with its default settings instead of the lean ones"
    )
    parser.add_argument("--one-concurrent", nargs=3, metavar=("SIDE", "N", "SECONDS"), help=argparse.SUPPRESS)
    parser.add_argument("--one-memory", nargs=2, metavar=("SIDE", "N"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    parts = ["python benchmarks/run.py", *(["--quick"] if args.quick else [])]
    parts += [f"--only {only}" for only in args.only or []]
    parts += [f"--core {args.core}"] if args.core else []
    parts += ["--pipecat-defaults"] if args.pipecat_defaults else []
    return "`" + " ".join(parts) + "`"


def run_all(args: argparse.Namespace) -> None:
    sizes = QUICK if args.quick else Sizes()
    lean = not args.pipecat_defaults
    only = set(args.only or "abc")
    results = load_previous()
    results["machine"] = machine_info()
    results["pipecat_settings"] = "lean" if lean else "defaults"
    pin = pin_command(args.core)
    if pin:
        os.sched_setaffinity(0, {args.core})  # the in-process benchmarks run on the same core
    sides = load_sides()
    with progress_bar() as progress:
        sections: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
            "a": ("overhead", lambda: bench_overhead(sides, sizes, lean, progress)),
            "b": ("interrupt", lambda: bench_interrupt(sides, sizes, lean, progress)),
            "c": ("concurrency", lambda: bench_concurrency(sides, sizes, lean, pin, progress)),
        }
        for letter in "abc":
            if letter in only:
                key, bench = sections[letter]
                results[key] = {
                    **bench(),
                    "command": command_line(args),
                    "sizes": asdict(sizes),
                    "sides": list(sides),
                    "ran_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
    results["machine"]["loadavg_at_end"] = os.getloadavg()[0]
    text = markdown(results)
    save(results, text)
    plots = plot_all(results)
    print(text)
    console.print(
        f"wrote {RESULTS / 'latest.json'}, {RESULTS / 'latest.md'}"
        + (", " + ", ".join(str(p.relative_to(ROOT)) for p in plots) if plots else "")
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one_concurrent:
        side, n, seconds = args.one_concurrent
        one_concurrent(side, int(n), float(seconds), not args.pipecat_defaults)
    elif args.one_memory:
        side, n = args.one_memory
        one_memory(side, int(n), not args.pipecat_defaults)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
