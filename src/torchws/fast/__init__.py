"""Fast Weight Standardization for whole models: one pass per forward, and one per optimizer step when accumulating.

* :func:`enable_batched_ws` (what ``create_model`` and ``convert`` turn on for WS models): every WS weight of a
  model standardized by one engine before each forward (:mod:`torchws.fast.batched`).
* :func:`ws_accumulation`: with gradient accumulation, every WS weight standardized once per optimizer step
  (:mod:`torchws.fast.accumulate`).
* :data:`ENGINES` and :func:`select_engine`: the engines and the one place that chooses among them
  (:mod:`torchws.fast.engines`).
"""

from torchws.fast.accumulate import WSAccumulation, ws_accumulation
from torchws.fast.batched import BatchedWS, auto_enable, disable_batched_ws, enable_batched_ws, find_handle
from torchws.fast.engines import ENGINES, auto_engine, select_engine
from torchws.fast.plan import Plan, batchable

__all__ = [
    "ENGINES",
    "BatchedWS",
    "Plan",
    "WSAccumulation",
    "auto_enable",
    "auto_engine",
    "batchable",
    "disable_batched_ws",
    "enable_batched_ws",
    "find_handle",
    "select_engine",
    "ws_accumulation",
]
