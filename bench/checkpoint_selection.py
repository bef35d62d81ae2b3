"""Which epoch of a fine-tune to serve: last, best on validation AUROC, or best on validation
AUROC among the epochs that keep ``train.select_constraints``.

One training per seed answers it for every rule, paired by construction: the base spec
(``--base``, trained from scratch) and the fine-tune (``--spec``, started from the base's
selected weights) are trained with the platform's own parts in this process
(``bench/fmnist_gpu.py``'s ``train_run``: the spec's method, optimizer, schedule, data order,
per-epoch validation and selection, no Ray), every fine-tune epoch's weights are kept, and the
epoch each rule picks is evaluated on the test sets with :func:`oodlab.detect.evaluate.evaluate`,
as is the base model the fine-tune started from. Seeds are appended to ``--out`` as they
finish (a stopped run continues with the seeds it lacks); the markdown table (paired
differences with the platform's "shown / not shown" verdict) and the figure are rebuilt from
every seed in the JSON::

    python bench/checkpoint_selection.py --seeds 0 1 2 3 4     # about 30 min a seed, 2 cores
    python bench/checkpoint_selection.py --control jobs/fmnist_supervised_ft.yaml --seeds 0
    python bench/checkpoint_selection.py --report-only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import header, write_result

RULES = ("last", "best_val", "constrained")
RULE_TEXT = {"base": "the model fine-tuned (init)", "last": "last epoch",
             "best_val": "best validation AUROC",
             "constrained": "best validation AUROC under the constraints"}
KEYS = {"id_acc": "test/id_acc", "auroc": "test/{s}/mean/auroc", "near": "test/{s}/near/auroc",
        "far": "test/{s}/far/auroc", "fpr95": "test/{s}/mean/fpr95"}


def pick_epochs(history: list[dict], selected: int) -> dict[str, int]:
    """The epoch (0-based) each rule serves: the last, the best on ``val/auroc`` (first of
    ties, as Ray's scoring keeps the first), and the spec's constrained selection."""
    auroc = [h.get("val/auroc", float("nan")) for h in history]
    return {"last": len(history) - 1, "best_val": int(np.nanargmax(auroc)),
            "constrained": selected}


def test_metrics(metrics: dict[str, float], scores: list[str]) -> dict[str, dict[str, float]]:
    """Per score: ID accuracy and headline / near / far AUROC and FPR@95 of one evaluation."""
    return {s: {k: float(metrics[key.format(s=s)]) for k, key in KEYS.items()} for s in scores}


HISTORY_KEYS = ("val/id_acc", "val/auroc", "select/feasible", "train/loss")


def trimmed(history: list[dict]) -> list[dict]:
    """The per-epoch metrics the report uses, from a ``train_run`` history."""
    return [{k: h[k] for k in HISTORY_KEYS if k in h} for h in history]


def seed_specs(args: argparse.Namespace, seed: int, *paths: str) -> list:
    """The specs at ``paths`` with the bench's ``--set`` overrides and ``seed``."""
    from oodlab.spec import load_spec

    return [load_spec(path, [*args.set, f"seed={seed}"]) for path in paths]


def evaluate_weights(spec, weights: dict, bundle, device: torch.device
                     ) -> dict[str, dict[str, float]]:
    """Test metrics (per score of ``spec``) of the servable model of ``weights``."""
    from oodlab.detect.evaluate import evaluate
    from oodlab.train.epoch import servable_model

    model = servable_model(spec, weights, bundle.num_classes)
    report = evaluate(spec, model, bundle, supervised=True, device=device)
    return test_metrics(report.metrics, list(spec.eval.scores))


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """Train base and fine-tune for ``seed``; evaluate the base and each rule's epoch."""
    from fmnist_gpu import train_run
    from oodlab.data.bundle import load_bundle

    base, ft = seed_specs(args, seed, args.base, args.spec)
    if (base.data.id, base.data.limit) != (ft.data.id, ft.data.limit):
        raise SystemExit("--base and --spec must train on the same ID data")
    device = torch.device("cpu")
    t0 = time.perf_counter()
    bundle = load_bundle(ft)  # a superset of the base's (the fine-tune adds OE sets)
    _, base_weights, base_hist, base_facts = train_run(base, bundle, None, device)
    states: list[dict] = []
    _, _, hist, facts = train_run(ft, bundle, base_weights, device, every_epoch=states)
    train_s = time.perf_counter() - t0
    epochs = pick_epochs(hist, facts["selected_epoch"])
    scores = list(ft.eval.scores)
    test: dict[str, dict] = {}
    for name, weights in [("base", base_weights)] + [
            (f"epoch{e}", states[e]) for e in sorted(set(epochs.values()))]:
        test[name] = evaluate_weights(ft, weights, bundle, device)
        first = test[name][scores[0]]
        print(f"  seed {seed} {name} (epochs are 0-based): ID acc {first['id_acc']:.3f} "
              f"{scores[0]} AUROC {first['auroc']:.3f}", flush=True)
    return {"seed": seed, "epochs": epochs, "test": test,
            "init_val": facts.get("init_metrics") or {},
            "constraints": [c.describe() for c in ft.train.select_constraints],
            "history": trimmed(hist), "base_history": trimmed(base_hist),
            "optimizer_steps": {"base": base_facts["optimizer_steps"],
                                "fine_tune": facts["optimizer_steps"]},
            "wall_s": {"train": train_s, "total": time.perf_counter() - t0}}


def ms(v: list[float]) -> str:
    """mean ± sample std (0 for one value)."""
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}"


