"""A tiny Llama checkpoint (random weights, local word-level tokenizer) that stock vLLM serves.

The bench watchdog's end-to-end test needs a real `vllm serve` that starts in seconds, decodes
thousands of tokens a second on a CPU (so a row can be frozen mid-decode) and needs no
download. vLLM's CPU build serves
`LlamaForCausalLM` natively, so a 2-layer, 64-wide Llama with a word-level tokenizer is
the cheapest real model it accepts. The tokenizer maps `w0 w1 ...` one word to one token, so
`vllm bench serve --dataset-name random` gets exactly the input lengths it asks for (its
decode/re-encode round trip is lossless; vllm/benchmarks/datasets/datasets.py,
gen_prompt_decode_to_target_len).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def _tokenizer_json(vocab_size: int) -> dict:
    """tokenizers' JSON for a WordLevel model split on whitespace: token id i <-> "w{i}"."""
    words = len(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(words, vocab_size)})
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return json.loads(tok.to_str())


def write_tiny_llama(
    dst: Path,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,  # head_dim 32: the smallest vLLM's CPU attention supports
    num_kv_heads: int = 1,  # (cpu_attn.py, CPUAttentionBackend.get_supported_head_sizes)
    max_position_embeddings: int = 4096,
    seed: int = 0,
) -> Path:
    """Write config.json, model.safetensors and a tokenizer to `dst`; return `dst`."""
    import torch
    from safetensors.torch import save_file

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)} special tokens")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    head_dim = hidden_size // num_heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    # Tensor names and shapes of transformers' LlamaForCausalLM, which vLLM's llama.py loads.
    tensors = {"model.embed_tokens.weight": rand(vocab_size, hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(num_heads * head_dim, hidden_size),
            p + "self_attn.k_proj.weight": rand(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.v_proj.weight": rand(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.o_proj.weight": rand(hidden_size, num_heads * head_dim),
            p + "mlp.gate_proj.weight": rand(intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": rand(intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": rand(hidden_size, intermediate_size),
            p + "input_layernorm.weight": ones(hidden_size),
            p + "post_attention_layernorm.weight": ones(hidden_size),
        }
    tensors["model.norm.weight"] = ones(hidden_size)
    tensors["lm_head.weight"] = rand(vocab_size, hidden_size)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})

    bos, eos = SPECIAL_TOKENS.index("<s>"), SPECIAL_TOKENS.index("</s>")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "tokenizer.json").write_text(json.dumps(_tokenizer_json(vocab_size)) + "\n")
    (dst / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": "<unk>",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "model_max_length": max_position_embeddings,
                "add_bos_token": False,
                "add_eos_token": False,
            },
            indent=2,
        )
        + "\n"
    )
    return dst
