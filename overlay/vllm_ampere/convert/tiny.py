"""`vllm-ampere make-tiny DST`: a tiny DeepSeek-V4-Flash checkpoint in the real native format.

Same tensor names, dtypes and per-layer structure as the published checkpoint (see layout.py):
F8_E4M3 weights with F8_E8M0 128x128 block scales, MXFP4 experts (packed I8 + F8_E8M0 per 32),
BF16/F32/I64 for the rest; layers with compress ratio 0, 4 (compressor + indexer) and 128,
hash-routed first layers, one MTP layer; several shards with an index; a 512-token byte-level
BPE tokenizer. Weights are N(0, 0.02) before quantization and norms are 1, so a forward pass
stays finite. `--dtype bf16` writes the same model dequantized to BF16 (no quantization_config):
the twin that converted checkpoints are compared against. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from .codecs import (E2M1_VALUES, FP8_BLOCK, MXFP4_GROUP, block_amax, decode_fp8_blocks, decode_mxfp4, expand_blocks,
                     pack_nibbles)
from .layout import NativeTensor, native_tensors
from .safetensors_io import ShardWriter, dtype_code, write_file_atomic
from .source import INDEX

HELP = "write a tiny native DeepSeek-V4-Flash checkpoint (tests, demo)"
INIT_STD = 0.02
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def tiny_config() -> dict:
    """config.json of the tiny model: the real keys, small dims (hidden 256, 4 layers + MTP)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_nextn_predict_layers": 1,
        "compress_ratios": [0, 4, 128, 0, 0],  # one per layer, then the MTP layer's
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 512,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 256,
        "o_lora_rank": 128,
        "o_groups": 4,
        "index_n_heads": 8,
        "index_head_dim": 128,
        "index_topk": 512,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 256,
        "num_hash_layers": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "swiglu_limit": 10.0,
        "hidden_act": "silu",
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-06,
        "rms_norm_eps": 1e-06,
        "sliding_window": 128,
        "max_position_embeddings": 4096,
        "rope_theta": 10000,
        "compress_rope_theta": 160000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 4, "original_max_position_embeddings": 1024, "type": "yarn"},
        "initializer_range": INIT_STD,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 512,
        "expert_dtype": "fp4",
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        },
    }


def shard_of(name: str, cfg: dict) -> int:
    """Embedding with layer 0, one shard per layer, the head with the last layer, MTP alone."""
    if name.startswith("mtp."):
        return cfg["num_hidden_layers"]
    if name.startswith("layers."):
        return int(name.split(".")[1])
    return 0 if name.startswith("embed") else cfg["num_hidden_layers"] - 1


