"""Tiny random Hugging Face models of each family, and their logits in true float64 (offline, for tests).

transformers computes RMSNorm, the router softmax and RoPE's frequencies in float32 even for a float64
model (a bf16 safeguard), which caps agreement at ~1e-7. :func:`float64_reference` removes those
down-casts for the duration of a call, so the HF model is a float64 reference that moetrain's float64
model must match to ~1e-12.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)

FAMILIES = ("llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
MOE_FAMILIES = FAMILIES[1:]


def hf_config(family: str, rope: dict | None = None):
    """A tiny config of ``family``; ``rope``: rope_parameters beyond the theta (e.g. llama3 / yarn scaling)."""
    cfg = _hf_config(family)
    if rope:
        cfg.rope_parameters = {"rope_theta": cfg.rope_parameters["rope_theta"], **rope}
    return cfg


def _hf_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(intermediate_size=48, **COMMON)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=40,
                                 num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, **COMMON)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                 head_dim=16, norm_topk_prob=True, **COMMON)
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=16, num_experts=4, num_experts_per_tok=2, clip_qkv=2.5,
                              norm_topk_prob=False, pad_token_id=None, eos_token_id=2, **COMMON)
    if family == "deepseek_v3":
        common = {**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}
        return tf.DeepseekV3Config(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                   num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
                                   first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                   q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                   v_head_dim=6, rope_interleave=True, **common)
    raise ValueError(family)


def make_hf_model(family: str, out: Path, seed: int = 0, rope: dict | None = None) -> Path:
    """A tiny random ``family`` model saved (float32 safetensors) in ``out``; weights scaled so routing and
    attention are far from uniform."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, rope)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(fan_in)))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's aux-loss-free bias: make it matter
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    model.save_pretrained(out)
    return out


@contextlib.contextmanager
def float64_reference():
    """Within: float64 tensors are never cast down to float32 by ``.to``, ``.float()`` or ``softmax(dtype=)``."""
    import torch.nn.functional as F

    to, flt, typ, softmax = torch.Tensor.to, torch.Tensor.float, torch.Tensor.type, F.softmax

    def keep64(dtype):
        return dtype is torch.float32

    def to64(self, *args, **kwargs):
        if self.dtype is torch.float64:
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
            args = tuple(torch.float64 if keep64(a) else a for a in args)
        return to(self, *args, **kwargs)

    def float64(self, *args, **kwargs):
        return self if self.dtype is torch.float64 else flt(self, *args, **kwargs)

    def type64(self, *args, **kwargs):
        if self.dtype is torch.float64 and args and args[0] is torch.float32:
            return self
        return typ(self, *args, **kwargs)

    def softmax64(input, *args, **kwargs):
        if input.dtype is torch.float64 and kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        return softmax(input, *args, **kwargs)

    torch.Tensor.to, torch.Tensor.float, torch.Tensor.type, F.softmax = to64, float64, type64, softmax64
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.float, torch.Tensor.type, F.softmax = to, flt, typ, softmax


def load_float64(path: Path):
    """The HF model at ``path`` in float64, RoPE frequencies recomputed in float64."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa",
                                                 experts_implementation="eager")
    model.to(torch.float64)  # also what transformers keeps in float32 (DeepSeek's router) ...
    from safetensors.torch import load_file

    own = model.state_dict()
    with torch.no_grad():  # ... which it rounded to float32 on the way in: take the file's values again
        for f in Path(path).glob("*.safetensors"):
            for name, t in load_file(str(f)).items():
                if name in own and own[name].shape == t.shape:
                    own[name].copy_(t.to(torch.float64))
    model.eval()
    kind = model.config.rope_parameters.get("rope_type", "default")
    for mod in model.modules():
        if hasattr(mod, "inv_freq"):
            dim = mod.inv_freq.numel() * 2
            theta = model.config.rope_parameters["rope_theta"]
            if kind == "default":
                inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            else:  # transformers' own scaling code, run in float64 throughout
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                with _all_float64():
                    inv, mod.attention_scaling = ROPE_INIT_FUNCTIONS[kind](model.config, None)
            mod.inv_freq = inv.to(torch.float64)
            if hasattr(mod, "original_inv_freq"):
                mod.original_inv_freq = mod.inv_freq
    return model


@contextlib.contextmanager
def _all_float64():
    """Within: float32 asked of ``.to``, ``.float()`` or ``torch.arange`` is float64 instead."""
    to, flt, arange = torch.Tensor.to, torch.Tensor.float, torch.arange

    def to64(self, *args, **kwargs):
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        return to(self, *(torch.float64 if a is torch.float32 else a for a in args), **kwargs)

    def arange64(*args, **kwargs):
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        return arange(*args, **kwargs)

    torch.Tensor.to, torch.Tensor.float, torch.arange = to64, lambda self: to(self, torch.float64), arange64
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.float, torch.arange = to, flt, arange


def hf_logits(path: Path, ids_BS: torch.Tensor) -> torch.Tensor:
    model = load_float64(path)
    with torch.no_grad(), float64_reference():
        return model(input_ids=ids_BS).logits


def sample_ids(batch: int, seq: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
