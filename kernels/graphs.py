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

The figure, 0.5 us, is an estimate bounded by two measurements (no Hopper, datacenter Blackwell
or Ascend figure was found):
- NVIDIA's "Getting Started with CUDA Graphs" (Alan Gray, NVIDIA Technical Blog, 2019,
  https://developer.nvidia.com/blog/cuda-graphs/; V100, CUDA 10.1, 20 short kernels a step):
  3.8 us per kernel launched back to back on a stream, 3.4 us per kernel replayed from a graph.
- pegainfer (3), "From Launch Overhead to CUDA Graph" (https://susun-blog.com/blog/pegainfer-3-cuda-
  graph/; RTX 5070 Ti, CUDA 13.0, 20 kernels of 47 us a step): 47.16 us per kernel queued back to
  back (CUDA events), 46.98 us per kernel replayed from a graph (graph launch and sync included),
  52.92 us launched one by one; nsys shows a 4.1 us launch, which the catalog's 4 us eager
  launch_us matches, and no visible gap between a replayed graph's kernels.
The same figure is assumed for every chip (the catalog's launch_us is one figure for every chip);
for Ascend it assumes aclgraph replays as CUDA graphs do (vLLM-Ascend: "reduce-overhead ... is
equivalent to cudagraph functionality, named aclgraph", https://discuss.vllm.ai/t/can-ascend-
officially-draft-a-documentation-on-the-vllm-ascend-adaptation-for-graph-mode/162/5). A DeepSeek-V3
decode step launches 4,069 kernels on a device at EP 384 (serving.phase, eager less graphed over
3.5 us), so 0.5 us a kernel is 2.0 ms of the step where the eager 4 us was 16.3 ms.
"""

from __future__ import annotations

GRAPH_LAUNCH_US = 0.5  # us per kernel inside a replayed graph (an estimate: see the module doc)


def launch_us(graphs: bool) -> float | None:
    """The CostModel `launch_us` override of a step run as a captured graph (None: eager, the
    chip's own launch_us)."""
    return GRAPH_LAUNCH_US if graphs else None
