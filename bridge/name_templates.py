"""Tensor-name templates such as `layers.{layer}.ffn.experts.{expert}.w1.weight`.

A template's *skeleton* replaces each `{placeholder}` by `#`; a concrete name's
skeleton replaces each index (a number after a dot, or glued to `weight` as in
Transformer-Engine's `linear_fc1.weight7`) by `#`. Matching a name is then one
dictionary look-up, whatever the number of layers and experts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

_INDEX = re.compile(r"(?:(?<=\.)|(?<=weight))\d+(?=\.|$)")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")

T = TypeVar("T")


@dataclass(frozen=True)
class Template:
    """A tensor-name pattern with named integer placeholders."""

    text: str

    @property
    def skeleton(self) -> str:
        return _PLACEHOLDER.sub("#", self.text)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(_PLACEHOLDER.findall(self.text))

    def format(self, values: Mapping[str, int]) -> str:
        return self.text.format(**values)


def skeleton_of(name: str) -> tuple[str, list[int]]:
    """The skeleton of a concrete name and its indices in order of appearance."""
    return _INDEX.sub("#", name), [int(i) for i in _INDEX.findall(name)]


class TemplateIndex(Generic[T]):
    """Finds which template a concrete name instantiates, and with which placeholder values."""

    def __init__(self, entries: Iterable[tuple[str, T]]):
        self._by_skeleton: dict[str, tuple[Template, T]] = {}
        for text, payload in entries:
            template = Template(text)
            if template.skeleton in self._by_skeleton:
                raise ValueError(f"two tensor-name templates share the shape {template.skeleton!r}")
            self._by_skeleton[template.skeleton] = (template, payload)

    def match(self, name: str) -> tuple[T, dict[str, int]] | None:
        """(payload, placeholder values) of the template `name` instantiates, or None."""
        skeleton, indices = skeleton_of(name)
        found = self._by_skeleton.get(skeleton)
        if found is None:
            return None
        template, payload = found
        return payload, dict(zip(template.fields, indices))

    def templates(self) -> list[str]:
        return [template.text for template, _ in self._by_skeleton.values()]
