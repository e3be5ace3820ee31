"""Rebuild a `tokenizers.Tokenizer` from the vocabulary stored in a GGUF file."""

from __future__ import annotations

from pathlib import Path

from sae_jax.errors import SaeJaxError

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER = 3, 4


class TokenizerError(SaeJaxError, RuntimeError):
    pass


def _pre_tokenizer(pre: str | None):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's "smollm" (and several other GPT-2 style) pre-tokenizers split digits one by one
    # before the GPT-2 regex, as SmolLM's tokenizer.json does.
    if pre in ("smollm", "qwen2", "deepseek-llm", "starcoder"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: smollm, qwen2, gpt2, default)")


def tokenizer_from_gguf(reader, path: Path):
    """Build the tokenizer of a GGUF file (BPE / 'gpt2' models). Returns (tokenizer, info)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE)")
    tokens = field("tokenizer.ggml.tokens")
    merges = field("tokenizer.ggml.merges")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or merges is None:
        raise TokenizerError(f"{path}: GGUF tokenizer lacks tokens or merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    special = [i for i, ty in enumerate(types) if ty in (_CONTROL, _USER)]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    info = {
        "special_ids": special,
        "bos_id": field("tokenizer.ggml.bos_token_id"),
        "eos_id": field("tokenizer.ggml.eos_token_id"),
    }
    return tok, info
