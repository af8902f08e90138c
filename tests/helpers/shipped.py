"""Local stand-ins for the inputs some shipped configs name (an HF model directory, a prepared corpus and its
tokenizer), so the shipped-config tests validate every config on any machine: name -> overrides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
                "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
                "rope_theta": 1e6, "max_position_embeddings": 32768, "sliding_window": None, "hidden_act": "silu",
                "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
"""Mixtral-8x7B-v0.1's published config.json (the architecture keys), no weights."""


def shipped_inputs(base: Path) -> dict[str, list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from moetrain.launch.indexed import IndexedWriter

    mixtral = base / "Mixtral-8x7B-v0.1"
    mixtral.mkdir(parents=True, exist_ok=True)
    (mixtral / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(500)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (base / "tokenizer").mkdir(exist_ok=True)
    tok.save(str(base / "tokenizer" / "tokenizer.json"))
    writer = IndexedWriter(base / "corpus", np.uint16)
    for i in range(40):
        writer.add(np.arange(i, i + 200) % 500)
    writer.finish()
    return {"mixtral_finetune_2x8_h100.yaml": [f"model.hf_config={mixtral}"],
            "qwen3_moe_tiny_cpu.yaml": [f"data.path={base / 'corpus'}", f"data.tokenizer={base / 'tokenizer'}"]}
