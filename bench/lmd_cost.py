"""LMD cost vs quality: U-Net calls per image, images/s and AUROC per sampler setting.

The paper's setting (1000 steps x 10 attempts = 10,000 calls per image) is measured on a
small subset only (it is very slow on a CPU); every cheaper setting is scored on the SAME
subset, so the AUROC comparison is paired, and also on a larger subset. The model is the
EMA DDPM of the newest finished ``jobs/lmd.yaml`` run with ``--seed`` (MLflow).

Goal: >= 10x fewer calls with AUROC within 0.01 of the paper's setting.

    python bench/lmd_cost.py --n-small 4 --n-large 50 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import header, write_result  # noqa: E402
from oodlab.data.bundle import eval_loader, load_bundle  # noqa: E402
from oodlab.detect.diffusion.scoring import score_set  # noqa: E402
from oodlab.detect.metrics import ood_metrics  # noqa: E402
from oodlab.detect.scores import LMD  # noqa: E402
from oodlab.spec import load_spec  # noqa: E402
from oodlab.track import tracking  # noqa: E402

PAPER = (1000, 10)
CHEAP = [(100, 10), (50, 4), (25, 4), (10, 4), (10, 2), (5, 2)]


def score_sets(model, score: LMD, sets: dict, n: int, batch: int) -> tuple[dict, float]:
    """Scores of the first ``n`` images of each set, and the images/s of the whole pass."""
    t0, out, count = time.perf_counter(), {}, 0
    for name, ds in sets.items():
        sub = Subset(ds, range(min(n, len(ds))))
        out[name] = score_set(score, model, eval_loader(sub, batch), "cpu",
                              label=f"{score.steps}x{score.attempts} {name}")
        count += len(sub)
    return out, count / (time.perf_counter() - t0)


def aurocs(scores: dict, ood: list[str]) -> dict[str, float]:
    per = {s: ood_metrics(scores["id_test"], scores[s])["auroc"] for s in ood}
    return per | {"mean": sum(per.values()) / len(per)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="jobs/lmd.yaml")
    ap.add_argument("--seed", type=int, default=0, help="which run of the spec to load")
    ap.add_argument("--ood", nargs="+", default=["letters", "photos"])
    ap.add_argument("--n-small", type=int, default=4, help="images per set, paper setting")
    ap.add_argument("--n-large", type=int, default=50, help="images per set, cheap settings")
    ap.add_argument("--large-max-calls", type=int, default=40,
                    help="score the larger subset only with settings of at most this many calls")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--paper", nargs=2, type=int, default=list(PAPER), metavar=("STEPS", "R"),
                    help="the reference setting (a smaller one only for a dry run)")
    ap.add_argument("--set", nargs="*", default=[], help="spec overrides, as for oodlab run")
    ap.add_argument("--out", default="bench/results/lmd_cost.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = header("lmd_cost", "bench/lmd_cost.py", argv)
    name = load_spec(args.spec).name
    spec = load_spec(args.spec, [*args.set, f"seed={args.seed}", f"init_from=spec:{name}"])
    ref = tracking.resolve_init_from(spec)
    model = tracking.load_detector(ref, tracking.tracking_uri(spec)).model.eval()
    timesteps = model.num_timesteps
    bundle = load_bundle(spec)
    sets = {"id_test": bundle.id_test} | {s: bundle.test_ood[s] for s in args.ood}
    result |= {"model": ref, "ood_sets": args.ood, "n_small": args.n_small,
               "n_large": args.n_large, "distance": "mse", "block_size": 4, "eta": 1.0,
               "timesteps": timesteps, "settings": []}

    def run(steps: int, attempts: int, n: int) -> dict:
        score = LMD(steps=steps, attempts=attempts, block_size=4, seed=args.seed)
        scores, ips = score_sets(model, score, sets, n, args.batch)
        row = {"steps": steps, "attempts": attempts, "n_per_set": n,
               "calls_per_image": score.network_calls(timesteps),
               "images_per_s": ips, "auroc": aurocs(scores, args.ood)}
        print(row, flush=True)
        return row

    paper = run(*args.paper, args.n_small)
    result["settings"].append(paper | {"paper": True})
    write_result(args.out, result)  # partial results survive an interrupted run
    best = None
    for steps, attempts in CHEAP:
        small = run(steps, attempts, args.n_small)
        large = (run(steps, attempts, args.n_large)
                 if small["calls_per_image"] <= args.large_max_calls else None)
        fewer = paper["calls_per_image"] / small["calls_per_image"]
        gap = small["auroc"]["mean"] - paper["auroc"]["mean"]
        row = small | {"fewer_calls_than_paper": fewer, "auroc_minus_paper": gap,
                       "speedup_images_per_s": small["images_per_s"] / paper["images_per_s"],
                       "large": large}
        result["settings"].append(row)
        write_result(args.out, result)
        if fewer >= 10 and abs(gap) <= 0.01 and (best is None or fewer > best[0]):
            best = (fewer, steps, attempts)
    result["goal"] = ">= 10x fewer calls with mean AUROC within 0.01 of the paper's setting"
    result["goal_met"] = best is not None
    result["goal_setting"] = None if best is None else {
        "steps": best[1], "attempts": best[2], "fewer_calls": best[0]}
    print(write_result(args.out, result))


if __name__ == "__main__":
    main()
