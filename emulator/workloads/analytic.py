"""Published closed forms for the named language models, against which the counted figures
(fake-tensor runs, emulator/device/fake/measure.py) are checked.

FLOPs of one forward and backward pass over T tokens of sequence length s:
    6 N T + 12 L s d_att T
N: the parameters a token's matmuls use (the *active* ones for a mixture of experts: shared and
top-k experts, not all), less the input embedding (a lookup, no FLOPs) and norm weights
(elementwise). The attention term is the model's: QK^T and AV forward (2 x 2 s d_att per
token), backward 4 such products: 12 s d_att per token and layer, with d_att = heads x head
size (the textbook figure). A fused kernel's backward also recomputes QK^T; the cost model
charges that as time, not as model FLOPs (kernels/cost.py). It counts the full s x s square:
causal masking is not discounted (the kernels skip about half of it).

Activation memory per layer, 16-bit activations, no recompute: Korthikanti et al. 2022
(arXiv 2205.05198), sbh(34 + 5as/h) for GPT, adapted term by term (see llama_activations).
"""

from __future__ import annotations


def llama_flops(c, tokens: int) -> float:
    """6 N T + 12 L s d T for a LlamaConfig (N: matmul parameters)."""
    hd = c.dim // c.n_heads
    attn = c.dim * hd * (2 * c.n_heads + 2 * c.n_kv_heads)  # wq, wo, wk, wv
    ffn = 3 * c.dim * c.ffn_dim
    n = c.n_layers * (attn + ffn) + c.dim * c.vocab_size  # + the output head
    return 6 * n * tokens + 12 * c.n_layers * c.seq_len * c.dim * tokens


def moe_flops(c, tokens: int) -> float:
    """6 N_active T + attention, for a MoEConfig. MLA's attention runs at head size
    qk_nope + qk_rope for q, k and the zero-padded v (see moe.MLA)."""
    if c.attention == "mla":
        qk = c.qk_nope_dim + c.qk_rope_dim
        attn = (c.dim * c.q_lora_rank + c.q_lora_rank * c.n_heads * qk + c.dim * (c.kv_lora_rank + c.qk_rope_dim)
                + c.kv_lora_rank * c.n_heads * (c.qk_nope_dim + c.v_head_dim) + c.n_heads * c.v_head_dim * c.dim)
        d_att = c.n_heads * qk
    else:
        hd = c.dim // c.n_heads
        attn, d_att = c.dim * hd * (2 * c.n_heads + 2 * c.n_kv_heads), c.dim
    moe_ffn = c.dim * c.n_experts + 3 * c.dim * c.expert_dim * (c.top_k + c.n_shared)  # router + active experts
    n_moe = c.n_layers - c.n_dense_layers
    n = (c.n_layers * attn + c.n_dense_layers * 3 * c.dim * c.ffn_dim + n_moe * moe_ffn
         + c.dim * c.vocab_size)
    return 6 * n * tokens + 12 * c.n_layers * c.seq_len * d_att * tokens


def attention_flops(c, tokens: int) -> float:
    """The attention term of llama_flops / moe_flops: 12 L s d_att T, the full s x s square."""
    d_att = c.n_heads * (c.qk_nope_dim + c.qk_rope_dim) if getattr(c, "attention", None) == "mla" else c.dim
    return 12 * c.n_layers * c.seq_len * d_att * tokens


def model_flops(c, tokens: int) -> float:
    """A model's FLOPs over `tokens` tokens (moe_flops for an MoE config, else llama_flops)."""
    return (moe_flops if hasattr(c, "n_experts") else llama_flops)(c, tokens)


def causal_share(c) -> float:
    """Model FLOPs with the causal convention over those without: the attention term halved (a
    causal mask skips about half the square), as Megatron-LM's and torchtitan's MFUs count it.
    MFU x causal_share is the MFU in that convention."""
    full = model_flops(c, 1)
    return (full - attention_flops(c, 1) / 2) / full


def llama_activations(c, batch: int, tp: int = 1) -> float:
    """Bytes one Llama block saves for backward, Korthikanti et al.'s sbh(34 + 5as/h) adapted:

    attention   11sbh + 5as^2b -> sbh(6 + 4g/a) + 2sba: the QKV input (2sbh), Q (2sbh), K and V
                with g of the a heads (2sbh g/a each); fused attention saves its output (2sbh,
                also the output projection's input) and a log-sum-exp (2sba) instead of the
                s x s softmax and dropout terms; no dropout mask.
    MLP         19sbh -> 2sbh + 8sbf: SwiGLU of width f saves its input, the gate and up
                projections, the SiLU output and the product (2sbf each); no dropout.
    norms       4sbh -> 8sbh + 4sb: PyTorch's RMSNorm saves its input, its normalised output
                before the weight (2sbh each) and 1/rms (2sb); LayerNorm in the paper saves
                its input only.

    With tensor parallelism t (Korthikanti's sbh(10 + 24/t + 5as/(ht)), no sequence parallel):
    what the split layers produce divides by t (Q, K, V, the attention output and log-sum-exp,
    the SwiGLU's 8sbf), what enters them stays whole (the QKV and MLP inputs, the norms):
    sbh(12 + (4 + 4g/a)/t) + 8sbf/t + 2sba/t + 4sb.
    """
    s, b, h, a, g, f = c.seq_len, batch, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim
    return s * b * h * (12 + (4 + 4 * g / a) / tp) + 8 * s * b * f / tp + 2 * s * b * a / tp + 4 * s * b


def moe_gqa_activations(c, batch: int) -> float:
    """Bytes one mixture-of-experts block with GQA attention (Mixtral) saves: the Llama block's
    attention, norms and feed-forward input (the router's), and instead of the rest of the MLP,
    as the fused expert path saves them (kernels/moe_ops.py): the tokens grouped per expert (the
    gate and up grouped GEMMs' input), the SwiGLU's gate and up outputs and its product (the
    down GEMM's input), each of width f_e per routed copy, and the experts' outputs (the
    unpermute's, for its probabilities' gradient): 4ksbh + 6ksbf_e, plus the routing
    bookkeeping (top-k indices, gate weights, the grouping order: 2sbk + 18sbk bytes)."""
    s, b, h, a, g, k = c.seq_len, batch, c.dim, c.n_heads, c.n_kv_heads, c.top_k
    return (s * b * h * (16 + 4 * g / a) + 2 * s * b * a + 4 * s * b
            + 4 * k * s * b * h + 6 * k * s * b * c.expert_dim + 20 * s * b * k)