def run_control(args: argparse.Namespace, seed: int, record: dict) -> dict:
    """The CE-only control of one recorded seed: retrain its base (same specs, data and code
    as :func:`run_seed`, so the same weights where training is deterministic; the largest
    difference from the recorded base's test metrics is kept as ``base_drift``), fine-tune it
    with ``--control`` and evaluate the epoch the control's own selection serves."""
    from fmnist_gpu import train_run
    from oodlab.data.bundle import load_bundle

    base, ft, ctl = seed_specs(args, seed, args.base, args.spec, args.control)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    bundle = load_bundle(ft)  # the same bundle as run_seed's, so the same base training
    _, base_weights, _, _ = train_run(base, bundle, None, device)
    _, weights, hist, facts = train_run(ctl, bundle, base_weights, device)
    scores = list(ft.eval.scores)
    test = {name: evaluate_weights(ft, w, bundle, device)
            for name, w in (("base", base_weights), ("control", weights))}
    drift = max(abs(test["base"][s][k] - record["test"]["base"][s][k])
                for s in scores for k in KEYS)
    print(f"  seed {seed} control epoch {facts['selected_epoch'] + 1}: ID acc "
          f"{test['control'][scores[0]]['id_acc']:.3f}; base drift {drift:.4f}", flush=True)
    return {"spec": args.control, "epoch": facts["selected_epoch"], "test": test["control"],
            "base_drift": drift, "optimizer_steps": facts["optimizer_steps"],
            "history": trimmed(hist),
            "wall_s": time.perf_counter() - t0}


def control_lines(recs: list[dict], scores: list[str], run: dict | None) -> list[str]:
    """Markdown: the CE-only control's served model and Energy-OE (constrained) − control,
    over the seeds that have a control; ``run`` is the last control run's header."""
    from oodlab.report.results import paired_difference

    ctl = [r for r in recs if "control" in r]
    if not ctl:
        return []
    lines = ["", f"CE-only control (`{ctl[0]['control']['spec']}`: the same fine-tune without "
             "the OE term, served by its own constrained selection) on "
             f"{len(ctl)} seed(s) ({', '.join(str(r['seed']) for r in ctl)}); its base "
             "retrained per seed, whose test metrics differ from the recorded base's by at "
             f"most {max(r['control']['base_drift'] for r in ctl):.4f}. Epochs served: "
             f"{', '.join(str(r['control']['epoch'] + 1) for r in ctl)}."
             + (f" Last control run: `{run['command']}` on {run['date']}." if run else ""), "",
             "| served model | score | ID acc | AUROC | near AUROC | far AUROC | FPR@95 |",
             "|---|---|---|---|---|---|---|"]
    for s in scores:
        cells = [ms([r["control"]["test"][s][k] for r in ctl]) for k in KEYS]
        lines.append(f"| CE-only control | {s} | " + " | ".join(cells) + " |")
    for s in scores:
        cells = [paired_difference([served(r, "constrained")[s][k] - r["control"]["test"][s][k]
                                    for r in ctl], k != "fpr95") for k in KEYS]
        lines.append(f"| constrained − control | {s} | " + " | ".join(cells) + " |")
    return lines


