"""The plugin's own tests, written with adapters' conformance kit."""
import pytest
from adapters_ia3 import IA3

import adapters
import adapters.testing


@pytest.mark.parametrize("task, quantization", adapters.testing.cases(IA3()))
def test_ia3_conforms(task, quantization):
    # An IA3 object that is not registered is registered for the run, and unregistered after it.
    adapters.testing.assert_conforms(IA3(), tasks=[task], quantizations=[quantization])


def test_a_misspelled_target_is_a_user_error():
    base = adapters.load_base_model("random:tiny")
    strategy = IA3()
    with pytest.raises(adapters.AdaptersError, match="q_prj"):
        strategy.apply(base.model, strategy.config_class(target_modules="q_prj"))
