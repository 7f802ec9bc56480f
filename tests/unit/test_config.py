"""TrainConfig: one declaration of every training option, checked before any device starts."""

import pytest

from relay import TrainConfig
from relay.launch.cli import build_parser


@pytest.mark.parametrize("options,match", [
    (dict(steps=0), r"steps = 0 is invalid; give an integer >= 1"),
    (dict(per_device_batch=2.5), r"per_device_batch = 2.5 is invalid"),
    (dict(per_device_batch=4, global_batch=16), r"give one \(weak or strong scaling\), not both"),
    (dict(algorithm="rings"), r"algorithm = 'rings' is unknown"),
    (dict(lr=-1), r"lr = -1 is invalid; give a learning rate > 0"),
    (dict(optimizer="adam"), r"optimizer = 'adam' is unknown; choose 'adamw' or 'sgd'"),
    (dict(bucket_mb=0), r"bucket_mb = 0 is invalid; give MB > 0"),
    (dict(overlap="yes"), r"overlap = 'yes' is invalid"),
    (dict(workload="gpt-huge"), r"neither a built-in"),
])
def test_bad_options_name_the_field_the_value_and_the_fix(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"workload": "mlp", **options})


def test_options_are_keyword_only_and_the_config_is_frozen():
    with pytest.raises(TypeError):
        TrainConfig("mlp")
    c = TrainConfig(workload="mlp")
    with pytest.raises(AttributeError):
        c.steps = 3


def test_batch_for_weak_and_strong_scaling():
    assert TrainConfig(workload="mlp").batch_for(4) == TrainConfig.DEFAULT_PER_DEVICE_BATCH
    assert TrainConfig(workload="mlp", per_device_batch=3).batch_for(4) == 3
    assert TrainConfig(workload="mlp", global_batch=32).batch_for(4) == 8
    with pytest.raises(ValueError, match="does not divide over 3 devices"):
        TrainConfig(workload="mlp", global_batch=32).batch_for(3)


def test_the_cli_takes_its_training_options_and_their_help_from_the_config():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in ("run", "sweep", "breakeven"):
        actions = {a.dest: a for a in sub.choices[command]._actions}
        for f in TrainConfig.options():
            if f.name == "algorithm":
                continue  # each command names it its own way (--algorithm, --algorithms)
            assert f.name in actions, f"relay {command} lacks --{f.name}"
            assert f.metadata["doc"] in actions[f.name].help
            assert actions[f.name].default is None  # unset: the config's default applies


def test_from_options_ignores_unset_and_foreign_keys():
    c = TrainConfig.from_options({"workload": "mlp", "steps": None, "clock": "wall", "seed": 5})
    assert c.steps == TrainConfig(workload="mlp").steps and c.seed == 5
    assert c.as_dict()["workload"] == "mlp"
