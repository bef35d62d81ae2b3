"""Autoscaling on images in flight, not on requests.

Ray Serve's default policy scales on ongoing *requests* per replica. A request here carries
1 to ``max_images`` images, and the work of a replica is its images: 64 one-image requests
and 2 thirty-two-image requests are the same load. So each replica reports the images it
holds (decoding, waiting for a batch, in a forward pass) through Serve's custom-metrics hook
(``record_autoscaling_stats``), and :class:`ImagesInFlight` — a custom autoscaling policy
(``autoscaling_config.policy``, Ray Serve >= 2.50) — asks for
``ceil(total images in flight / target_images)`` replicas. Serve clamps the answer to
``min_replicas`` and ``max_replicas``. A scale-down waits until the lower count has held for
``downscale_delay_s``; a scale-up is immediate.
"""

from __future__ import annotations

import math
import time
from typing import Any

METRIC = "images_in_flight"


def decide(images: float, target_images: int, current: int, state: dict[str, Any],
           now: float, downscale_delay_s: float) -> tuple[int, dict[str, Any]]:
    """(replicas to ask for, new policy state) for ``images`` in flight over all replicas."""
    want = math.ceil(images / target_images)
    if want >= current:
        return want, {}
    since = state.get("below_since", now)
    if now - since >= downscale_delay_s:
        return want, {}
    return current, {"below_since": since}


class ImagesInFlight:
    """Serve autoscaling policy: replicas = ceil(images in flight / ``target_images``)."""

    def __init__(self, target_images: int = 32, downscale_delay_s: float = 30.0) -> None:
        self.target_images = target_images
        self.downscale_delay_s = downscale_delay_s

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """``ctx`` is a ``ray.serve.config.AutoscalingContext``."""
        current = ctx.target_num_replicas
        per_replica = (ctx.aggregated_metrics or {}).get(METRIC)
        if not per_replica:  # no report yet (replicas starting): keep what we have
            return current, ctx.policy_state
        now = ctx.current_time if ctx.current_time is not None else time.time()
        return decide(sum(per_replica.values()), self.target_images, current,
                      ctx.policy_state, now, self.downscale_delay_s)


POLICY_PATH = f"{__name__}:{ImagesInFlight.__qualname__}"  # autoscaling_config.policy
