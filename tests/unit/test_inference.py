"""Prefill and cached decode (workloads/inference.py): the same greedy tokens as the model's own
forward over the whole sequence, for each attention (GQA, MLA's compressed cache) and MoE."""

from dataclasses import replace

import pytest
import torch
from _device import one_thread  # noqa: F401  (tests/unit is on the path)

from relay.workloads import get, inference, moe

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, config=None):
    wl = get(name) if config is None else moe.workload(name, config)
    torch.manual_seed(0)
    return wl.build_model().eval(), wl.config


# moe-gqa: Mixtral's shape in miniature (GQA attention, softmax gate, no shared expert)
MIXTRAL_DEBUG = replace(moe.CONFIGS["moe-debug"], attention="gqa", n_kv_heads=2, gate="softmax", n_shared=0,
                        n_dense_layers=0, route_scale=1.0)


@pytest.mark.parametrize("name,config", [("llama-debug", None), ("moe-debug", None), ("moe-gqa", MIXTRAL_DEBUG)])
def test_cached_decode_equals_the_uncached_reference(name, config):
    model, c = _model(name, config)
    prompt = torch.randint(0, c.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    tokens = inference.generate(model, prompt, 8)
    assert tokens.shape == (2, 8)
    assert torch.equal(tokens, inference.reference(model, prompt, 8))
    # not a constant continuation: the cache is read (a decode ignoring it repeats itself)
    assert len(set(tokens.flatten().tolist())) > 1


def test_mla_caches_the_compressed_latent_and_rotary_key():
    model, c = _model("moe-debug")
    cache = inference.new_cache(model, 2, 16)
    assert all(t.shape == (2, 16, c.kv_lora_rank + c.qk_rope_dim) for t in cache.layers)
    assert inference.cache_bytes_per_token(moe.CONFIGS["deepseek-v3"]) == (512 + 64) * 2
    # GQA: keys and values of the kv heads (llama3-70b: 2 x 8 x 128 elements per token per layer)
    from relay.workloads.llama import CONFIGS
    assert inference.cache_bytes_per_token(CONFIGS["llama3-70b"]) == 2 * 8 * 128 * 2


def test_decode_after_a_prompt_refuses_several_tokens():
    model, c = _model("llama-debug")
    cache = inference.new_cache(model, 1, 16)
    inference.forward(model, torch.zeros(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="one token a step"):
        inference.forward(model, torch.zeros(1, 2, dtype=torch.long), cache)


@pytest.mark.parametrize("name,config", [("llama-debug", None), ("moe-debug", None), ("moe-gqa", MIXTRAL_DEBUG)])
@torch.no_grad()
def test_cached_logits_equal_the_full_forward_at_every_step(name, config):
    """Closer than the tokens: each step's logits equal the last position's of the model's own forward
    over the sequence so far (a cache at the wrong positions or missing a token moves them)."""
    model, c = _model(name, config)
    seq = torch.randint(0, c.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    cache = inference.new_cache(model, 2, 12)
    got = [inference.forward(model, seq[:, :6], cache)] + [inference.forward(model, seq[:, t:t + 1], cache)
                                                             for t in range(6, 12)]
    for t, logits in zip(range(6, 13), got):
        torch.testing.assert_close(logits, model(seq[:, :t])[:, -1], rtol=1e-4, atol=1e-6)
