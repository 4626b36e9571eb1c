"""The conversion plan: for each Megatron-Core tensor, its official source tensors, their fusion, its
split over ranks and the stored format of its sources. Every route of the bridge asks it.

- `python -m bridge import` (`bridge.convert`) assembles whole tensors from a checkpoint directory;
- `AutoBridge.load_hf_weights` assembles one rank's share of each tensor, reading only that share;
- `bridge.pipeline` converts in-memory state dicts;
- export splits tensors back into official ones (`TensorPlan.split`).

The plan is built from the naming tables of `bridge.mcore_naming`. A rule with two
official names is SwiGLU's gate and up projections (`w1`, `w3` in DeepSeek's
official inference code) concatenated on dim 0 into Megatron-Core's `linear_fc1`,
the order Megatron-Core's `MLP` with `gated_linear_unit` expects. Tensor parallelism
splits each of the two halves on its own, so a rank holds [w1 part; w3 part].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from bridge.mcore_naming import SEQUENTIAL_EXPERTS, MCoreNaming, RuleMatch, Sharding
from bridge.quantisation import SourceFormat

Items = Iterable[tuple[str, torch.Tensor]]


# --- where a rank sits, and which share of a tensor it holds -------------------------------------------
@dataclass(frozen=True)
class RankPosition:
    """Where this process sits in the tensor-, expert- and expert-tensor-parallel groups."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1

    @classmethod
    def current(cls) -> RankPosition:
        """This process's position in Megatron-Core's parallel state (a single rank if it is not set up)."""
        ps = parallel_state
        if not ps.model_parallel_is_initialized():
            return cls()
        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
        )

    @property
    def single(self) -> bool:
        return self.tp_size == self.ep_size == self.etp_size == 1


@dataclass(frozen=True)
class Slice:
    """A rank's share of a tensor: part `rank` of `size` along `dim`.

    With `glu`, the tensor is [w1; w3] and each half is split on its own, so the
    share is [w1 part; w3 part]. `dim=None` (or `size=1`) is the whole tensor.
    """

    dim: int | None = None
    rank: int = 0
    size: int = 1
    glu: bool = False

    @property
    def whole(self) -> bool:
        return self.dim is None or self.size == 1

    def length(self, extent: int, name: str) -> int:
        """The length of one rank's piece of `extent`; a clear error when it does not divide."""
        if extent % self.size:
            divisors = [n for n in range(1, extent + 1) if extent % n == 0]
            raise ValueError(
                f"{name}: {extent} rows/columns along dim {self.dim} do not divide over {self.size} ranks; "
                f"use a parallel size in {divisors}"
            )
        return extent // self.size

    def of(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """This share of a full tensor, as a view ([w1 part; w3 part] of a glu tensor is a copy)."""
        if self.whole:
            return tensor
        halves = tensor.chunk(2, dim=self.dim) if self.glu else (tensor,)
        pieces = []
        for half in halves:
            length = self.length(half.shape[self.dim], name)
            pieces.append(half.narrow(self.dim, self.rank * length, length))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)

    def joined(self, shares: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's share, in rank order (the inverse of `of`)."""
        if not self.glu:
            return torch.cat(shares, dim=self.dim)
        halves = [share.chunk(2, dim=self.dim) for share in shares]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=self.dim)


WHOLE = Slice()
"""The share of a rank that holds a tensor whole."""


def experts_per_rank(num_experts: int, ep_size: int) -> int:
    if num_experts % ep_size:
        divisors = [n for n in range(1, num_experts + 1) if num_experts % n == 0]
        raise ValueError(f"{num_experts} routed experts do not divide over ep={ep_size} ranks; use ep in {divisors}")
    return num_experts // ep_size


# --- one tensor ------------------------------------------------------------------------------------------
ReadShare = Callable[[str, Slice], torch.Tensor]
"""(official name, share) -> that share of the official tensor."""


