"""Captured graphs: what a kernel costs inside a replayed CUDA graph (or Ascend's aclgraph).

Every serving system runs decode as a captured graph: SGLang and vLLM capture the decode step
for each batch size in a CUDA graph (SGLang's `--cuda-graph-bs` / `--cuda-graph-max-bs`, vLLM's
`cudagraph_capture_sizes`) and replay it, and Ascend serving runs decode in graph mode
(torchair, whose "reduce-overhead" mode is aclgraph, Ascend's counterpart of CUDA graphs);
prefill runs eagerly (SGLang captures only decode batches).

What that changes in the cost model (kernels/cost.py): an eager kernel is charged `launch_us`
(the catalog's 4 us, an estimate of the per-kernel launch cost as the device sees it, host issue
included) plus its roofline. In a replayed graph the host issues one launch for the whole graph
and the kernels follow each other on the device with a small gap, `GRAPH_LAUNCH_US` each. A
graph-captured step is therefore charged as an eager one with `launch_us = GRAPH_LAUNCH_US`
(`launch_us(graphs)`, the figure a CostModel's `launch_us` override takes). On the host lane
(kernels/timeline.py, which makes the host pay min(launch, cost) per kernel) that is consistent:
the host's share per kernel is at most GRAPH_LAUNCH_US, never more than the kernel's own cost,
so the host never limits a captured step, as a single graph launch does not.

The figure (an estimate): NVIDIA's "Getting Started with CUDA Graphs" (Alan Gray, NVIDIA
Technical Blog, 2019, https://developer.nvidia.com/blog/cuda-graphs/, V100, 20 short kernels of
~2.9 us a step): 3.8 us per kernel launched back to back on a stream, 3.4 us per kernel
replayed from a graph, so ~0.5 us per kernel beyond its own work inside a graph. No Hopper,
Blackwell or Ascend figure was found; the same 0.5 us is assumed for every chip (as the
catalog's `launch_us` is one figure for every chip), and for aclgraph it is an assumption
that Ascend's graph replay behaves like CUDA's.
"""

from __future__ import annotations

GRAPH_LAUNCH_US = 0.5  # us per kernel inside a replayed graph (an estimate: see the module doc)
SOURCE = ("estimate: NVIDIA Technical Blog, Getting Started with CUDA Graphs (https://developer.nvidia.com/blog/"
          "cuda-graphs/, V100): 3.4 us per ~2.9 us kernel replayed from a graph, against 3.8 us launched on a "
          "stream; assumed for every chip, Ascend's aclgraph included")


def launch_us(graphs: bool) -> float | None:
    """The CostModel `launch_us` override of a step run as a captured graph (None: eager, the
    chip's own launch_us)."""
    return GRAPH_LAUNCH_US if graphs else None