def served(record: dict, rule: str) -> dict[str, dict[str, float]]:
    """The test metrics of the model ``rule`` serves in one seed's record."""
    return record["test"]["base" if rule == "base" else f"epoch{record['epochs'][rule]}"]


def summary_lines(result: dict) -> list[str]:
    """Markdown: per rule the epochs served and mean ± std of the test metrics; paired
    differences (constrained − best_val, constrained − last, each rule − base)."""
    from oodlab.report.results import paired_difference

    seeds = result["seeds"]
    recs = [seeds[k] for k in sorted(seeds, key=int)]
    scores = list(recs[0]["test"]["base"])
    n = len(recs)

    lines = ["| served model | epochs served (1-based, per seed) | score | ID acc | AUROC | "
             "near AUROC | far AUROC | FPR@95 |", "|---|---|---|---|---|---|---|---|"]
    for rule in ("base", *RULES):
        ep = "–" if rule == "base" else ", ".join(str(r["epochs"][rule] + 1) for r in recs)
        for s in scores:
            vals = {k: [served(r, rule)[s][k] for r in recs] for k in KEYS}
            lines.append(f"| {RULE_TEXT[rule]} | {ep} | {s} | {ms(vals['id_acc'])} | "
                         f"{ms(vals['auroc'])} | {ms(vals['near'])} | {ms(vals['far'])} | "
                         f"{ms(vals['fpr95'])} |")
    lines += ["", f"Paired differences over the {n} seed(s) (mean ± std of the per-seed "
              "difference; \"shown\" when the 95 % t-interval excludes 0):", "",
              "| difference | score | Δ ID acc | Δ AUROC | Δ near AUROC | Δ far AUROC | "
              "Δ FPR@95 |", "|---|---|---|---|---|---|---|"]
    pairs = [("constrained", "best_val"), ("constrained", "last"), ("best_val", "base"),
             ("last", "base"), ("constrained", "base")]
    for a, b in pairs:
        for s in scores:
            cells = [paired_difference([served(r, a)[s][k] - served(r, b)[s][k] for r in recs],
                                       k != "fpr95") for k in KEYS]
            lines.append(f"| {a} − {b} | {s} | " + " | ".join(cells) + " |")
    lines += control_lines(recs, scores, result.get("control_run"))
    lines += ["", "Per seed: validation ID accuracy of the init model and the bound it sets, "
              "then validation ID accuracy / validation AUROC per fine-tune epoch (* = breaks "
              "the constraints):", "",
              "| seed | init val acc | " + " | ".join(
                  f"ep {i + 1}" for i in range(len(recs[0]["history"]))) + " |",
              "|---|---|" + "---|" * len(recs[0]["history"])]
    for r in recs:
        init = r["init_val"].get("val/id_acc", float("nan"))
        cells = [f"{h['val/id_acc']:.3f} / {h['val/auroc']:.3f}"
                 + ("*" if h.get("select/feasible", 1) == 0 else "") for h in r["history"]]
        lines.append(f"| {r['seed']} | {init:.3f} | " + " | ".join(cells) + " |")
    return lines


