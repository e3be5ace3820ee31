"""Hook point names.

Names follow TransformerLens / SAELens so that exported dictionaries carry a `hook_name` the
PyTorch tools understand:

| point        | name                          | width               | what                                   |
| ------------ | ----------------------------- | ------------------- | -------------------------------------- |
| `resid_pre`  | `blocks.L.hook_resid_pre`     | d_model             | residual stream entering block L       |
| `attn_z`     | `blocks.L.attn.hook_z`        | n_heads * head_dim  | per-head outputs, concatenated, before the output projection |
| `attn_out`   | `blocks.L.hook_attn_out`      | d_model             | attention output (after o_proj)        |
| `resid_mid`  | `blocks.L.hook_resid_mid`     | d_model             | resid_pre + attn_out                   |
| `mlp_in`     | `blocks.L.hook_mlp_in`        | d_model             | the MLP's actual input (after its RMSNorm; what a transcoder reads) |
| `mlp_out`    | `blocks.L.hook_mlp_out`       | d_model             | MLP output                             |
| `resid_post` | `blocks.L.hook_resid_post`    | d_model             | residual stream leaving block L        |

`mlp_in` is the *normalised* MLP input (TransformerLens calls it `ln2.hook_normalized`): a
transcoder trained from it to `mlp_out` replaces the MLP exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sae_jax.errors import SaeJaxError

POINTS = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")

_FORMATS = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "attn_z": "blocks.{}.attn.hook_z",
    "attn_out": "blocks.{}.hook_attn_out",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "mlp_in": "blocks.{}.hook_mlp_in",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "resid_post": "blocks.{}.hook_resid_post",
}
_PARSE = [(re.compile("^" + re.escape(f).replace(r"\{\}", r"(\d+)") + "$"), p) for p, f in _FORMATS.items()]


class HookError(SaeJaxError, ValueError):
    """A hook name that is malformed or does not exist in the model."""


@dataclass(frozen=True, order=True)
class Hook:
    layer: int
    point: str

    @property
    def name(self) -> str:
        return _FORMATS[self.point].format(self.layer)

    def __str__(self) -> str:
        return self.name


def hook_name(layer: int, point: str) -> str:
    return Hook(layer, point).name


def parse_hook(name: str, n_layers: int | None = None) -> Hook:
    """Parse `blocks.L.hook_x` (or the short form `x.L`, e.g. `resid_post.6`) into a Hook."""
    name = name.strip()
    hook = None
    for pattern, point in _PARSE:
        m = pattern.match(name)
        if m:
            hook = Hook(int(m.group(1)), point)
            break
    if hook is None:
        m = re.match(r"^([a-z_]+)\.(\d+)$", name)
        if m and m.group(1) in POINTS:
            hook = Hook(int(m.group(2)), m.group(1))
    if hook is None:
        raise HookError(
            f"unknown hook name {name!r}: expected one of "
            + ", ".join(_FORMATS[p].format("L") for p in POINTS)
            + " (or the short form POINT.L, e.g. resid_post.6)"
        )
    if n_layers is not None and not 0 <= hook.layer < n_layers:
        raise HookError(f"hook {name!r}: layer {hook.layer} is out of range, the model has layers 0..{n_layers - 1}")
    return hook


def transformer_hook(name: str) -> Hook | None:
    """The transformer hook `name` is, or None for any other name a store may carry (a store
    written with `StoreWriter`: a recommender's embeddings, a vision model's tokens)."""
    try:
        return parse_hook(name)
    except HookError:
        return None


def parse_hooks(names, n_layers: int | None = None) -> list[Hook]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    hooks = [parse_hook(n, n_layers) for n in names]
    if not hooks:
        raise HookError("no hook points given")
    if len({h.name for h in hooks}) != len(hooks):
        raise HookError(f"duplicate hook names in {[h.name for h in hooks]}")
    return hooks
