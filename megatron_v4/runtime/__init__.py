"""Running Megatron-Core: process groups and parallel state (`initialize`/`destroy`), the CPU patches
that let Megatron-Core run on gloo without a GPU (`cpu_compat`), the local rank harness
(`run_on_ranks`) the tests use, and the command-line conventions of the tools (`command_line`,
`quiet`). Loaded on first use, like the package facade."""

from megatron_v4.runtime.lazy import lazy_exports

_EXPORTS = {
    "ParallelLayout": "megatron_v4.runtime.parallel",
    "destroy": "megatron_v4.runtime.parallel",
    "initialize": "megatron_v4.runtime.parallel",
    "layout": "megatron_v4.runtime.parallel",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
