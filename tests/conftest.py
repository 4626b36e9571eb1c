import os
import sys

import pytest

from megatron_v4.runtime.quiet import quiet_known_warnings

# Megatron-Core announces its missing optional packages when first imported: import it here, under the
# same filters, rather than while pytest collects the first test module.
quiet_known_warnings()
import megatron.core.optimizer  # noqa: E402,F401
import megatron_v4.model  # noqa: E402,F401

# The rank functions live next to the tests; spawned ranks import them by module name.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _quiet_known_library_warnings():
    """The library messages the tools hide as harmless (megatron_v4/runtime/quiet.py) stay out of the
    warnings summary too (pytest restores its own filters for every test); anything else shows."""
    quiet_known_warnings()
