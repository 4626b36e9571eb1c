"""Running Megatron-Core: process groups and parallel state (`initialize`/`destroy`), the CPU patches
that let Megatron-Core run on gloo without a GPU (`cpu_compat`), and the local rank harness
(`run_on_ranks`) the tests use."""

from megatron_v4.runtime.parallel import ParallelLayout, destroy, initialize, layout

__all__ = ["ParallelLayout", "destroy", "initialize", "layout"]
