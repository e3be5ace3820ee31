"""The PyTorch harvest backend: any transformers causal LM, on CPU or CUDA, hooked by module path.

    sae-jax harvest --config.model.backend=torch --config.model.path=HF_DIR \\
        [--config.model.torch_python=/path/to/python-with-torch] [--config.model.torch_device=cuda] \\
        [--config.model.torch_hooks=blocks.6.hook_resid_post=model.layers.6:out,...]

The model runs in a worker process (`torch_worker.py`, any Python with torch and transformers:
torch need not be installable next to JAX); tokenisation, context packing, shuffling and the
store are this process's, exactly as for the Flax backend, so both write the same store format
from the same tokens. Hook points map to modules by the family presets of `hf_modules.py`
(Llama, Qwen2/3, Gemma 2/3, GPT-2), or, for any other model, by `model.torch_hooks`: `NAME=MODULE:in|out`
pairs (the module's input or output).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_jax.config import default
from sae_jax.model.hooks import parse_hook
from sae_jax.model.loading import FAMILIES, ModelLoadError, hf_dir_digest, read_hf_config, read_hf_tokenizer
from sae_jax.model.torch_worker import read_array, write_array

WORKER = Path(__file__).with_name("torch_worker.py")


@dataclass(frozen=True)
class TorchShapes:
    """What harvest needs of a model config: layer count and hook widths (measured by the worker)."""

    n_layers: int
    widths: dict
    vocab_size: int

    def hook_width(self, point: str) -> int:
        return self.widths[point]


def parse_torch_hooks(spec: str) -> dict[str, tuple[str, str]]:
    """`NAME=MODULE:in|out,...` -> {hook name: (module, where)}."""
    out = {}
    for item in (x.strip() for x in str(spec).split(",") if x.strip()):
        name, eq, rest = item.partition("=")
        module, colon, where = rest.rpartition(":")
        if not eq or not colon or where not in ("in", "out") or not module or not name:
            raise ModelLoadError(f"model.torch_hooks: {item!r} is not NAME=MODULE:in or NAME=MODULE:out")
        out[name.strip()] = (module.strip(), where)
    return out


class TorchModel:
    """A transformers model in a worker process, with the attributes harvest reads of a loaded
    model (tokenizer, bos/eos/special ids, identity, cfg) and `forward(tokens) -> {hook: array}`."""

    def __init__(
        self, path, hooks: list[str], *, python: str = "", device: str | None = None, dtype: str | None = None, torch_hooks: str = ""
    ):
        device = default("model.torch_device") if device is None else device
        dtype = default("model.dtype") if dtype is None else dtype
        self.path = Path(os.path.expanduser(str(path)))
        if not self.path.is_dir():
            raise ModelLoadError(f"model.backend=torch: {self.path} is not a Hugging Face model directory")
        hf = read_hf_config(self.path)
        self.tokenizer, info = read_hf_tokenizer(self.path, hf)
        self.bos_id, self.eos_id, self.special_ids = info["bos_id"], info["eos_id"], frozenset(info["special_ids"])
        arch = (hf.get("architectures") or ["?"])[0]
        n_layers = int(hf.get("num_hidden_layers") or hf.get("n_layer") or hf.get("text_config", {}).get("num_hidden_layers") or 0)
        for h in hooks:
            parse_hook(h, n_layers or None)  # store hooks carry the canonical names, also when mapped by hand
        custom = parse_torch_hooks(torch_hooks)
        if custom:
            missing = [h for h in hooks if h not in custom]
            if missing:
                raise ModelLoadError(f"model.torch_hooks names no module for {missing} (it maps {sorted(custom)})")
            self.specs = [(h, *custom[h]) for h in hooks]
        else:
            from sae_jax.model.hf_modules import module_of

            family = FAMILIES.get(arch)
            if family is None:
                raise ModelLoadError(
                    f"{self.path}: no hook preset for {arch!r} (presets: {', '.join(FAMILIES)}); "
                    "map the hooks to modules with model.torch_hooks=NAME=MODULE:in|out,..."
                )
            self.specs = [(h, *module_of(parse_hook(h, n_layers), family)) for h in hooks]
        self.hook_names = [s[0] for s in self.specs]
        python = python or os.environ.get("SAE_JAX_TORCH_PYTHON") or sys.executable
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        reply = self._request({"path": str(self.path), "device": device, "dtype": dtype, "hooks": self.specs})
        probe = self.forward(np.zeros((1, 2), np.int32))
        widths = {h: a.shape[-1] for h, a in probe.items()}
        vocab = max(int(hf.get("vocab_size") or 0), self.tokenizer.get_vocab_size(with_added_tokens=True))
        self.cfg = TorchShapes(
            n_layers or 1 + max(parse_hook(h).layer for h in hooks), {parse_hook(h).point: widths[h] for h in hooks}, vocab
        )
        self.widths = widths
        self.identity = {
            "name": hf.get("_name_or_path") or self.path.name,
            "path": str(self.path),
            "digest": hf_dir_digest(self.path),
            "architecture": arch,
            "backend": "torch",
            "torch": reply.get("torch"),
            "transformers": reply.get("transformers"),
            "device": reply.get("device"),
            "dtype": dtype,
            "hook_modules": {h: f"{m}:{w}" for h, m, w in self.specs},
            "tokenizer_vocab_size": self.tokenizer.get_vocab_size(with_added_tokens=True),
        }

    def _request(self, msg: dict, arrays=()):
        if self.proc.poll() is not None:
            raise ModelLoadError(f"the PyTorch worker exited with code {self.proc.returncode}")
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        for a in arrays:
            write_array(self.proc.stdin, a)
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise ModelLoadError(
                f"the PyTorch worker ({WORKER}) died (exit code {self.proc.wait()}); is torch + transformers installed in that Python?"
            )
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ModelLoadError(f"PyTorch backend ({self.path}): {reply.get('error')}")
        return reply

    def forward(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        self._request({"forward": True}, [np.asarray(tokens, np.int32)])
        return {h: read_array(self.proc.stdout) for h in self.hook_names}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
