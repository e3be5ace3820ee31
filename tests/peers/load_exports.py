"""Run inside the peer venv (Python 3.11, torch, sae-lens, eai-sparsify): load exports with the real
libraries and apply them to given activations.

    python load_exports.py JOBS.json

JOBS.json: a list of {"library": "saelens"|"sparsify", "folder": ..., "inputs": X.npy,
"input_shape": [...] (the shape the library is fed, e.g. [N, heads, head_dim] for hook_z),
"out": Y.npz}. Writes, per job, `dense` [N, d_sae] latent activations and `x_hat` [N, d_out]
(float32; transcoders: the output hook's reconstruction, skip connection included). Reads .npy/.json only (no pickle).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sae_lens.constants import SPARSITY_FILENAME
from safetensors import safe_open


def run(job):
    x = np.load(job["inputs"], allow_pickle=False).astype(np.float32)
    xt = torch.from_numpy(x.reshape(job["input_shape"]))
    with torch.no_grad():
        if job["library"] == "saelens":
            from sae_lens import SAE

            sae = SAE.load_from_disk(job["folder"], device="cpu")
            acts = sae.encode(xt.to(sae.dtype))
            # skip transcoders add W_skip in forward, not in decode
            x_hat = sae(xt.to(sae.dtype)) if getattr(sae, "W_skip", None) is not None else sae.decode(acts)
            dense = acts.float().reshape(x.shape[0], -1)
            info = {
                "class": type(sae).__name__,
                "dtype": str(sae.dtype),
                "k": getattr(sae.cfg, "k", None),
                "hook": sae.cfg.metadata.hook_name,
            }
            sparsity = Path(job["folder"]) / SPARSITY_FILENAME
            if sparsity.is_file():  # read as SAELens's loaders read it beside a pretrained SAE
                with safe_open(str(sparsity), framework="pt", device="cpu") as f:
                    info["log_sparsity"] = f.get_tensor("sparsity").tolist()
        elif job["library"] == "sparsify":
            from sparsify import SparseCoder

            sae = SparseCoder.load_from_disk(job["folder"], device="cpu")
            enc = sae.encode(xt.to(sae.dtype))
            x_hat = sae(xt.to(sae.dtype)).sae_out  # forward: decode plus the skip connection, if any
            dense = torch.zeros(x.shape[0], sae.num_latents).scatter_(1, enc.top_indices, enc.top_acts.float())
            info = {"class": type(sae).__name__, "dtype": str(sae.dtype), "k": sae.cfg.k}
        else:
            raise SystemExit(f"unknown library {job['library']}")
    np.savez(job["out"], dense=dense.numpy(), x_hat=x_hat.float().reshape(x.shape[0], -1).numpy())
    return info


if __name__ == "__main__":
    jobs = json.load(open(sys.argv[1]))
    print(json.dumps([run(j) for j in jobs]))