@dataclass(frozen=True)
class TensorPlan:
    """How one Megatron-Core tensor converts: the one answer to "where does tensor X come from"."""

    match: RuleMatch
    formats: tuple[SourceFormat | None, ...] = field(default=())
    """The stored format of each official source, where a checkpoint or import record gave it."""

    @property
    def mcore(self) -> str:
        return self.match.mcore_name

    @property
    def official(self) -> list[str]:
        return self.match.official_names

    @property
    def sharding(self) -> Sharding:
        return self.match.rule.sharding

    @property
    def fused(self) -> bool:
        return self.match.rule.fused

    def official_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of each official source of a tensor of `shape` (fused sources split dim 0)."""
        shape = tuple(shape)
        return (shape[0] // len(self.official), *shape[1:]) if self.fused else shape

    def share(self, ranks: RankPosition) -> Slice:
        """The share a rank holds (routed experts split over the expert-tensor-parallel group)."""
        sharding = self.sharding
        if sharding.dim is None:
            return WHOLE
        if sharding.by_expert:
            return Slice(sharding.dim, ranks.etp_rank, ranks.etp_size, sharding.glu)
        return Slice(sharding.dim, ranks.tp_rank, ranks.tp_size, sharding.glu)

    def block(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        """The dim-0 block of `tensor` (full, or a rank's share) that official source `index` makes (a view)."""
        if not self.fused:
            return tensor
        rows = tensor.shape[0] // len(self.official)
        return tensor.narrow(0, index * rows, rows)

    def source_share(self, part: Slice) -> Slice:
        """The share of each official source that `part` of this tensor holds (a glu share is one per source)."""
        return Slice(part.dim, part.rank, part.size)

    def assemble(
        self, read: ReadShare, part: Slice = WHOLE, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`part` of this tensor from its official sources (in `dtype`, if given), or written into `out`.

        Each source's share is read once; fused sources are copied into place in one
        tensor, [w1 share; w3 share], which is what a glu split holds.
        """
        source_part = self.source_share(part)
        first = read(self.official[0], source_part)
        if out is None:
            dtype = first.dtype if dtype is None else dtype
            if not self.fused:
                return first.to(dtype)
            out = torch.empty((first.shape[0] * len(self.official), *first.shape[1:]), dtype=dtype)
        for i, official in enumerate(self.official):
            value = first if i == 0 else read(official, source_part)
            destination = self.block(out, i)
            if tuple(value.shape) != tuple(destination.shape):
                raise ValueError(
                    f"{official}: its share has shape {tuple(value.shape)} but {self.mcore} holds "
                    f"{tuple(destination.shape)} of it here; does the config match the weights?"
                )
            destination.copy_(value)
            del value
            first = None
        return out

    def split(self, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The official tensors of a full tensor (views; fused ones are its dim-0 blocks)."""
        return [(official, self.block(tensor, i)) for i, official in enumerate(self.official)]


# --- the whole model ---------------------------------------------------------------------------------------
class ConversionPlan:
    """The plan of every tensor of a model of one expert form, with the sources' formats if known."""

    def __init__(self, expert_form: str = SEQUENTIAL_EXPERTS, formats: Mapping[str, SourceFormat] | None = None):
        self.naming = MCoreNaming(expert_form)
        self.formats = dict(formats or {})

    @property
    def expert_form(self) -> str:
        return self.naming.expert_form

    def _plan(self, match: RuleMatch) -> TensorPlan:
        return TensorPlan(match, tuple(self.formats.get(o) for o in match.official_names))

    def tensor(self, mcore_name: str) -> TensorPlan:
        return self._plan(self.naming.from_mcore(mcore_name))

    def renumbered(self, tensor: TensorPlan, **values: int) -> TensorPlan:
        """The plan of `tensor` with some placeholders renumbered (local -> global layer or expert)."""
        return self._plan(RuleMatch(tensor.match.rule, {**tensor.match.values, **values}))

    def fuse(self, items: Items) -> Iterator[tuple[str, torch.Tensor]]:
        """Official tensors -> full Megatron-Core tensors; fused parts wait for their partners."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in items:
            match = self.naming.from_official(name)
            plan = self._plan(match)
            if not plan.fused:
                yield plan.mcore, tensor
                continue
            parts = pending.setdefault(plan.mcore, {})
            parts[name] = tensor
            if len(parts) == len(plan.official):
                ready = pending.pop(plan.mcore)
                yield plan.mcore, plan.assemble(lambda official, _, ready=ready: ready[official])
        if pending:
            mcore_name, parts = next(iter(pending.items()))
            missing = [o for o in self.tensor(mcore_name).official if o not in parts]
            raise KeyError(f"checkpoint lacks {missing}, needed with its partner(s) to build {mcore_name!r}")

    def split(self, items: Items) -> Iterator[tuple[str, torch.Tensor]]:
        """Full Megatron-Core tensors -> official tensors."""
        for name, tensor in items:
            yield from self.tensor(name).split(tensor)
