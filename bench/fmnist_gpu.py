"""The Fashion-MNIST baselines at full size on an accelerator, recorded into MLflow here.

``make results-fmnist`` trains every spec x seed with Ray Train and logs to MLflow. The
accelerator machine this is written for has PyTorch but neither Ray, MLflow nor pydantic, and
no package index, so the ``run`` step trains with the platform's own parts in plain
processes, one per seed: the spec (:func:`~oodlab.spec.load_spec`), the method's
``build`` / ``wrap`` / ``training_step`` through the loop's epoch
(:func:`oodlab.train.epoch.train_epoch`), its optimizer and schedule, the data order of its
samplers, the per-epoch :func:`~oodlab.detect.evaluate.validation_metrics`, the checkpoint
selection of ``train.select_metric`` (the best validation epoch, as Ray keeps it) and the
final :func:`~oodlab.detect.evaluate.evaluate`. ``init_from: spec:<name>`` fine-tunes the
selected weights of that spec's run of the same seed. The steps, with the data split in two
so that each part travels with the repository in one call of at most 64 MiB (37 and 43 MiB;
pydantic, which oodlab's specs need, packed by ``bench/offline_site.py``, 2 MiB)::

    python bench/fmnist_gpu.py export --seeds 0 1 --out .devdata/fmnist_s01.npz     # here
    python bench/fmnist_gpu.py export --seeds 2 3 4 --out .devdata/fmnist_s234.npz
    python bench/offline_site.py --out .devsite/pydantic.tar.xz pydantic pydantic-core \
        annotated-types typing-inspection
    python bench/fmnist_gpu.py run --data .devdata/fmnist_s01.npz --out OUT1   # accelerator,
    python bench/fmnist_gpu.py run --data .devdata/fmnist_s234.npz --out OUT2 \
        --throughput-steps 0                                                  # one call each
    python bench/fmnist_gpu.py record OUT1 OUT2 --workdir DIR --out docs/results/fmnist_gpu.md

There, unpack the pydantic archive (``tar -xJf .devsite/pydantic.tar.xz -C /tmp/site``) and
run with ``PYTHONPATH=/tmp/site:platform``; without it every seed's process exits 1.
``--base`` makes an export that holds only the images an earlier one lacks, for a ``run``
that is given both.

``export`` writes every split of every seed's data bundle (the ID train/val split is seeded)
as indices into one pool of unique images, with each split's content hash; ``run`` rebuilds
the bundles, checks those hashes, trains and evaluates, and appends one JSON line per run to
``OUT/runs-<seed>.jsonl`` (final metrics, per-epoch metrics, optimizer steps, wall time); it
also times training steps on the accelerator against the machine's CPU. ``record`` logs each
run as a finished MLflow run tagged for ``oodlab results`` and writes the usual table (mean ±
std, paired differences, per-set AUROC, per-epoch curves) with the accelerator's name in its
header.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import lzma
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPECS = ["jobs/fmnist_supervised.yaml", "jobs/fmnist_oe.yaml", "jobs/fmnist_energy_oe.yaml",
         "jobs/fmnist_supervised_ft.yaml", "jobs/fmnist_resnet18.yaml"]
UNION_SPEC = "jobs/fmnist_oe.yaml"  # its bundle holds every set the specs read (OE too)
ROLES = ("id_train", "id_val", "id_test")


# ------------------------------------------------------------------------ export (here) ------
def export(args: argparse.Namespace) -> None:
    """Every seed's bundle of ``UNION_SPEC`` as index arrays into one pool of unique images."""
    from oodlab.data.bundle import load_bundle
    from oodlab.detect.provenance import bundle_split_tags
    from oodlab.spec import load_spec

    base = read_pool(np.load(args.base)) if args.base else np.empty((0, 28, 28, 1), np.uint8)
    pool: dict[bytes, int] = {img.tobytes(): i for i, img in enumerate(base)}
    rows: list[np.ndarray] = []
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"seeds": args.seeds, "spec": UNION_SPEC, "sets": {},
                            "base": Path(args.base).name if args.base else None,
                            "base_images": len(base)}

    def put(key: str, ds) -> None:
        idx = np.empty(len(ds.images), dtype=np.int64)
        for i, img in enumerate(ds.images):
            b = img.tobytes()
            if b not in pool:
                pool[b] = len(base) + len(rows)
                rows.append(img)
            idx[i] = pool[b]
        arrays[f"{key}/idx"], arrays[f"{key}/labels"] = idx, ds.labels
        meta["sets"][key] = {"name": ds.name, "classes": list(ds.classes)}

    for seed in args.seeds:
        b = load_bundle(load_spec(UNION_SPEC, [*args.set, f"seed={seed}"]))
        for role in ROLES:
            put(f"{seed}/{role}", getattr(b, role))
        for kind in ("val_ood", "test_ood", "oe_sets"):
            for name, ds in getattr(b, kind).items():
                put(f"{seed}/{kind}/{name}", ds)
        meta[f"{seed}/groups"] = b.test_groups
        meta[f"{seed}/num_classes"] = b.num_classes
        meta[f"{seed}/split_tags"] = bundle_split_tags(b)
        print(f"seed {seed}: {len(rows)} new unique images so far", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pool = np.stack(rows)  # xz: about 15 % smaller than savez's zlib, which counts on a carry
    np.savez_compressed(args.out, pool_xz=np.frombuffer(lzma.compress(pool.tobytes()), np.uint8),
                        pool_shape=pool.shape, meta=json.dumps(meta), **arrays)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB)")


