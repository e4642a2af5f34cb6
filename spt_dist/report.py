"""Gathers run directories into results tables and plots: `python -m spt_dist.report DIR [DIR ...] --out DIR`.

Each DIR is a run directory (it has config.yaml) or a directory of them (a sweep). Written to --out:
- runs.csv / runs.md: one row per run (accuracy, trainable %, images/s, MFU, data-wait share, peak memory,
  score-pass and allocation time, status);
- summary.csv / summary.md: runs that differ only in their seed, averaged (mean ± std over seeds);
- results.md: the papers' table for runs whose data.task is a VTAB-1k or FGVC task (one row per backbone ×
  method × budget, one column per task, VTAB group means and the mean of the group means, the FGVC mean);
- accuracy_vs_budget.png (top-1 against trainable %, one line per backbone and method) and
  scaling.png (images/s per device and peak memory against backbone size, one line per method).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
from collections import defaultdict

import yaml

from spt_dist.atomic import atomic_path, make_dirs, write_text
from spt_dist import runfiles
from spt_dist.cli import command
from spt_dist.data.benchmarks import SUITES, VTAB_GROUPS, find_task
from spt_dist.data.shards import read_json
from spt_dist.errors import UserError
from spt_dist.methods import get_method

# (column, format) of the per-run table; None values print as empty cells.
COLUMNS = (
    ("run", "{}"), ("task", "{}"), ("backbone", "{}"), ("method", "{}"), ("budget", "{}"), ("world_size", "{}"),
    ("engine", "{}"), ("seed", "{}"), ("top1", "{:.2f}"), ("trainable_params", "{:,}"), ("trainable_pct", "{:.4f}"),
    ("backbone_params", "{:,}"), ("images_per_s", "{:.1f}"), ("images_per_s_per_device", "{:.1f}"),
    ("tflops_per_device", "{:.3g}"), ("mfu", "{:.1%}"), ("data_wait_share", "{:.1%}"), ("peak_memory_gib", "{:.2f}"),
    ("score_pass_s", "{:.1f}"), ("allocation_s", "{:.2f}"), ("train_time_s", "{:.0f}"), ("status", "{}"),
)
# The summary's columns naming a configuration; runs are one configuration when every setting but the seed
# agrees (and the world size: a scaling axis).
CONFIG_KEYS = ("task", "backbone", "method", "budget", "world_size", "engine")


def find_runs(paths: list[str]) -> list[str]:
    """Run directories (those with config.yaml) at or below each path, in sorted order."""
    found: list[str] = []
    for path in paths:
        if not os.path.isdir(path):
            raise UserError(f"report: no such directory '{path}'")
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in runfiles.NOT_RUNS)
            if runfiles.CONFIG in files:
                found.append(os.path.abspath(root))
                dirs[:] = []  # a run directory holds no other runs
    if not found:
        raise UserError(f"report: no run directories (with config.yaml) under {', '.join(paths)}")
    return sorted(dict.fromkeys(found))


def pending_runs(paths: list[str]) -> list[dict]:
    """Rows for the runs a sweep lists (sweep.json) that have not started yet: an incomplete sweep shows."""
    rows = []
    for path in paths:
        manifest = read_json(os.path.join(path, "sweep.json"))
        for run in (manifest or {}).get("runs", []):
            if not os.path.isfile(os.path.join(path, run["name"], runfiles.CONFIG)):
                rows.append({"run": run["name"], "world_size": run["world_size"], "status": "pending"})
    return rows


def _settings_id(cfg: dict) -> str:
    """What makes runs one configuration: every setting except the seed and where the outputs go."""
    rest = {k: v for k, v in cfg.items() if k not in ("seed", "output")}
    return json.dumps(rest, sort_keys=True, default=str)


def _budget(cfg: dict) -> str | None:
    try:
        return get_method(cfg["method"]["name"]).budget_label(cfg)
    except UserError:  # a method this version does not know (a run of another version): no budget column
        return None


def read_run(run_dir: str) -> dict:
    """One row: the run's config, metrics.json and selection timings."""
    path = os.path.join(run_dir, runfiles.CONFIG)
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
        cfg["model"]["name"], cfg["method"]["name"]  # noqa: B018 - a config.yaml we can read
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        raise UserError(f"report: {path} is not a run's config (unreadable or incomplete)") from None
    metrics = read_json(os.path.join(run_dir, runfiles.METRICS))
    selection = read_json(os.path.join(run_dir, runfiles.selection_timings("select"))) or {}
    engine = cfg["engine"]["kind"] + (f"-zero{cfg['engine']['zero_stage']}" if cfg["engine"]["kind"] == "deepspeed" else "")
    row = {"run": os.path.basename(run_dir), "path": run_dir, "task": cfg["data"].get("task"),
           "backbone": cfg["model"]["name"], "method": cfg["method"]["name"], "budget": _budget(cfg),
           "engine": engine, "seed": cfg["seed"], "settings": _settings_id(cfg),
           "score_pass_s": selection.get("score_pass_s"),
           "allocation_s": selection.get("allocation_s")}
    if metrics is None:
        has_checkpoint = os.path.isdir(os.path.join(run_dir, runfiles.CHECKPOINTS))
        return dict(row, status="stopped" if has_checkpoint else "unfinished")
    total, trainable = metrics["total_params"], metrics["trainable_params"]
    row.update({k: metrics.get(k) for k in ("top1", "world_size", "images_per_s", "images_per_s_per_device",
                                            "tflops_per_device", "mfu", "data_wait_share", "peak_memory_gib",
                                            "train_time_s")})
    row.update(trainable_params=trainable, trainable_pct=100 * trainable / total, backbone_params=metrics.get("backbone_params"),
               status="finished")
    return row


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return fmt.format(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _csv_text(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def runs_tables(rows: list[dict]) -> tuple[str, str]:
    """(CSV, Markdown) of every run; the CSV keeps full precision."""
    header = [c for c, _ in COLUMNS]
    csv_rows = [[("" if r.get(c) is None else r.get(c)) for c in header] for r in rows]
    md_rows = [[_cell(r.get(c), fmt) for c, fmt in COLUMNS] for r in rows]
    return _csv_text(header, csv_rows), markdown_table(header, md_rows)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> list[dict]:
    """Finished runs grouped by CONFIG_KEYS: top-1 mean and std over seeds; the rest averaged."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] == "finished":
            groups[(r["settings"], r.get("world_size"))].append(r)
    out = []
    for members in groups.values():
        top1, top1_std = _mean_std([m["top1"] for m in members])
        entry = {k: members[0].get(k) for k in CONFIG_KEYS}
        entry.update(seeds=len({m["seed"] for m in members}), runs=len(members), top1=top1, top1_std=top1_std)
        for column in ("trainable_pct", "backbone_params", "images_per_s_per_device", "mfu", "peak_memory_gib",
                       "score_pass_s", "allocation_s"):
            entry[column] = _mean_std([m.get(column) for m in members])[0]
        out.append(entry)
    return sorted(out, key=lambda e: tuple(str(e[k]) for k in CONFIG_KEYS))


def summary_tables(summary: list[dict]) -> tuple[str, str]:
    header = [*CONFIG_KEYS, "seeds", "runs", "top1", "top1_std", "trainable_pct", "images_per_s_per_device", "mfu",
              "peak_memory_gib", "score_pass_s", "allocation_s"]
    fmts = {"top1": "{:.2f}", "top1_std": "{:.2f}", "trainable_pct": "{:.4f}", "images_per_s_per_device": "{:.1f}",
            "mfu": "{:.1%}", "peak_memory_gib": "{:.2f}", "score_pass_s": "{:.1f}", "allocation_s": "{:.2f}"}
    csv_rows = [[("" if e.get(c) is None else e.get(c)) for c in header] for e in summary]
    md_rows = [[_cell(e.get(c), fmts.get(c, "{}")) for c in header] for e in summary]
    return _csv_text(header, csv_rows), markdown_table(header, md_rows)


def _mean_or_partial(values: list[float | None]) -> str:
    """The mean of a group; marked * when some of its tasks have no result yet."""
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    return f"{statistics.fmean(present):.1f}" + ("" if len(present) == len(values) else "*")


def papers_table(summary: list[dict]) -> str:
    """The papers' results tables (Markdown): per suite, one row per backbone × method × budget, one column per
    task (top-1 averaged over seeds and world sizes), then the group means and the overall mean. VTAB-1k's
    overall mean is the mean of its three group means (as SPT reports it)."""
    cells: dict[str, dict[tuple, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for e in summary:
        found = find_task(e["task"]) if e["task"] else None
        if found and e["top1"] is not None:
            suite, task = found
            cells[suite][(e["backbone"], e["method"], e["budget"] or "")][task.name].append(e["top1"])
    parts = []
    for suite, rows in cells.items():
        tasks = SUITES[suite]
        groups = [g for g in VTAB_GROUPS if any(t.group == g for t in tasks)] if suite == "vtab" else []
        header = ["backbone", "method", "budget"] + [t.column for t in tasks]
        header += [f"{g.capitalize()} mean" for g in groups] + ["Mean"]
        table_rows = []
        for (backbone, method, budget), by_task in sorted(rows.items()):
            value = {t.name: (statistics.fmean(by_task[t.name]) if by_task.get(t.name) else None) for t in tasks}
            row = [backbone, method, budget] + [("–" if value[t.name] is None else f"{value[t.name]:.1f}") for t in tasks]
            if groups:
                group_means = []
                for g in groups:
                    members = [value[t.name] for t in tasks if t.group == g]
                    row.append(_mean_or_partial(members))
                    present = [v for v in members if v is not None]
                    group_means.append(statistics.fmean(present) if present else None)
                overall = _mean_or_partial(group_means)
                complete = all(v is not None for v in value.values())
                row.append(overall.rstrip("*") + ("" if complete or overall == "–" else "*"))
            else:
                row.append(_mean_or_partial(list(value.values())))
            table_rows.append(row)
        title = {"vtab": "VTAB-1k (top-1 %, train800val200 → test)", "fgvc": "FGVC (top-1 %)"}[suite]
        parts.append(f"## {title}\n\n" + markdown_table(header, table_rows))
    if not parts:
        return "No run has a VTAB-1k or FGVC task (data.task, e.g. vtab/cifar100).\n"
    return "\n".join(parts) + "\n\\* some tasks of that group (or of the suite) have no result yet: mean of those present.\n"


# ------------------------------------------------------------------------------------------------- plots


def _save_figure(figure, path: str) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _log_x(axis, values: list[float]) -> None:
    """A log x axis with ticks at the values plotted (those at least 30 % apart), labelled with plain numbers
    (0.5, 1, 2), not powers of ten; no minor labels (they overlap), labels slanted."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: PLC0415

    ticks: list[float] = []
    for x in sorted(v for v in set(values) if v > 0):
        if not ticks or x / ticks[-1] >= 1.3:  # points closer than that share the tick on their left
            ticks.append(x)
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(FixedLocator(ticks))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.tick_params(axis="x", labelrotation=30)


def plot_accuracy_vs_budget(summary: list[dict], path: str) -> None:
    """Top-1 against trainable % (log scale), one line per backbone × method × world size (kept apart, as in
    summary.md), one point per budget: top-1 and trainable % averaged over tasks (each task's head differs, so
    its trainable % does too)."""
    import matplotlib  # noqa: PLC0415 - plotting only when asked
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    points: dict[tuple[str, str, int], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for e in summary:
        if e["top1"] is not None and e["trainable_pct"]:
            points[(e["backbone"], e["method"], e.get("world_size") or 1)][str(e["budget"])].append(e)
    several_sizes = len({world for _, _, world in points}) > 1
    figure, axis = plt.subplots(figsize=(7, 4.5))
    xs = []
    for (backbone, method, world), by_budget in sorted(points.items()):
        xy = sorted((statistics.fmean(m["trainable_pct"] for m in ms), statistics.fmean(m["top1"] for m in ms))
                    for ms in by_budget.values())
        xs += [x for x, _ in xy]
        axis.plot([x for x, _ in xy], [y for _, y in xy], marker="o",
                  label=f"{backbone} / {method}" + (f" ({world} ranks)" if several_sizes else ""))
    _log_x(axis, xs)
    axis.set_xlabel("trainable parameters (% of the model)")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title("Accuracy vs budget")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    _save_figure(figure, path)
    plt.close(figure)


def plot_scaling(summary: list[dict], path: str) -> None:
    """Images/s per device and peak memory against backbone parameters, one line per method × world size."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    lines: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for e in summary:
        if e["backbone_params"] and e["images_per_s_per_device"] is not None and e["peak_memory_gib"] is not None:
            lines[f"{e['method']} ({e['world_size']} ranks)"][e["backbone_params"] / 1e6].append(e)
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, by_size in sorted(lines.items()):
        sizes = sorted(by_size)
        speed.plot(sizes, [statistics.fmean(m["images_per_s_per_device"] for m in by_size[s]) for s in sizes],
                   marker="o", label=label)
        memory.plot(sizes, [statistics.fmean(m["peak_memory_gib"] for m in by_size[s]) for s in sizes],
                    marker="o", label=label)
    sizes = [size for by_size in lines.values() for size in by_size]
    for axis, what in ((speed, "images/s per device"), (memory, "peak memory per rank (GiB)")):
        _log_x(axis, sizes)
        axis.set_xlabel("backbone parameters (millions)")
        axis.set_ylabel(what)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("Throughput and memory vs backbone size")
    _save_figure(figure, path)
    plt.close(figure)


def write_report(paths: list[str], out: str) -> dict[str, str]:
    """Writes every table and plot into `out`; returns {what: path}."""
    rows = [read_run(d) for d in find_runs(paths)] + pending_runs(paths)
    summary = summarize(rows)
    make_dirs(out, "--out")  # onto a file: one line, not FileExistsError
    files = {}
    for stem, (csv_text, md_text) in (("runs", runs_tables(rows)), ("summary", summary_tables(summary))):
        for ext, text in (("csv", csv_text), ("md", md_text)):
            files[f"{stem}.{ext}"] = os.path.join(out, f"{stem}.{ext}")
            write_text(files[f"{stem}.{ext}"], text)
    files["results.md"] = os.path.join(out, "results.md")
    write_text(files["results.md"], papers_table(summary))
    files["accuracy_vs_budget.png"] = os.path.join(out, "accuracy_vs_budget.png")
    plot_accuracy_vs_budget(summary, files["accuracy_vs_budget.png"])
    files["scaling.png"] = os.path.join(out, "scaling.png")
    plot_scaling(summary, files["scaling.png"])
    return files


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spt-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories, or directories holding them (a sweep)")
    parser.add_argument("--out", help="output directory (default: <first path>/report)")
    parser.add_argument("--columns", help="print only these columns of the runs table, comma-separated (e.g. "
                        "method,trainable_params,top1,images_per_s); the files keep them all")
    args = parser.parse_args(argv)
    columns = _columns(args.columns)
    files = write_report(args.paths, args.out or os.path.join(args.paths[0], "report"))
    if columns:
        rows = [read_run(run) for run in find_runs(args.paths)]
        fmts = dict(COLUMNS)
        print(markdown_table(columns, [[_cell(r.get(c), fmts[c]) for c in columns] for r in rows]))
    else:
        with open(files["runs.md"]) as f:
            print(f.read(), end="")
    print(f"report: {', '.join(files.values())}")
    return 0


def _columns(text: str | None) -> list[str]:
    if not text:
        return []
    columns, known = [c.strip() for c in text.split(",") if c.strip()], [c for c, _ in COLUMNS]
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise UserError(f"--columns: unknown column '{unknown[0]}' (known: {', '.join(known)})")
    return columns


if __name__ == "__main__":
    sys.exit(main())
