"""Multi-token prediction's verify step on the emulated devices (device/training/serving.py with
drafts = 1): the token and its draft (2 tokens a sequence, both sampled) after context - 2 cached
tokens, the experts over 4 devices, equal to the serving model's verify step (analytic/mtp.py's
main part): the same compute op by op, the all-to-alls timed by the executor as by the closed form."""

import pytest

from relay import System
from relay.analytic import serving
from relay.device.training.serving import Step
from relay.driver import serving as on_devices
from relay.errors import ConfigError


def test_verify_step_on_devices_equals_the_serving_models(cluster):
    devices = on_devices.run(cluster, Step("moe-debug", 4, 4, 7, 2, 25, drafts=1), shared_run=True)
    model = serving.phase("moe-debug", serving.Layout(4, 1, 4), System("h100", 4), "bf16", 7, 2, 25, overlap=False)
    assert devices.compute_s == pytest.approx(model.compute_s, rel=1e-9)
    assert devices.flops == model.flops
    assert devices.comm_s == pytest.approx(model.a2a_s, rel=0.01)
    assert devices.seconds == pytest.approx(model.seconds, rel=0.001)
    with pytest.raises(ConfigError, match="at most one multi-token prediction draft"):
        on_devices.run(cluster, Step("moe-debug", 4, 4, 7, 3, 25, drafts=2), shared_run=True)