def read_pool(f) -> np.ndarray:
    """The images an export adds to the pool (stored xz-compressed)."""
    return np.frombuffer(lzma.decompress(f["pool_xz"].tobytes()), np.uint8).reshape(
        f["pool_shape"])


def load_bundles(paths: list[str], seeds: list[int] | None = None
                 ) -> tuple[dict[int, Any], dict[str, Any]]:
    """seed -> :class:`~oodlab.data.bundle.DataBundle` rebuilt from exports (each one's pool
    extends the one before; ``seeds``: default every exported seed); the merged meta."""
    from torch.utils.data import ConcatDataset

    from oodlab.data.bundle import DataBundle
    from oodlab.data.types import ImageDataset

    files = [np.load(p) for p in paths]
    metas = [json.loads(str(f["meta"])) for f in files]
    pool = np.concatenate([read_pool(f) for f in files])
    meta: dict[str, Any] = {"seeds": [], "sets": {}}
    z: dict[str, np.ndarray] = {}
    for f, m in zip(files, metas, strict=True):
        meta = meta | m | {"seeds": meta["seeds"] + m["seeds"], "sets": meta["sets"] | m["sets"]}
        z |= {k: f[k] for k in f.files if k.endswith(("/idx", "/labels"))}

    def ds(key: str) -> ImageDataset:
        m = meta["sets"][key]
        return ImageDataset(m["name"], pool[z[f"{key}/idx"]], z[f"{key}/labels"], m["classes"])

    bundles = {}
    for seed in seeds or meta["seeds"]:
        named = {k: [key for key in meta["sets"] if key.startswith(f"{seed}/{k}/")]
                 for k in ("val_ood", "test_ood", "oe_sets")}
        by_name = {k: {key.rsplit("/", 1)[1]: ds(key) for key in keys}
                   for k, keys in named.items()}
        b = DataBundle(*(ds(f"{seed}/{r}") for r in ROLES),
                       num_classes=meta[f"{seed}/num_classes"], val_ood=by_name["val_ood"],
                       test_ood=by_name["test_ood"],
                       oe_sets=by_name["oe_sets"], test_groups=meta[f"{seed}/groups"])
        b.oe = ConcatDataset(list(b.oe_sets.values())) if b.oe_sets else None
        bundles[seed] = b
    return bundles, meta


# ------------------------------------------------------------------ run (accelerator) -------
def gpu_batches(x: torch.Tensor, y: torch.Tensor, sampler, batch_size: int):
    """The batches the platform's loader would give (same sampler, same drop_last), indexed
    from tensors already on the device instead of collated item by item."""
    from torch.utils.data import BatchSampler

    for idx in BatchSampler(sampler, batch_size, drop_last=True):
        i = torch.as_tensor(idx, device=x.device)
        yield x[i], y[i]


