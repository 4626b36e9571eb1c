import os
import sys

import pytest

from megatron_v4.runtime.quiet import quiet_known_warnings

# Megatron-Core announces its missing optional packages when first imported: import it here, under the
# same filters, rather than while pytest collects the first test module.
quiet_known_warnings()
import megatron.core.models.gpt.gpt_layer_specs  # noqa: E402,F401
import megatron.core.optimizer  # noqa: E402,F401
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler  # noqa: E402

import megatron_v4.model  # noqa: E402,F401
from megatron_v4.indexer_loss import IndexerLossAutoScaler  # noqa: E402

# The rank functions live next to the tests; spawned ranks import them by module name.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The library messages the tools hide as harmless (megatron_v4/runtime/quiet.py) stay out of the
    warnings summary too: pytest gives every test fresh filters, and this runs inside them before the
    test's fixtures are set up. Anything else still shows."""
    quiet_known_warnings()


SCALERS = (MoEAuxLossAutoScaler, MTPLossAutoScaler, IndexerLossAutoScaler)
FRESH_SCALES = {scaler: scaler.main_loss_backward_scale for scaler in SCALERS}


@pytest.fixture(autouse=True)
def fresh_loss_scales():
    """Megatron-Core keeps each auxiliary-loss scaler's backward scale in a class attribute, set once and
    then updated in place: a plain `loss.backward()` can leave a 0-d tensor there, which a later schedule's
    1-element scale cannot be copied into. Every test starts with the scales a fresh process has."""
    for scaler, scale in FRESH_SCALES.items():
        scaler.main_loss_backward_scale = None if scale is None else scale.clone()
