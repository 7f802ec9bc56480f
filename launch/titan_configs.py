"""torchtitan configurations for published torchtitan runs that torchtitan 0.3.0's own registry
cannot express from its command line: `relay launch ... -m torchtitan.train --module
relay.launch.titan_configs --config NAME` (torchtitan's ConfigManager takes a fully qualified
module as --module, and its function NAME as --config, as it takes its own config_registry's).

torchtitan 0.3.0 sets a model's converters (float8 training among them) in its model spec, which a
config_registry function builds and its command line does not reach; its registry ships float8
for the debug model (`llama3_debugmodel_float8`) and 405B, MXFP8 for 8B (`llama3_8b_mxfp8`), and
no float8 8B. The functions here are torchtitan's own config function with torchtitan's own
converter, written exactly as its registry writes `llama3_debugmodel_float8` and `llama3_405b`: no
torchtitan or torchao code is changed, patched or wrapped. Each names the published run it stands
for and what differs (launch/validate_programs.py prints that beside the figure).
"""

from __future__ import annotations


def llama3_8b_float8():
    """torchtitan's `llama3_8b` with its float8 converter (torchao's Float8Linear), the output
    projection kept in BF16, as the trainy H200 runs (training.toml's trainy-h200x* rows):
    `--model.converters="float8"` on train_configs/llama3_8b.toml at torchtitan e7c0cae, whose
    [float8] table has filter_fqns = ["output"] (0.3.0 names that layer `lm_head`, as its 405B float8
    config filters it). The recipe is 0.3.0's default, "rowwise"; the published run used the
    tensorwise recipe of its day with FSDP float8 all-gather, which 0.3.0's converter no longer
    offers (its recipe_name is "rowwise" or "rowwise_with_gw_hp"). Also the asyncTP page's float8
    rowwise 8B run (training.toml's torchtitan-h100x64-llama3-8b-tp8-fp8-rowwise), that recipe."""
    from torchtitan.components.quantization import Float8LinearConverter
    from torchtitan.models.llama3 import model_registry
    from torchtitan.models.llama3.config_registry import llama3_8b

    return _float8(llama3_8b(), "8B", model_registry, Float8LinearConverter)


def llama3_70b_float8():
    """torchtitan's `llama3_70b` with its float8 converter as `llama3_8b_float8`: the asyncTP page's
    float8 rowwise run (`--model.converters="float8" --float8.recipe_name="rowwise"` on
    train_configs/llama3_70b.toml; training.toml's torchtitan-h100x256-llama3-70b-tp8-fp8-rowwise)."""
    from torchtitan.components.quantization import Float8LinearConverter
    from torchtitan.models.llama3 import model_registry
    from torchtitan.models.llama3.config_registry import llama3_70b

    return _float8(llama3_70b(), "70B", model_registry, Float8LinearConverter)


def _float8(config, flavor, model_registry, converter):
    """`config` with its model spec rebuilt with torchtitan's float8 converter, as its registry's
    float8 configs build it (the output layer, `lm_head`, kept in BF16)."""
    compiled = config.compile.enable and "model" in config.compile.components
    config.model_spec = model_registry(
        flavor, converters=[converter.Config(filter_fqns=["lm_head"], model_compile_enabled=compiled)])
    return config