def on_device(ds, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset (an ImageDataset or a ConcatDataset of them) as float [0, 1] device tensors."""
    parts = getattr(ds, "datasets", [ds])
    x = torch.cat([p.tensors()[0] for p in parts]).to(device)
    y = torch.cat([p.tensors()[1] for p in parts]).to(device)
    return x, y


def train_run(spec, bundle, init_state: dict | None, device: torch.device,
              every_epoch: list[dict] | None = None
              ) -> tuple[torch.nn.Module, dict, list[dict], dict]:
    """Train ``spec`` as the Ray Train loop does with one worker; returns the selected model
    (eval), its state dict (CPU), the per-epoch metrics and the facts of the run.
    ``every_epoch``: when given, each epoch's state dict (CPU) is appended to it."""
    from oodlab.data.bundle import set_epoch
    from oodlab.detect.evaluate import validation_metrics
    from oodlab.train.epoch import endless, prepare, selection_metrics, train_epoch

    run = prepare(spec, bundle, device=device, init_state=init_state)
    method, model, state, opt, sched = run.method, run.model, run.state, run.opt, run.sched
    bs, steps_per_epoch = spec.data.batch_size, len(run.id_loader)
    x, y = on_device(bundle.id_train, device)
    oe = None
    if run.oe_loader is not None:
        ox, oy = on_device(bundle.oe, device)
        oe = endless(_Batches(ox, oy, run.oe_sampler, spec.data.oe_batch_size), run.oe_sampler,
                     spec.seed)
    select = spec.train.score_attribute  # as the Ray loop: select_metric under constraints
    init = (validation_metrics(model, bundle, spec, method, device)
            if spec.train.needs_init_metrics else None)
    history, best, best_state, selected = [], None, None, 0
    t0, train_s = time.perf_counter(), 0.0
    for epoch in range(spec.train.epochs):
        state.epoch = epoch
        set_epoch(run.id_sampler, spec.seed, epoch)
        t = time.perf_counter()
        loss, ips = train_epoch(model, method, gpu_batches(x, y, run.id_sampler, bs), oe, opt,
                                sched, state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s += time.perf_counter() - t
        method.on_epoch_end(model, run.loaders, state)
        m = {"epoch": epoch, "train/loss": loss, "train/lr": sched.get_last_lr()[0],
             "train/images_per_s": ips, "train/optimizer_steps": state.step}
        m |= method.epoch_metrics(model, state)
        m |= validation_metrics(model, bundle, spec, method, device)
        m |= selection_metrics(spec.train, m, init)
        history.append(m)
        if every_epoch is not None:
            every_epoch.append({k: v.detach().to("cpu", copy=True)
                                for k, v in model.state_dict().items()})
        value = m.get(select) if select else None
        if spec.train.replaces(value, best):
            best, best_state = value, {k: v.detach().to("cpu", copy=True)  # one copy
                                       for k, v in model.state_dict().items()}
            selected = epoch
    model.load_state_dict(best_state)
    exported = method.export(model).eval()
    facts = {"optimizer_steps": state.step, "steps_per_epoch": steps_per_epoch,
             "train_wall_s": train_s, "run_wall_s": time.perf_counter() - t0,
             "selected_epoch": selected, "select_metric": select, "init_metrics": init,
             "images_per_s": state.step * bs / max(train_s, 1e-9)}
    return exported, {k: v.detach().cpu() for k, v in exported.state_dict().items()}, history, facts


class _Batches:
    """A re-iterable :func:`gpu_batches` (the endless OE stream iterates it once per pass)."""

    def __init__(self, x, y, sampler, batch_size: int) -> None:
        self.x, self.y, self.sampler, self.bs = x, y, sampler, batch_size

    def __iter__(self):
        return gpu_batches(self.x, self.y, self.sampler, self.bs)


def seed_worker(seed: int, args_dict: dict[str, Any], t_start: float) -> None:
    """Every spec of one seed, in order, in this process; one JSON line per finished run."""
    from oodlab.detect.cache import checkpoint_hash
    from oodlab.detect.evaluate import evaluate
    from oodlab.detect.provenance import bundle_split_tags, spec_tags
    from oodlab.methods import build_method
    from oodlab.spec import load_spec

    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundles, meta = load_bundles(args.data, [seed])
    bundle = bundles[seed]
    tags = bundle_split_tags(bundle)
    if tags != meta[f"{seed}/split_tags"]:
        raise RuntimeError(f"seed {seed}: the rebuilt splits differ from the export's")
    out = Path(args.out)
    selected: dict[str, dict] = {}
    took: dict[str, float] = {}
    for path in args.specs:
        spec = load_spec(path, [*overrides_for(path, args.set), f"seed={seed}"])
        left = args.deadline - (time.time() - t_start)
        # a run takes about as long as the last of its architecture; a first ResNet-18 about
        # 4 SmallCNN runs (the GPU is shared by every seed's process)
        need = 1.2 * (took.get(spec.model.arch) or 4 * took.get("small_cnn", 0.0))
        if left < max(need, 20.0):
            print(f"seed {seed}: {spec.name} skipped ({left:.0f} s left)", flush=True)
            continue
        init = None
        if spec.init_from:
            ref = spec.init_from.removeprefix("spec:")
            if ref not in selected:
                print(f"seed {seed}: {spec.name} skipped (no {ref} run)", flush=True)
                continue
            init = selected[ref]
        t = time.perf_counter()
        model, weights, history, facts = train_run(spec, bundle, init, device)
        supervised = build_method(spec).kind != "unsupervised"
        te = time.perf_counter()
        report = evaluate(spec, model, bundle, supervised=supervised, device=device)
        facts["eval_wall_s"] = time.perf_counter() - te
        selected[spec.name] = weights
        took[spec.model.arch] = time.perf_counter() - t
        dumped = spec.model_dump(mode="json")
        record = {"spec_path": path, "spec": dumped, "seed": seed,
                  "metrics": report.metrics, "history": history, "facts": facts,
                  "tags": tags | spec_tags(dumped)
                  | {"oodlab.provenance.checkpoint": checkpoint_hash(weights),
                     "oodlab.provenance.code": args.code, "oodlab.hardware": args.hardware}
                  | ({"oodlab.init_from": spec.init_from} if spec.init_from else {})}
        with open(out / f"runs-{seed}.jsonl", "a") as f:  # one line per finished run
            f.write(json.dumps(record, default=float) + "\n")
        print(f"seed {seed}: {spec.name} done in {took[spec.model.arch]:.0f} s "
              f"({facts['optimizer_steps']} steps, train {facts['train_wall_s']:.0f} s, "
              f"eval {facts['eval_wall_s']:.0f} s) ID acc "
              f"{report.metrics.get('test/id_acc', 0):.3f} "
              f"AUROC {report.metrics.get('test/auroc', 0):.3f}", flush=True)


def overrides_for(path: str, sets: list[str]) -> list[str]:
    """``--set`` entries for one spec: ``key=value`` for every spec, ``name:key=value`` for
    the spec called ``name`` (its file stem)."""
    name = Path(path).stem
    out = []
    for s in sets:
        head, _, rest = s.partition(":")
        if rest and "=" not in head:
            if head == name:
                out.append(rest)
        else:
            out.append(s)
    return out


def throughput(args: argparse.Namespace, bundle, device: torch.device, threads: int,
               steps: int) -> dict[str, float]:
    """Images/s of ``steps`` steps of each spec's first epoch through the platform's loader
    (items collated on the CPU, then moved: what a Ray Train worker does without loader
    workers) on ``device`` with ``threads`` CPU threads; the first 3 steps are warm-up."""
    from oodlab.spec import load_spec
    from oodlab.train.epoch import prepare, train_epoch

    torch.set_num_threads(threads)
    out = {}
    for path in (SPECS[0], SPECS[-1]):
        spec = load_spec(path, overrides_for(path, args.set))
        run = prepare(spec, bundle, device=device)

        def moved(n: int, loader=run.id_loader):
            for xb, yb in itertools.islice(loader, n):
                yield xb.to(device), yb.to(device)

        for n in (3, steps):  # warm-up, then timed
            _, ips = train_epoch(run.model, run.method, moved(n), None, run.opt, run.sched,
                                 run.state)
        key = f"{spec.model.arch}_w{spec.model.width}/{device.type}/{threads}t"
        out[key] = ips
        print(f"throughput {key}: {ips:.0f} images/s over {steps} steps", flush=True)
    return out


def run(args: argparse.Namespace) -> None:
    import multiprocessing as mp

    t_start = time.time()
    args.seeds = args.seeds or [s for p in args.data
                                for s in json.loads(str(np.load(p)["meta"]))["seeds"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    args.hardware = (f"{gpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                     "plain processes (bench/fmnist_gpu.py), one per seed")
    print(args.hardware, flush=True)
    facts: dict[str, Any] = {"hardware": args.hardware, "argv": sys.argv[1:]}
    (out / "facts.json").write_text(json.dumps(facts, indent=1))  # kept if the call is cut
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=seed_worker, args=(s, vars(args), t_start)) for s in args.seeds]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    facts |= {"exit_codes": [p.exitcode for p in procs], "wall_s": time.time() - t_start}
    left = args.deadline - (time.time() - t_start)
    if args.throughput_steps and left > 60:
        bundle = load_bundles(args.data, args.seeds[:1])[0][args.seeds[0]]
        rates = {}
        if torch.cuda.is_available():
            rates |= throughput(args, bundle, torch.device("cuda"), 1, args.throughput_steps)
        rates |= throughput(args, bundle, torch.device("cpu"), 1, args.cpu_steps)
        facts["throughput"] = rates
    (out / "facts.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts, indent=1))


# ------------------------------------------------------------------------ record (here) ------
def record(args: argparse.Namespace) -> None:
    """Log every run JSON of ``args.dirs`` as a finished MLflow run of table ``args.name`` in
    ``<workdir>/mlflow.db``, then write the table (through ``oodlab results``' writer)."""
    from oodlab.report.results import RESULTS_TAG, write_report
    from oodlab.spec import validate_spec
    from oodlab.track import tracking

    runs = [json.loads(line) for d in args.dirs for p in sorted(Path(d).glob("runs-*.jsonl"))
            for line in p.read_text().splitlines() if line.strip()]
    facts = [json.loads((Path(d) / "facts.json").read_text()) for d in args.dirs
             if (Path(d) / "facts.json").is_file()]
    hardware = facts[0]["hardware"] if facts else "?"
    specs = {}
    for r in runs:
        spec = validate_spec(r["spec"] | {"workdir": args.workdir})  # the spec that ran
        specs.setdefault(r["spec_path"], spec)
        run_id = tracking.start_run(spec, r["spec_path"], tags=r["tags"] | {
            RESULTS_TAG: args.name, "oodlab.record_of": digest_of(r)})
        client = tracking.client_for(spec)
        for m in r["history"]:
            tracking.log_metrics(client, run_id, m, step=int(m["epoch"]))
        tracking.log_metrics(client, run_id, r["metrics"] | {
            f"run/{k}": v for k, v in r["facts"].items() if isinstance(v, int | float)},
            step=spec.train.epochs)
        tracking.end_run(spec, run_id, ok=True)
    ordered = [specs[p] for p in SPECS if p in specs]
    command = ("python bench/fmnist_gpu.py run " + " ".join(facts[0]["argv"][1:])
               if facts else "?") + "; then " + " ".join(["python", *sys.argv])
    out = write_report(ordered, args.name, args.out, command, args.scores, ["auroc", "fpr95"],
                       baseline=Path(SPECS[0]).stem, curves=["val/auroc", "train/loss"],
                       hardware_text=hardware)
    print(f"recorded {len(runs)} runs; wrote {out}")


def digest_of(r: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(r["metrics"], sort_keys=True).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="every seed's data bundle to one .npz (here)")
    e.add_argument("--out", default=".devdata/fmnist_a.npz")
    e.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    e.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the data spec (e.g. data.limit=1000 for a smoke test)")
    e.add_argument("--base", help="an earlier export: images it holds are referenced, not copied "
                                  "(to split the data over files of a bounded size)")
    e.set_defaults(func=export)
    r = sub.add_parser("run", help="train and evaluate specs x seeds, one process per seed")
    r.add_argument("--data", nargs="+", required=True,
                   help="exports, a --base before the exports that extend it")
    r.add_argument("--out", required=True)
    r.add_argument("--specs", nargs="+", default=SPECS)
    r.add_argument("--seeds", nargs="+", type=int,
                   help="seeds to run (default: every seed the exports hold)")
    r.add_argument("--set", nargs="*", default=[], metavar="[SPEC:]KEY=VALUE",
                   help="overrides: KEY=VALUE for every spec, SPEC:KEY=VALUE for one (file stem)")
    r.add_argument("--code", default="unknown",
                   help="code version of the tree sent (git describe here; no git there)")
    r.add_argument("--threads", type=int, default=3, help="CPU threads per seed process")
    r.add_argument("--deadline", type=float, default=480, help="seconds; later runs are skipped")
    r.add_argument("--throughput-steps", type=int, default=200, help="GPU steps timed (0: none)")
    r.add_argument("--cpu-steps", type=int, default=20, help="CPU steps timed")
    r.set_defaults(func=run)
    c = sub.add_parser("record", help="log run JSONs to MLflow and write the table (here)")
    c.add_argument("dirs", nargs="+")
    c.add_argument("--workdir", required=True, help="the MLflow store goes to WORKDIR/mlflow.db")
    c.add_argument("--name", default="fmnist-baselines-gpu")
    c.add_argument("--out", default="docs/results/fmnist_gpu.md")
    c.add_argument("--scores", nargs="+", default=["msp", "max_logit", "energy", "odin", "knn",
                                                   "mahalanobis"])
    c.set_defaults(func=record)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
