"""`sae-jax export RUN --format saelens|sparsify|npz --out DIR`: a run's dictionaries for PyTorch.

One folder per bank member, named like the member (`blocks.6.hook_resid_post.topk.w4608.k32`):

| format     | files in the member folder                                   | loads with |
| ---------- | ------------------------------------------------------------ | ---------- |
| `saelens`  | `cfg.json`, `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec), `sparsity.safetensors` (log10 firing frequency on held-out rows) | `sae_lens.SAE.load_from_disk(folder)` |
| `sparsify` | `<hookpoint>/cfg.json`, `<hookpoint>/sae.safetensors` (encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec) | `sparsify.SparseCoder.load_from_disk(folder/<hookpoint>)` |
| `npz`      | `params.npz` in the Gemma Scope layout (W_enc, W_dec, b_enc, b_dec; `threshold` for JumpReLU-type dictionaries, `k` for TopK, `W_skip` [d_in, d_out] for skip transcoders) and `cfg.json` | `numpy.load(..., allow_pickle=False)` |

Architectures: TopK exports everywhere; BatchTopK exports as the JumpReLU it is at inference
(threshold = the running mean of the batch threshold, the same for every latent); JumpReLU as
`jumprelu`, ReLU+L1 as SAELens `standard`; Matryoshka dictionaries as their inner architecture
(the prefixes are in the metadata). Transcoders: SAELens `transcoder` / `skip_transcoder` /
`jumprelu_transcoder` / `jumprelu_skip_transcoder`; TopK transcoders (which SAELens lacks) to
sparsify (`transcode`, `skip_connection`). sparsify takes TopK only: other architectures are
refused with a message that names the formats that do take them.

The input normalisation used in training is folded in (see `sae_jax.runs`): every export maps raw
activations of the hook to the same latents and reconstruction as our model. sparsify's
`<hookpoint>` is the Hugging Face module whose output the hook is (`layers.6` for
`blocks.6.hook_resid_post`, `layers.6.mlp` for `hook_mlp_out`, ...), or the TransformerLens name
where no module outputs it (`attn.hook_z`, `hook_resid_mid`). A TopK dictionary is written to npz
with its `k`, never with a zero threshold (that would make it a ReLU SAE).

The export is written to a temporary folder beside `--out` and renamed into place: an existing
`--out` is refused unless `--overwrite`, and a failure leaves no partial export behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from sae_jax.errors import SaeJaxError
from sae_jax.model.hf_modules import hf_module
from sae_jax.model.hooks import transformer_hook
from sae_jax.runs import Run, RunError

FORMATS = ("saelens", "sparsify", "npz")
DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}
SAELENS_VERSION = "6.0.0"  # the config layout written (sae_lens >= 6 reads it)


class ExportError(SaeJaxError, RuntimeError):
    pass


def _arch(run: Run) -> str | None:
    """The store's model architecture (None: activations written from arrays, no model)."""
    model = run.store_meta.get("model") or {}
    if model.get("name", "external") == "external" and "architecture" not in model:
        return None
    return model.get("architecture", "LlamaForCausalLM")


def _cast(arrays: dict[str, np.ndarray], dtype: str) -> dict:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported ({', '.join(DTYPES)})")
    if dtype == "bfloat16":
        import ml_dtypes

        return {k: np.ascontiguousarray(v.astype(ml_dtypes.bfloat16)) for k, v in arrays.items()}
    return {k: np.ascontiguousarray(v.astype(DTYPES[dtype])) for k, v in arrays.items()}


def _metadata(run: Run, m: int) -> dict:
    mem, st = run.members[m], run.store_meta
    return {
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": None,
        "model_name": st["model"]["name"],
        "hook_name": mem.hook,
        "hook_head_index": None,
        **({"hook_name_out": mem.out_hook, "hf_hook_name_out": hf_module(mem.out_hook, _arch(run))} if mem.transcoder else {}),
        "hf_hook_name": hf_module(mem.hook, _arch(run)),
        "context_size": st["ctx_len"],
        "prepend_bos": st["bos_prepended"],
        "exclude_special_tokens": st["exclude_special"],
        "dataset_path": json.dumps(st["source"]),
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
        "trained_with": {
            "library": "sae_jax",
            "run": str(run.root.absolute()),
            "step": run.step,
            "steps_planned": run.steps,
            "model_digest": st["model"]["digest"],
            "architecture": mem.architecture,
            "matryoshka_prefixes": run.meta.get("matryoshka_prefixes", []),
            "input_scale_folded": mem.input_scale,
            "output_scale_folded": mem.output_scale or mem.input_scale,
        },
    }


