"""./run_export.sh --format gguf: the merged weights as one GGUF file in llama.cpp's `llama` layout (tensor names,
metadata keys, q/k rows in its rotary order), its tokenizer, and an Ollama Modelfile that asks qloraner's prompt.

It streams as the hf export does: every tensor's name, shape and type is known from the base's safetensors headers,
so the GGUF header and tensor index are written first and each merged tensor is encoded and appended as it comes.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qloraner import QloranerError

GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
OLLAMA_CTX = 2048  # Ollama's num_ctx: prompts are at most 1024 tokens (evaluate's cut), answers far shorter
# files of the base that make up its Hugging Face tokenizer (copied beside the GGUF for qloraner's own loading)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
TOKENIZER_FILES += ("added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
_GLOBAL = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_SKIPPED = re.compile(r".*\.rotary_emb\.inv_freq")  # older checkpoints store RoPE's constants; llama.cpp makes its own


def gguf_name(name: str) -> str | None:
    """llama.cpp's name for a Hugging Face LLaMA tensor (model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight);
    None for one it does not store."""
    if _SKIPPED.fullmatch(name):
        return None
    if name in _GLOBAL:
        return f"{_GLOBAL[name]}.weight"
    match = _LAYER_NAME.fullmatch(name)
    if match is None or match[2] not in _LAYER:
        raise QloranerError(f"{name}: a tensor the llama GGUF layout has no place for; export it with --format hf")
    return f"blk.{match[1]}.{_LAYER[match[2]]}.weight"


def permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """q_proj/k_proj rows from Hugging Face's rotary order (halves) into llama.cpp's (interleaved pairs), as
    llama.cpp's convert_hf_to_gguf.py LlamaModel.permute; n_head is the key/value head count for k_proj."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _qtypes() -> dict[str, int]:
    import gguf

    Q = gguf.GGMLQuantizationType
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


def _file_types() -> dict[str, int]:
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}


