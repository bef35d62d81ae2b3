"""Shared-storage preflight: a run that spans Ray nodes must keep its state where all of them
see it.

On one node everything may live on that node's disk (``<workdir>/ray``, SQLite MLflow). On
more than one node a Ray Train worker on node B writes its checkpoint to B's disk, where the
driver on node A never finds it (Ray Train's storage guide: "a multi-node cluster needs
shared storage such as NFS or cloud storage"), and a SQLite file is reachable only from the
node that holds it. Both fail late: after training, or when a restarted worker looks for the
checkpoint it wrote elsewhere. :func:`check` refuses such a run before any MLflow run or
training starts, in one sentence saying what to set.

The run spans several nodes when the Ray cluster has more than one alive node, or when its
workers cannot fit on the largest node (an autoscaling cluster that has not grown yet).
Storage is shared when it is ``s3://`` or a local path on a network filesystem (NFS, CIFS,
Lustre, CephFS, GlusterFS, GPFS, BeeGFS, FUSE mounts such as JuiceFS or Mountpoint for S3),
read from ``/proc/mounts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oodlab.errors import StorageError

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "gpfs", "beegfs",
    "fuse.glusterfs", "fuse.cephfs", "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse",
    "fuse.mountpoint-s3", "fuse.sshfs", "virtiofs", "9p", "efs",
})
LOCAL_TRACKING_SCHEMES = ("sqlite:", "file:")


@dataclass(frozen=True)
class ClusterShape:
    """What preflight needs to know about the Ray cluster: alive nodes and their CPUs/GPUs."""

    nodes: int
    max_node_cpus: float
    max_node_gpus: float


def cluster_shape(ray_nodes: list[dict[str, Any]] | None = None) -> ClusterShape:
    """The shape of the connected Ray cluster (``ray.nodes()``; alive nodes only)."""
    if ray_nodes is None:
        import ray

        ray_nodes = ray.nodes()
    alive = [n for n in ray_nodes if n.get("Alive", n.get("alive", False))]
    res = [n.get("Resources", {}) for n in alive]
    return ClusterShape(nodes=len(alive),
                        max_node_cpus=max((r.get("CPU", 0.0) for r in res), default=0.0),
                        max_node_gpus=max((r.get("GPU", 0.0) for r in res), default=0.0))


def spans_nodes(shape: ClusterShape, num_workers: int, cpus_per_worker: float,
                use_gpu: bool) -> bool:
    """True when the run may place workers on more than one node."""
    if shape.nodes > 1:
        return True
    if num_workers * cpus_per_worker > shape.max_node_cpus:
        return True
    return use_gpu and num_workers > shape.max_node_gpus


def filesystem_type(path: str | Path, mounts: str | None = None) -> str:
    """The filesystem type of the mount holding ``path`` (the longest mount point that is a
    prefix of it, symlinks resolved), from ``/proc/mounts``; "" when unknown."""
    p = Path(path).expanduser().resolve()
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(p) == point or str(p).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def storage_is_shared(storage: str, mounts: str | None = None) -> bool:
    """s3:// or a path on a network filesystem every node can mount."""
    if storage.startswith("s3://"):
        return True
    if "://" in storage:  # another pyarrow URI (gs://, hdfs://): remote by construction
        return not storage.startswith("file://")
    return filesystem_type(storage, mounts) in NETWORK_FILESYSTEMS


def tracking_is_shared(uri: str) -> bool:
    """An MLflow server or a database server; not a SQLite file or a local directory."""
    return "://" in uri and not uri.startswith(LOCAL_TRACKING_SCHEMES)


def problems(storage: str, tracking_uri: str, mounts: str | None = None) -> list[str]:
    """What a multi-node run cannot use here: each entry is ``<what to set> (<why>)``."""
    out = []
    if not storage_is_shared(storage, mounts):
        kind = filesystem_type(storage, mounts) or "unknown"
        out.append(f"storage=s3://<bucket>/<prefix> or a path on a shared filesystem "
                   f"(storage {storage} is on this node's {kind} disk)")
    if not tracking_is_shared(tracking_uri):
        out.append(f"MLFLOW_TRACKING_URI=http://<mlflow-server>:5000 (tracking "
                   f"{tracking_uri} is a file on this node)")
    return out


def check(storage: str, tracking_uri: str, *, num_workers: int, cpus_per_worker: float = 1.0,
          use_gpu: bool = False, shape: ClusterShape | None = None,
          mounts: str | None = None) -> None:
    """Refuse a run that spans Ray nodes with node-local storage or tracking.

    ``storage``: where Ray Train checkpoints and Tune state go (the spec's ``storage`` or its
    ``<workdir>/ray`` default); ``tracking_uri``: the MLflow store the run logs to. Raises
    :class:`StorageError` with one sentence saying what to set; passes silently on one node.
    """
    shape = shape or cluster_shape()
    if not spans_nodes(shape, num_workers, cpus_per_worker, use_gpu):
        return
    found = problems(storage, tracking_uri, mounts)
    if found:
        where = (f"{shape.nodes} Ray nodes" if shape.nodes > 1 else
                 f"more than one Ray node ({num_workers} workers x {cpus_per_worker:g} CPUs, "
                 f"largest node {shape.max_node_cpus:g} CPUs)")
        raise StorageError(f"a run on {where} needs storage and tracking every node reaches: "
                           f"set {' and '.join(found)}.")

