"""The PyTorch side of the PyTorch harvest backend: runs in any Python with torch and transformers
(it imports nothing from sae_jax, and torch only inside `main`, so the backend imports its frame
helpers), driven over stdin/stdout by `sae_jax.model.torch_backend`.

Protocol: one JSON line per message, arrays in .npy format right after their line.
  <- {"path", "device", "dtype", "hooks": [[name, module path, "in"|"out"], ...]}
  -> {"ok": true, "torch": ..., "transformers": ..., "device": ...}   or {"ok": false, "error": ...}
  <- {"forward": true} + tokens int32 [B, T]
  -> {"ok": true} + one float32 [B, T, width] array per hook, in the order given
stdin closed: exit. The forward stops (an exception raised by the last hook) once every hooked
module has run, so the layers after the deepest hook cost nothing.
"""

import io
import json
import sys
import traceback

import numpy as np


def write_array(fp, a: np.ndarray) -> None:
    """An array in .npy format onto a pipe (numpy's own writer wants a seekable file)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    fp.write(buf.getvalue())


def read_array(fp) -> np.ndarray:
    """One .npy array from a pipe."""
    version = np.lib.format.read_magic(fp)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = header(fp)
    n = int(np.prod(shape)) * dtype.itemsize
    data = fp.read(n)
    if len(data) != n:
        raise EOFError(f"pipe closed after {len(data)} of {n} bytes")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


class _Done(Exception):
    pass


def _send(out, msg: dict, arrays=()):
    out.write((json.dumps(msg) + "\n").encode())
    for a in arrays:
        write_array(out, a)
    out.flush()


def main() -> int:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    try:
        import torch
        import transformers

        cfg = json.loads(inp.readline())
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg["path"], dtype=dtype, attn_implementation="eager")
        model = model.to(cfg["device"]).eval()
        names = [h[0] for h in cfg["hooks"]]
        got: dict = {}

        def keep(name, x):
            got[name] = x.detach().float().cpu().numpy()
            if len(got) == len(names):
                raise _Done

        for name, path, where in cfg["hooks"]:
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"hook {name}: the model has no module {path!r}") from None
            if where == "out":
                mod.register_forward_hook(lambda m, a, o, name=name: keep(name, o[0] if isinstance(o, tuple) else o))
            else:
                mod.register_forward_pre_hook(lambda m, a, kw, name=name: keep(name, a[0] if a else kw["hidden_states"]), with_kwargs=True)
        _send(
            out,
            {
                "ok": True,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "device": str(next(model.parameters()).device),
            },
        )
    except Exception as e:  # noqa: BLE001
        _send(out, {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
        return 1
    while True:
        line = inp.readline()
        if not line:
            return 0
        tokens = read_array(inp)
        got.clear()
        try:
            with torch.no_grad():
                model(torch.from_numpy(tokens.astype(np.int64)).to(model.device))
        except _Done:
            pass
        except Exception as e:  # noqa: BLE001
            _send(out, {"ok": False, "error": f"{type(e).__name__}: {e}"})
            continue
        missing = [n for n in names if n not in got]
        if missing:
            _send(out, {"ok": False, "error": f"hooks {missing} did not fire in the forward (wrong module or direction)"})
            continue
        _send(out, {"ok": True}, [got[n] for n in names])


if __name__ == "__main__":
    sys.exit(main())
