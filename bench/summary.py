"""One table of every benchmark's headline ratios, from bench/results/*.json.

    python bench/summary.py            # writes docs/results/benchmarks.md

Each row quotes a ratio measured within one run of one benchmark (never an absolute time),
its goal, and whether the goal was met, with the date and command of that run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

Row = tuple[str, str, str, str]  # figure, value, goal, met


def _met(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "no")


def train_overhead(d: dict) -> Iterator[Row]:
    for r in d["runs"]:
        yield (f"Ray Train ÷ plain PyTorch steady-state images/s, {r['threads']} thread(s)",
               f"{r['steady_ratio']:.2f}", f"≥ {d['target_steady_ratio']}",
               _met(r["steady_ratio"] >= d["target_steady_ratio"]))


SERVE_FIGURES = {"batched_vs_floor": ("batched ÷ HTTP floor (echo), requests/s", "echo"),
                 "batched_vs_raw": ("batched ÷ raw forward, images/s", "raw"),
                 "batched_vs_unbatched": ("batched ÷ unbatched, images/s", "unbatched")}


def _latency(r: dict, other: str | None) -> str:
    """p50/p99 of the batched service, and of what it is compared with."""
    b = r["batched"]
    text = f"batched p50 {b['p50_ms']:.0f} / p99 {b['p99_ms']:.0f} ms"
    if other == "raw":  # older runs divided by the raw forward of the run's start
        if "raw_images_per_s" in r:
            text += f"; raw forward measured just before it: {r['raw_images_per_s']:.0f} images/s"
    elif other:
        o = r[other]
        text += f"; {other} p50 {o['p50_ms']:.0f} / p99 {o['p99_ms']:.0f} ms"
    return text


def _serve_setup(d: dict) -> str:
    """What sets a serving run apart from the default one: the model, a GPU replica, a
    replica pinned to its own core, a batch stage chosen by hand, ``.npy`` request bodies."""
    model = d.get("model", {})
    arch, width = model.get("arch", "small_cnn"), model.get("width", 16)
    replica = d.get("replica", {})
    return ((f", {arch}:{width}" if (arch, width) != ("small_cnn", 16) else "")
            + (", GPU replica" if replica.get("device") == "cuda" else "")
            + (", replica on a core of its own" if replica.get("pinned_core") is not None
               else "")
            + (f", batch stage {stage}" if (stage := replica.get("batch_stage", "auto"))
               != "auto" else "")
            + (", npy bodies" if d.get("body") == "npy" else ""))


def serve_load(d: dict) -> Iterator[Row]:
    goals = {(name, k): goal for name, k, goal in d["goals"]}
    first = d["scenarios"][0].get("ingress") if d["scenarios"] else None
    setup = _serve_setup(d)
    for r in d["scenarios"]:
        k, ingress = r["images_per_request"], r.get("ingress", "proxy")
        for name, (label, other) in SERVE_FIGURES.items():
            goal = goals.get((name, k))
            yield (f"serving ({ingress}{setup}): {label}, {k} image(s)/request "
                   f"({_latency(r, other)})",
                   f"{r[name]:.2f}", "–" if goal is None else f"≥ {goal}",
                   "–" if goal is None else _met(r[name] >= goal))
        alone = r.get("replica_alone") if r.get("ingress") == first else None
        if alone:  # diagnostic, once per shape: the replica without Serve's proxy
            yield (f"serving{setup}, replica alone (in process, no proxy): batched ÷ "
                   f"unbatched, images/s, {k} image(s)/request (mean batch "
                   f"{alone['batched']['mean_batch']:.1f})",
                   f"{alone['batched_vs_unbatched']:.2f}", "–", "–")


def search_efficiency(d: dict) -> Iterator[Row]:
    n = len(d["pairs"])
    yield (f"search: TPE+ASHA epochs to reach random+FIFO's best ÷ random's epochs, median of "
           f"{n} seed pair(s) (reached in {d['reached_in']})",
           f"{d['median_epochs_ratio_to_random_best']:.2f}", "≤ 0.5", _met(d["goal_met"]))
    for p in d["pairs"]:
        r = p["results"]
        yield (f"search: best val AUROC, TPE+ASHA vs random+FIFO, seed {p['seed']}",
               f"{r['tpe_asha']['best_val_auroc']:.4f} vs "
               f"{r['random_fifo']['best_val_auroc']:.4f}", "–", "–")


def lmd_cost(d: dict) -> Iterator[Row]:
    paper = next(s for s in d["settings"] if s.get("paper"))
    for s in d["settings"]:
        if s.get("paper"):
            continue
        yield (f"LMD: {s['steps']} steps x {s['attempts']} attempts, fewer U-Net calls than "
               f"the paper's {paper['steps']} x {paper['attempts']} (mean AUROC minus the "
               f"paper setting's, {s['n_per_set']} images per set)",
               f"{s['fewer_calls_than_paper']:.0f}x ({s['auroc_minus_paper']:+.3f})",
               "≥ 10x, within 0.01", _met(s["fewer_calls_than_paper"] >= 10
                                          and abs(s["auroc_minus_paper"]) <= 0.01))


def generic(d: dict) -> Iterator[Row]:
    """A benchmark that lists its own headline rows under ``summary`` (a list of rows; a
    benchmark whose ``summary`` is its own table has no headline ratio here)."""
    rows = d.get("summary")
    for r in rows if isinstance(rows, list) else []:
        yield (r["figure"], str(r["value"]), str(r.get("goal", "–")), _met(r.get("met")))


EXTRACTORS: dict[str, Callable[[dict], Iterator[Row]]] = {
    "train_overhead": train_overhead, "serve_load": serve_load,
    "search_efficiency": search_efficiency, "lmd_cost": lmd_cost,
}


def render(results_dir: Path) -> str:
    lines = ["# Benchmarks", "",
             "Headline ratios of every benchmark in `bench/` (`make bench`), each measured "
             "within one run; the machines are shared and noisy, so no absolute times.", "",
             "| benchmark | figure | value | goal | met | run |", "|---|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("*.json")):
        d = json.loads(path.read_text())
        name = d.get("benchmark", path.stem)
        run = f"{d.get('date', '?')}, `{d.get('command', '?')}`, {d.get('host', '?')}"
        for figure, value, goal, met in EXTRACTORS.get(name, generic)(d):
            lines.append(f"| {name} | {figure} | {value} | {goal} | {met} | {run} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--out", default="docs/results/benchmarks.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(Path(args.results)))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
