"""``oodlab run`` (train + evaluate one spec) and ``oodlab oe-select`` (rank OE candidates).

The OE ranking is EDGE's singular-value measure (Sun et al. 2025, Sec. 3.4), implemented in
:mod:`oodlab.detect.oe_select`. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse

from oodlab.cli.main import add_set


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``oodlab run`` and ``oodlab oe-select`` on the top-level subparsers."""
    run = sub.add_parser(
        "run", help="train + evaluate one spec on Ray, tracked in MLflow",
        description="Train the spec's method with Ray Train, evaluate it on every OOD set, "
                    "log everything to MLflow and print a results table.")
    run.add_argument("spec", help="experiment spec (YAML), e.g. jobs/quickstart.yaml")
    add_set(run)
    run.set_defaults(func=_cmd_run)

    oes = sub.add_parser(
        "oe-select", help="rank OE candidate sets with EDGE's singular-value measure",
        description="Extract features of the ID training set and of each OE candidate in "
                    "data.oe, rank the candidates by the distance between their top-k singular "
                    "values (settings: data.oe_select), log the table to MLflow and write the "
                    "choice to <workdir>/oe_select/<name>.json.")
    oes.add_argument("spec", help="experiment spec (YAML) whose data.oe lists the candidates")
    add_set(oes)
    oes.set_defaults(func=_cmd_oe_select)


def _cmd_run(args: argparse.Namespace) -> int:
    from oodlab.spec import load_spec

    spec = load_spec(args.spec, args.set)  # SpecError -> exit 2 before Ray or MLflow start
    from oodlab.train.pipeline import headtail_table, results_table, run_experiment

    result = run_experiment(spec, spec_path=args.spec)
    sets = list(result.report.scores[spec.eval.scores[0]].per_set)
    print()
    id_key = "test/id_map" if "test/id_map" in result.metrics else "test/id_acc"
    print(f"== {spec.name}: method {spec.method.name}, ID {spec.data.id} "
          f"({id_key} {result.metrics.get(id_key, float('nan')):.3f}) ==")  # nan: unsupervised
    print(results_table(result.metrics, spec.eval.scores, sets))
    if "headtail/num_head_classes" in result.metrics:
        print()
        print(headtail_table(result.metrics, spec.eval.scores[0]))
    print(f"\nserved score: {spec.eval.scores[0]}, threshold {result.metrics['threshold']:.4f} "
          f"(95% TPR on ID validation)")
    print(f"MLflow run {result.run_id}; model {result.model['model_uri']}")
    print(f"open the UI with:  .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


def _cmd_oe_select(args: argparse.Namespace) -> int:
    import json

    from oodlab.spec import SpecError, load_spec

    spec = load_spec(args.spec, args.set)
    if not spec.data.oe:
        raise SpecError("data.oe: list the OE candidate sets to rank")
    from oodlab.track import tracking
    from oodlab.train.pipeline import log_oe_selection, select_oe

    rows, backbone = select_oe(spec)
    print(f"backbone: {backbone}")
    print(f"{'candidate':<22}{'distance':>10}{'normalised':>12}  selected")
    for r in rows:
        mark = "yes" if r.selected else ""
        print(f"{r.name:<22}{r.distance:>10.4f}{r.normalised:>12.3f}  {mark}")
    run_id = tracking.start_run(spec, args.spec, tags={"oodlab.kind": "oe-select"})
    log_oe_selection(spec, run_id, rows, backbone)
    tracking.end_run(spec, run_id, ok=True)
    out = spec.workdir_path / "oe_select" / f"{spec.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"spec": spec.name, "selected": [r.name for r in rows if r.selected],
               "ranking": [vars(r) for r in rows], "backbone": backbone,
               "mlflow_run": run_id}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out)
    print(f"choice written to {out} (MLflow run {run_id})")
    return 0