def figure(result: dict, path: str) -> None:
    """Per seed: validation ID accuracy and AUROC over fine-tune epochs, the bound, and the
    epoch each rule serves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [result["seeds"][k] for k in sorted(result["seeds"], key=int)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in recs:
        x = np.arange(1, len(r["history"]) + 1)
        acc = [h["val/id_acc"] for h in r["history"]]
        auroc = [h["val/auroc"] for h in r["history"]]
        (line,) = axes[0].plot(x, acc, marker="o", label=f"seed {r['seed']}")
        axes[1].plot(x, auroc, marker="o", color=line.get_color())
        init = r["init_val"].get("val/id_acc")
        if init is not None:
            axes[0].axhline(init - 0.01, color=line.get_color(), ls=":", lw=1)
        for rule, marker in (("best_val", "s"), ("constrained", "*")):
            e = r["epochs"][rule]
            axes[1].plot(e + 1, auroc[e], marker=marker, ms=14, mfc="none",
                         color=line.get_color())
    axes[0].set(xlabel="fine-tune epoch", ylabel="validation ID accuracy",
                title="ID accuracy (dotted: init − 0.01)")
    axes[1].set(xlabel="fine-tune epoch", ylabel="validation AUROC",
                title="val AUROC (square: best, star: constrained)")
    for ax in axes:
        ax.set_xticks(range(1, len(recs[0]["history"]) + 1))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    recs = result["seeds"]
    first = next(iter(recs.values()))
    steps = first["optimizer_steps"]
    return "\n".join([
        f"# Which fine-tune epoch to serve ({Path(result['spec']).stem})", "",
        f"Generated by `{result['command']}` on {result['date']}, {result['host']}; "
        f"{len(recs)} seed(s): {', '.join(sorted(recs, key=int))}. Each seed trains "
        f"`{result['base']}` ({steps['base']} optimizer steps) and fine-tunes it with "
        f"`{result['spec']}` ({steps['fine_tune']} further steps) once, without Ray; every "
        "rule's epoch and the init model are evaluated on the test sets. Constraints: "
        f"{'; '.join(first['constraints']) or 'none'}. Figure: "
        f"[{Path(result['figure']).name}]({Path(result['figure']).name}).", "",
        *summary_lines(result)]) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--spec", default="jobs/fmnist_energy_oe.yaml", help="the fine-tune")
    p.add_argument("--base", default="jobs/fmnist_supervised.yaml", help="what it fine-tunes")
    p.add_argument("--control", help="also fine-tune this CE-only control from each seed's "
                   "retrained base (e.g. jobs/fmnist_supervised_ft.yaml; ~30 min a seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--set", nargs="*", default=["eval.scores=[energy,msp]"],
                   metavar="KEY=VALUE", help="overrides for both specs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/checkpoint_selection.json")
    p.add_argument("--figure", default="docs/results/checkpoint_selection.png")
    p.add_argument("--md", default="docs/results/checkpoint_selection.md")
    p.add_argument("--report-only", action="store_true", help="rebuild table and figure")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if not args.report_only:
        if args.control and result.get("set", args.set) != args.set:
            raise SystemExit(f"--control: the recorded seeds were trained with --set "
                             f"{' '.join(result['set'])}; pass the same")
        head = header("checkpoint_selection", "bench/checkpoint_selection.py", argv)
        if not all(str(seed) in result.get("seeds", {}) for seed in args.seeds):
            result |= head | {"spec": args.spec, "base": args.base, "set": args.set,
                              "figure": args.figure}
        if args.control:  # the main table keeps the header of the run that trained it
            result["control_run"] = {k: head[k] for k in ("date", "host", "command")}
        result.setdefault("seeds", {})
        for seed in args.seeds:
            if str(seed) not in result["seeds"]:
                print(f"seed {seed}: training", flush=True)
                result["seeds"][str(seed)] = run_seed(args, seed)
                write_result(out, result)  # each finished seed is kept
            else:
                print(f"seed {seed}: in {out} already")
            record = result["seeds"][str(seed)]
            if args.control and "control" not in record:
                print(f"seed {seed}: control", flush=True)
                record["control"] = run_control(args, seed, record)
                write_result(out, result)
    if not result.get("seeds"):
        raise SystemExit(f"{out}: no seed finished yet")
    figure(result, args.figure)
    from oodlab.report.results import write_keeping_notes

    write_keeping_notes(Path(args.md), markdown(result), marker=True)
    print(f"wrote {out}, {args.figure} and {args.md}")


if __name__ == "__main__":
    main()
