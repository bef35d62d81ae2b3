"""oodlab.cluster.heap: fixed malloc thresholds keep a forward pass's activations in the heap."""

from __future__ import annotations

import mmap
import platform
import subprocess
import sys

import pytest

from oodlab.cluster.heap import keep_freed_heap, minor_faults

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# A forward pass of two convolutions on 32 MNIST-sized images, as a replica's batch stage runs
# it, in a process of its own: the thresholds are process-wide and cannot be unset.
FORWARD = """
import sys
import torch
from oodlab.cluster.heap import keep_freed_heap, minor_faults

kept = keep_freed_heap(int(sys.argv[1]))
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
x = torch.rand(32, 1, 28, 28)
faults = []
with torch.no_grad():
    for _ in range(3):
        model(x)
    for _ in range(21):
        before = minor_faults()
        model(x)
        faults.append(minor_faults() - before)
print(kept, sorted(faults)[10])  # the median batch: a one-off growth of the heap aside
"""


def _faults_per_batch(mb: int) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", FORWARD, str(mb)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, faults = out.stdout.split()
    return kept, float(faults)  # of the median batch


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_heap_stops_the_page_faults_of_every_batch():
    """Under glibc's defaults each batch returns its activations (3.2 MB here, 800 pages) to
    the kernel and faults them back in; with the heap kept, the next batch reuses them. A
    keep_freed_heap that set nothing, or one threshold only, leaves the faults."""
    default_set, default = _faults_per_batch(0)
    kept_set, kept = _faults_per_batch(64)
    assert (default_set, kept_set) == ("False", "True")
    assert default > 300, default
    assert kept < 10, kept


def test_nothing_to_set_for_zero():
    assert keep_freed_heap(0) is False


def test_minor_faults_counts_this_threads_new_pages():
    """A fresh anonymous mapping of 4 MiB, written once: one fault per 4 KiB page."""
    before = minor_faults()
    with mmap.mmap(-1, 4 << 20) as m:
        for offset in range(0, 4 << 20, mmap.PAGESIZE):
            m[offset] = 1
    assert minor_faults() - before >= (4 << 20) // mmap.PAGESIZE * 0.9