def make_tiny(dst: str | Path, seed: int = 0, dtype: str = "native") -> Path:
    """Write the tiny checkpoint into `dst` (created; must be empty or absent); returns dst."""
    if dtype not in ("native", "bf16"):
        raise ValueError(f"dtype must be 'native' or 'bf16', got {dtype!r}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty")
    cfg = tiny_config()
    layout = native_tensors(cfg)
    tensors = _generate(layout, cfg, seed)
    if dtype == "bf16":
        tensors = _dequantize(tensors, layout)
        cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "expert_dtype")}
    n_shards = cfg["num_hidden_layers"] + 1
    files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {name: files[shard_of(name, cfg)] for name in sorted(tensors)}
    for i, file in enumerate(files):
        names = [n for n, f in weight_map.items() if f == file]
        writer = ShardWriter(dst / file, {n: (dtype_code(tensors[n].dtype), tuple(tensors[n].shape)) for n in names})
        for n in writer.order:
            writer.write(n, tensors[n])
        writer.finish()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_file_atomic(dst / INDEX, (json.dumps(index, indent=2) + "\n").encode())
    _write_tokenizer(dst, cfg, seed)
    write_file_atomic(dst / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
    return dst


def _generate(layout: dict[str, NativeTensor], cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(layout):
        t = layout[name]
        if t.kind == "fp8":
            out[name], out[t.scale_name] = _fp8_blocks(_normal(t.shape, gen))
        elif t.kind == "expert":
            n, half_k = t.shape
            out[name], out[t.scale_name] = _mxfp4(_normal((n, half_k * 2), gen))
        elif t.kind == "keep":
            out[name] = keep_tensor(name, t, cfg, gen)
    return out


def _normal(shape, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * INIT_STD


def keep_tensor(name: str, t: NativeTensor, cfg: dict, gen) -> torch.Tensor:
    """An unquantized tensor: norms and hc scales 1, biases and sinks 0, the hash table distinct
    experts per token id, everything else N(0, INIT_STD)."""
    dtype = {"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}[t.dtypes[0]]
    leaf = name.rsplit(".", 2)
    if name.endswith("norm.weight"):
        return torch.ones(t.shape, dtype=dtype)
    if name.endswith("tid2eid"):  # distinct experts per token id
        return torch.rand((t.shape[0], cfg["n_routed_experts"]), generator=gen).argsort(dim=1)[:, : t.shape[1]].to(dtype)
    if name.endswith(("gate.bias", "attn_sink", "_base")):
        return torch.zeros(t.shape, dtype=dtype)
    if name.endswith("_scale") and "hc_" in leaf[-1]:
        return torch.ones(t.shape, dtype=dtype)
    return _normal(t.shape, gen).to(dtype)


def _fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N, K] -> (F8_E4M3 [N, K], e8m0 [ceil(N/128), ceil(K/128)]): power-of-two block scales."""
    amax = block_amax(w).clamp_min(2.0**-100)
    exp = torch.ceil(torch.log2(amax / 448.0))
    full = expand_blocks(torch.pow(2.0, exp), *w.shape)
    return (w / full).to(torch.float8_e4m3fn), (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N, K] -> (I8 [N, K/2] packed e2m1, e8m0 [N, K/32]): nearest code per element."""
    groups = w.unflatten(-1, (-1, MXFP4_GROUP))
    amax = groups.abs().amax(dim=-1).clamp_min(2.0**-100)
    exp = torch.ceil(torch.log2(amax / 6.0))
    scaled = groups / torch.pow(2.0, exp).unsqueeze(-1)
    table = torch.tensor(E2M1_VALUES)
    codes = (scaled.unsqueeze(-1) - table).abs().argmin(dim=-1).to(torch.uint8).flatten(-2)
    return pack_nibbles(codes).view(torch.int8), (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _dequantize(tensors: dict[str, torch.Tensor], layout: dict[str, NativeTensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        kind = layout[name].kind
        if kind == "fp8":
            scale = tensors[layout[name].scale_name].view(torch.uint8)
            out[name] = decode_fp8_blocks(t, scale).to(torch.bfloat16)  # exact: 3-bit mantissas
        elif kind == "expert":
            scale = tensors[layout[name].scale_name].view(torch.uint8)
            out[name] = decode_mxfp4(t.view(torch.uint8), scale).to(torch.bfloat16)  # exact
        elif kind == "keep":
            out[name] = t
    return out


def _write_tokenizer(dst: Path, cfg: dict, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg["vocab_size"],
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 0), (EOS, 1)]
    )
    (dst / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n")
    tok_cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": cfg["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
        ),
    }
    write_file_atomic(dst / "tokenizer_config.json", (json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n").encode())
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}
    write_file_atomic(dst / "generation_config.json", (json.dumps(gen_cfg, indent=2) + "\n").encode())


def _corpus(seed: int) -> list[str]:
    """Sentences of made-up syllable words: enough distinct pairs to learn every merge."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    words += "the model serves tokens on Ampere GPUs, 12345 code() {json: true}.".split()
    return [" ".join(rng.choice(words) for _ in range(24)) for _ in range(2000)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dst", help="output directory (created; must be empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--dtype", choices=("native", "bf16"), default="native", help="native FP8/MXFP4, or its BF16 twin")


def run(args) -> int:
    path = make_tiny(args.dst, seed=args.seed, dtype=args.dtype)
    print(f"wrote tiny DeepSeek-V4-Flash ({args.dtype}, seed {args.seed}) to {path}")
    return 0
