import os
import sys

import pytest

from megatron_v4.runtime.quiet import quiet_known_warnings

# Megatron-Core announces its missing optional packages when first imported: import it here, under the
# same filters, rather than while pytest collects the first test module.
quiet_known_warnings()
import megatron.core.models.gpt.gpt_layer_specs  # noqa: E402,F401
import megatron.core.optimizer  # noqa: E402,F401
import megatron_v4.model  # noqa: E402,F401

# The rank functions live next to the tests; spawned ranks import them by module name.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The library messages the tools hide as harmless (megatron_v4/runtime/quiet.py) stay out of the
    warnings summary too: pytest gives every test fresh filters, and this runs inside them before the
    test's fixtures are set up. Anything else still shows."""
    quiet_known_warnings()