def _encoders() -> dict[int, Callable[[torch.Tensor], np.ndarray]]:
    """Per GGML type, an f32 tensor's bytes in it (bf16 as torch rounds it, so it equals the hf bf16 export)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    return {
        Q.F32: lambda t: t.float().numpy().view(np.uint8),
        Q.F16: lambda t: t.half().numpy().view(np.uint8),
        Q.BF16: lambda t: t.bfloat16().view(torch.int16).numpy().view(np.uint8),
        Q.Q8_0: lambda t: gguf.quants.quantize(t.float().numpy(), Q.Q8_0),
    }


def tensor_type(shape: tuple[int, ...], dtype: str) -> int:
    """The GGML type a tensor is stored in: norms (1-D) in f32 as llama.cpp keeps them; a matrix in `dtype`, or f16
    where q8_0's blocks of 32 do not divide its rows (llama.cpp's converter falls back the same way)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    qtype = _qtypes()[dtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


@dataclass(frozen=True)
class Planned:
    """One tensor of the GGUF, known before its data is read."""

    hf_name: str
    """its name in the base checkpoint (the order merged_tensors yields it in)"""
    name: str
    """its GGUF name"""
    shape: tuple[int, ...]
    """its shape (Hugging Face order: rows first)"""
    qtype: int
    """its GGML type"""


def tensor_plan(base: Path, dtype: str) -> list[Planned]:
    """Every stored tensor, in the base's file order, from the safetensors headers alone (no data read)."""
    from safetensors import safe_open

    plan = []
    for path in sorted(base.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                if (target := gguf_name(name)) is not None:
                    plan.append(Planned(name, target, shape, tensor_type(shape, dtype)))
    return plan


def llama_metadata(writer, config: dict) -> tuple[int, int]:
    """llama.* keys from the base's config.json; (heads, key/value heads) for the q/k permutation. Refuses what
    the llama layout cannot say (another architecture, biases, scaled RoPE) on one line."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    problems = {
        f"model_type {config.get('model_type')!r} (only llama)": config.get("model_type") != "llama",
        "attention or MLP biases": bool(config.get("attention_bias") or config.get("mlp_bias")),
        f"RoPE scaling {rope.get('rope_type')!r}": rope.get("rope_type", "default") != "default",
    }
    if found := [what for what, bad in problems.items() if bad]:
        raise QloranerError(f"the base's config.json: {', '.join(found)}; gguf export needs a plain LLaMA")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    if head_dim * heads != config["hidden_size"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    return heads, kv_heads


# --- tokenizer -------------------------------------------------------------------------------------------------


def _pre_signature(pre: dict | None) -> tuple:
    """A pre-tokenizer as the steps that decide where words split (Sequence flattened)."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    keys = {"ByteLevel": ("use_regex", "add_prefix_space"), "Digits": ("individual_digits",)}
    return tuple((s.get("type"), *(s.get(k) for k in keys.get(s.get("type"), ()))) for s in steps if s)


# llama.cpp's pre-tokenizer (tokenizer.ggml.pre) that splits text as each Hugging Face pre-tokenizer does
BPE_PRE = {
    (("ByteLevel", True, False),): "gpt2",
    (("Digits", True), ("ByteLevel", True, False)): "smollm",
}


def _tokenizer_json(base: Path) -> dict:
    try:
        return json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise QloranerError(f"{base / 'tokenizer.json'}: cannot read it ({err}); gguf export needs it") from None


def bpe_pre(base: Path) -> str:
    """tokenizer.ggml.pre for the base's byte-level BPE tokenizer, or one line saying it is not supported yet."""
    tokenizer = _tokenizer_json(base)
    signature = _pre_signature(tokenizer.get("pre_tokenizer"))
    if tokenizer.get("model", {}).get("type") != "BPE" or signature not in BPE_PRE:
        kind = f"{tokenizer.get('model', {}).get('type')} with pre-tokenizer {signature}"
        raise QloranerError(f"{base}: gguf export of this tokenizer ({kind}) is not supported yet; use --format hf")
    return BPE_PRE[signature]


def _add_special(writer, base: Path, n_vocab: int, merges: bool) -> None:
    """bos/eos/unk/pad ids, merges and chat template (gguf's SpecialVocab), and whether a prompt starts with BOS
    or ends with EOS as the Hugging Face tokenizer encodes it (qloraner's prompts are tokenized that way)."""
    import gguf
    from transformers import AutoTokenizer

    special = gguf.SpecialVocab(base, load_merges=merges, n_vocab=n_vocab)
    tokenizer = AutoTokenizer.from_pretrained(base, clean_up_tokenization_spaces=False)
    ids = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    special.add_special_token["bos"] = len(ids) > len(bare) and ids[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = len(ids) > len(bare) and ids[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)


def bpe_vocab(writer, base: Path, n_vocab: int) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's gpt2 vocabulary: tokens by id (ids the tokenizer
    lacks below the model's vocab_size as unused [PADn]), special added tokens as control, merges, special ids."""
    import gguf

    pre = bpe_pre(base)
    tokenizer = _tokenizer_json(base)
    T = gguf.TokenType
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [T.UNUSED] * n_vocab
    for text, i in tokenizer["model"]["vocab"].items():
        tokens[i], types[i] = text, T.NORMAL
    for added in tokenizer.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = T.CONTROL if added.get("special") else T.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _add_special(writer, base, n_vocab, merges=True)


def spm_vocab(writer, base: Path, n_vocab: int) -> None:
    """A SentencePiece tokenizer (tokenizer.model, as LLaMA-2's) as llama.cpp's llama vocabulary, with gguf's
    SentencePieceVocab (pieces, scores, types) as convert_hf_to_gguf.py writes it."""
    import gguf

    vocab = gguf.SentencePieceVocab(base)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_special(writer, base, n_vocab, merges=False)


def source_gguf_vocab(writer, base: Path, n_vocab: int) -> None:
    """The embedded default's tokenizer.* keys copied from the GGUF it was converted from, but for the
    pre-tokenizer: qloraner trains with the converted tokenizer, whose words split as tokenizer.ggml.pre `gpt2`
    says (transformers' GGUF conversion drops SmolLM2's digit split), so llama.cpp must split as it did."""
    import gguf

    from qloraner.sources import _gguf_path

    pre = bpe_pre(base)
    for key, field in gguf.GGUFReader(_gguf_path()).fields.items():
        if key.startswith("tokenizer.") and key != "tokenizer.ggml.pre":
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub)
    writer.add_tokenizer_pre(pre)


VOCABS = {"gguf": source_gguf_vocab, "spm": spm_vocab, "bpe": bpe_vocab}


def vocab_kind(base: Path, trained: dict) -> str:
    """Where the GGUF's tokenizer comes from: the embedded default's source GGUF, a SentencePiece model, or a
    byte-level BPE tokenizer.json (anything else is refused when its pre-tokenizer is read)."""
    from qloraner.sources import DEFAULT_MODEL

    if (trained.get("model") or DEFAULT_MODEL) == DEFAULT_MODEL:
        return "gguf"
    return "spm" if (base / "tokenizer.model").is_file() else "bpe"


# --- the file --------------------------------------------------------------------------------------------------


def write_gguf(
    path: Path, base: Path, trained: dict, tensors: Iterator[tuple[str, torch.Tensor]], dtype: str, name: str
) -> int:
    """The GGUF at `path`: metadata, tokenizer, tensor index, then each of `tensors` (the merged f32 tensors in
    the base's file order) permuted where llama.cpp wants and encoded as it arrives. Returns the bytes written."""
    import gguf

    config = json.loads((base / "config.json").read_text())
    plan = tensor_plan(base, dtype)
    writer = gguf.GGUFWriter(path, "llama")
    try:
        writer.add_name(name)
        writer.add_file_type(_file_types()[dtype])
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        heads, kv_heads = llama_metadata(writer, config)
        VOCABS[vocab_kind(base, trained)](writer, base, config["vocab_size"])
        for t in plan:
            shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(t.name, shape, np.uint8, int(np.prod(shape)), raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        rows = {"attn_q": heads, "attn_k": kv_heads}
        encoders, todo, total = _encoders(), iter(plan), 0
        for hf_name, tensor in tensors:
            if gguf_name(hf_name) is None:
                continue
            t = next(todo)
            assert t.hf_name == hf_name, (t.hf_name, hf_name)  # the plan reads the same files in the same order
            kind = t.name.split(".")[-2]
            data = encoders[t.qtype](permute(tensor, rows[kind]) if kind in rows else tensor)
            _write_data(writer, data, path)
            total += data.nbytes
    finally:
        writer.close()
    return total


def _write_data(writer, data: np.ndarray, path: Path) -> None:
    """Append one tensor's bytes. numpy's short write names no errno: where the disk lacks room for the tensor it
    is the full disk (ENOSPC, which export reports as such)."""
    import shutil

    try:
        writer.write_tensor_data(data)
    except OSError as err:
        if err.errno is None and shutil.disk_usage(path.parent).free < data.nbytes:
            raise OSError(errno.ENOSPC, "no space left on the disk") from None
        raise


# --- Ollama ----------------------------------------------------------------------------------------------------


def ollama_template(settings: dict) -> str:
    """The adapter's prompt as an Ollama (Go) template: what the user types is the sentence; no document context."""
    from qloraner.prompts import build_prompt

    marker = "\x00SENTENCE\x00"
    text = build_prompt([marker], settings["prompt"], settings["response_format"], "")
    if any(bad in text for bad in ("{{", "}}", '"""')):
        raise QloranerError(f'prompt {settings["prompt"]!r}: holds {{{{, }}}} or """; cannot write it as a Modelfile')
    return text.replace(marker, "{{ .Prompt }}")


def modelfile(settings: dict, context_length: int) -> str:
    """The Ollama Modelfile beside model.gguf: qloraner's prompt as TEMPLATE, greedy decoding, and its stop rule
    (EOS, which llama.cpp stops at by itself, or a blank line). Triple quotes keep the template's and the stop
    string's newlines (Ollama's parser takes a triple-quoted value as is)."""
    stop = settings["stop"]["text"]
    return "\n".join(
        [
            "# Ollama: ollama create qloraner-ner -f Modelfile",
            '#         ollama run qloraner-ner "EU rejects German call to boycott British lamb ."',
            f"# The prompt is qloraner's {settings['prompt']!r} template asking for the {settings['response_format']!r}"
            " format; type one sentence, its tokens split by spaces (as CoNLL's).",
            f"FROM ./{GGUF_FILE}",
            f'TEMPLATE """{ollama_template(settings)}"""',
            "PARAMETER temperature 0",
            f"PARAMETER num_ctx {min(context_length, OLLAMA_CTX)}",
            f'PARAMETER stop """{stop}"""',
            "",
        ]
    )


def copy_tokenizer_files(base: Path, out: Path) -> None:
    """The base's Hugging Face tokenizer files beside the GGUF: qloraner (Tagger.load, ./run_eval.sh) tokenizes
    with them exactly as in training; the GGUF carries its own copy for llama.cpp, Ollama and transformers."""
    import shutil

    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