def _save_safetensors(path: Path, arrays: dict) -> None:
    """The arrays as safetensors, readable as any other file written here (safetensors creates
    its file 0600; the other users of a shared machine could not load the weights)."""
    from safetensors.numpy import save_file

    save_file(arrays, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _saelens_architecture(run: Run, m: int) -> str:
    mem = run.members[m]
    skip = "W_skip" in run.params
    if not mem.transcoder:
        return {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}[mem.inference]
    if mem.inference == "topk":
        raise ExportError(f"{mem.name}: SAELens has no TopK transcoder class; export it with --format sparsify (which has one) or npz")
    return ("jumprelu_" if mem.inference == "jumprelu" else "") + ("skip_transcoder" if skip else "transcoder")


def write_saelens(run: Run, m: int, folder: Path, dtype: str) -> None:
    """SAELens 6: `topk`, `jumprelu` (JumpReLU and BatchTopK, whose inference form is a JumpReLU with
    the running threshold), `standard` (ReLU); transcoders as `transcoder`, `skip_transcoder`,
    `jumprelu_transcoder`, `jumprelu_skip_transcoder` (b_dec not subtracted from the input)."""
    mem, p = run.members[m], run.folded(m)
    arch = _saelens_architecture(run, m)
    cfg = {
        "architecture": arch,
        "d_in": run.meta["d_in"],
        "d_sae": mem.width,
        "rescale_acts_by_decoder_norm": False,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": not mem.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if getattr(transformer_hook(mem.hook), "point", None) == "attn_z" else "none",
        "metadata": _metadata(run, m),
    }
    if mem.inference == "topk":
        cfg["k"] = mem.k
    if mem.transcoder:
        cfg["d_out"] = run.meta["d_out"]
    folder.mkdir(parents=True)
    arrays = dict(p)
    if "W_skip" in arrays:
        arrays["W_skip"] = np.ascontiguousarray(arrays["W_skip"].T)  # SAELens: [d_out, d_in], applied as x @ W_skip.T
    _save_safetensors(folder / "sae_weights.safetensors", _cast(arrays, dtype))
    from sae_jax.eval.core import heldout_density

    density, where = heldout_density(run, m)
    if density is not None:  # what SAELens saves beside a trained SAE: log10 firing frequency per latent
        _save_safetensors(folder / "sparsity.safetensors", {"sparsity": np.log10(density + 1e-10).astype(np.float32)})
        cfg["metadata"]["trained_with"]["sparsity_rows"] = where
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=1))


def write_sparsify(run: Run, m: int, folder: Path, dtype: str) -> None:
    """sparsify's SparseCoder is TopK (SAEs and transcoders with d_out == d_in, optional skip)."""
    mem, p = run.members[m], run.folded(m)
    if mem.inference != "topk":
        raise ExportError(
            f"{mem.name}: sparsify loads TopK dictionaries only; a {mem.architecture} dictionary exports with --format saelens or npz"
        )
    if mem.transcoder and run.meta["d_out"] != run.meta["d_in"]:
        raise ExportError(f"{mem.name}: sparsify transcoders need d_out == d_in (here {run.meta['d_out']} != {run.meta['d_in']})")
    sub = folder / (hf_module(mem.hook, _arch(run)) or mem.hook)
    sub.mkdir(parents=True)
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, mem.width // run.meta["d_in"]),
        "normalize_decoder": True,
        "num_latents": mem.width,
        "k": mem.k,
        "multi_topk": False,
        "skip_connection": "W_skip" in p,
        "transcode": mem.transcoder,
        "d_in": run.meta["d_in"],
    }
    arrays = {"encoder.weight": p["W_enc"].T, "encoder.bias": p["b_enc"], "W_dec": p["W_dec"], "b_dec": p["b_dec"]}
    if "W_skip" in p:
        arrays["W_skip"] = p["W_skip"].T  # sparsify: [d_out, d_in], applied as x @ W_skip.mT
    _save_safetensors(sub / "sae.safetensors", _cast(arrays, dtype))
    (sub / "cfg.json").write_text(json.dumps(cfg, indent=1))
    # sparsify's cfg.json takes only its own fields: where the dictionary came from goes beside it
    (folder / "sae_jax.json").write_text(json.dumps({"hook_name": mem.hook, "hookpoint": sub.name, **_metadata(run, m)}, indent=1))


def write_npz(run: Run, m: int, folder: Path, dtype: str) -> None:
    if dtype == "bfloat16":
        raise ExportError("npz export: bfloat16 is not a numpy dtype other tools read; use float32 or float16")
    mem, p = run.members[m], run.folded(m)
    folder.mkdir(parents=True)
    arrays = _cast(p, dtype)
    if mem.inference == "topk":
        arrays["k"] = np.asarray(mem.k, np.int64)
    np.savez(folder / "params.npz", **arrays)
    cfg = {
        "architecture": mem.inference,
        "trained_as": run.meta.get("kind", mem.architecture),
        "d_in": run.meta["d_in"],
        "d_out": run.meta.get("d_out", run.meta["d_in"]),
        "d_sae": mem.width,
        "hook_name": mem.hook,
        **({"k": mem.k} if mem.inference == "topk" else {}),
        **({"hook_name_out": mem.out_hook, "apply_b_dec_to_input": False} if mem.transcoder else {}),
        **_metadata(run, m),
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=1))


WRITERS = {"saelens": write_saelens, "sparsify": write_sparsify, "npz": write_npz}


def export_run(run: Run, fmt: str, out, dtype: str = "float32", overwrite: bool = False) -> list[Path]:
    """Write every member of `run` in `fmt` under `out`; returns the member folders."""
    if fmt not in WRITERS:
        raise ExportError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported ({', '.join(DTYPES)})")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        folders = []
        for m, mem in enumerate(run.members):
            WRITERS[fmt](run, m, tmp / mem.name, dtype)
            folders.append(out / mem.name)
        (tmp / "export.json").write_text(
            json.dumps(
                {
                    "format": fmt,
                    "dtype": dtype,
                    "run": str(run.root.absolute()),
                    "step": run.step,
                    "members": [m.name for m in run.members],
                },
                indent=1,
            )
        )
        if out.exists():
            old = out.parent / f".old-export-{out.name}-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except OSError as e:
        raise ExportError(f"cannot write the export to {out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folders


__all__ = ["FORMATS", "ExportError", "RunError", "export_run"]
