"""One trainer of benchmarks/peers.py in its own process, driven over stdin/stdout (JSON lines).

    python benchmarks/peer_worker.py sae_jax|sparsify|saelens

The driver sends {"cmd": "init", ...settings}, then {"cmd": "train", "steps": n} as often as it
likes (alternating with the other trainers), then {"cmd": "eval"} and {"cmd": "quit"}. Every reply
is one JSON line on stdout; the libraries' own printing goes to stderr. `sae_jax` runs in .venv
(the jitted train step of sae_jax.train.step, as `sae-jax train` builds it); `sparsify` and
`saelens` run in .peer-venv (PyTorch CPU), each with its library's own step:

- sparsify (eai-sparsify): `SparseCoder.forward` (fused encoder with its index_add backward, the
  embedding_bag decoder) inside the per-batch sequence of `sparsify.Trainer.fit` for loss_fn="fvu"
  and optimizer="adam": b_dec from the first batch's mean, decoder rows renormalised, FVU +
  auxk_alpha x AuxK with its dead mask, the decoder gradient's parallel component removed,
  torch.optim.Adam. (`Trainer` itself hooks a live transformers model; here the activations come
  from the store, so its per-batch body is driven directly.)
- SAELens (sae-lens): `SAETrainer.step` on a `TopKTrainingSAE` (its own loss, AuxK, gradient
  clipping, Adam and scheduler).

Rows: `train.npy` [N, d_in] float32 in order, batch t = rows [t B, (t+1) B) (wrapping); `eval.npy`
the held-out rows. Every trainer starts from the same random unit directions (`init.npy`
[d_sae, d_in]) in its library's own scale (sae_jax: W_dec = D, W_enc = D^T / sqrt(3), its
`train.encoder_init_scale`; sparsify: encoder rows D / sqrt(3), the norm of its kaiming-uniform rows,
decoder its normalised copy; SAELens: W_dec = 0.1 D, W_enc = W_dec^T, its decoder_init_norm
heuristic), biases by each library's own rule (b_dec: sae_jax the geometric median of the first
batch, sparsify its mean, SAELens zero).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _heldout import Accumulator, peak_rss_mib, schedule  # noqa: E402

PROTO = sys.stdout
sys.stdout = sys.stderr  # library prints must not break the protocol


def reply(obj) -> None:
    PROTO.write(json.dumps(obj) + "\n")
    PROTO.flush()


class Trainer:
    def __init__(self, cfg: dict):
        import numpy as np

        self.cfg = cfg
        self.rows = np.load(cfg["train"], mmap_mode="r")
        self.B = cfg["batch"]
        self.t = 0
        self.np = np

    def batch(self, t: int | None = None):
        n = len(self.rows) // self.B
        j = (self.t if t is None else t) % n
        return self.np.array(self.rows[j * self.B : (j + 1) * self.B], dtype=self.np.float32)  # a writable copy

    def window_tokens(self) -> int:
        """Dead over training: no fire in the last `dead_window` steps' tokens (or all, if fewer)."""
        return min(self.cfg["dead_window"], self.t) * self.B

    def train(self, steps: int) -> float:
        """Train `steps` batches; seconds, the last step finished (device sync included). The
        batches are read from train.npy before the clock starts, for every library: reading is
        the loader's work, which `sae-jax train` does ahead in its own threads and peers.py
        measures apart (`loader_rate`); the clock holds the steps."""
        xs = [self.batch(self.t + i) for i in range(steps)]
        t0 = time.perf_counter()
        for x in xs:
            self.one(x)
            self.t += 1
        self.sync()
        return time.perf_counter() - t0


class SaeJax(Trainer):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        import jax
        import jax.numpy as jnp
        import numpy as np

        from sae_jax import parallel
        from sae_jax.sae.bank import BankSpec, geometric_median
        from sae_jax.train.settings import TrainSettings
        from sae_jax.train.step import TrainStep

        self.jax, self.jnp = jax, jnp
        d, w, k = cfg["d_in"], cfg["width"], cfg["k"]
        self.spec = BankSpec(("h",), (w,), (k,), d, w, d // 2, "topk")
        self.mesh = parallel.make_mesh(1, 1)
        fields = dict(
            lr=cfg["lr"],
            steps=cfg["steps"],
            warmup_steps=cfg["warmup"],
            decay_frac=cfg["decay_frac"],
            dead_tokens=cfg["dead_tokens"],
            aux_coef=cfg["aux_coef"],
            encoder=cfg.get("encoder", "auto"),
        )
        settings = TrainSettings.defaults(**{**fields, **cfg.get("sae_jax_set", {})})  # peers.py --sae-jax-set
        # `auto` resolved once, before the step is built, as `sae-jax train` does (and reported)
        from sae_jax.kernels.topk import resolve_encoder_dtype

        settings = settings.replace(encoder_dtype=resolve_encoder_dtype(settings.encoder_dtype))
        self.encoder_dtype = settings.encoder_dtype
        self.step = TrainStep(self.spec, self.mesh, settings, np.array([float(cfg["input_scale"])]))
        # the input scale sae-jax train takes from the store's statistics: unit mean squared norm
        self.scale = float(cfg["input_scale"])
        first = self.batch()[:4096] * self.scale
        b_dec = geometric_median(jnp.asarray(first))
        state = self.step.init_state(jax.random.key(cfg["seed"]), None)
        D = jnp.asarray(np.load(cfg["init"]))
        state["params"]["W_dec"] = jax.device_put(D[None], state["params"]["W_dec"].sharding)
        state["params"]["W_enc"] = jax.device_put(D.T[None] * settings.encoder_init_scale, state["params"]["W_enc"].sharding)
        state["params"]["b_dec"] = jax.device_put(b_dec[None], state["params"]["b_dec"].sharding)
        self.state = state
        self.x_sharding = parallel.sharding(self.mesh, "x")
        self.metrics = None

    def one(self, x) -> None:
        xb = self.jax.device_put(x[None], self.x_sharding)  # the loader hands the step host arrays too
        if self.step.resamples_before(self.t):  # train.resample_tokens, as `sae-jax train`'s loop does
            self.state, _ = self.step.resample(self.state, xb)
        self.state, self.metrics = self.step(self.state, xb)

    def sync(self) -> None:
        self.jax.block_until_ready(self.state)

    def matmul_seconds(self, reps: int = 5) -> float:
        """The step's floor: the encoder matmul [batch, d_in] x [d_in, d_sae] alone (jitted, the
        same shapes, inputs in the step's encoder dtype, float32 accumulation), median of `reps`
        after a warm-up."""
        dt = self.encoder_dtype  # resolved at init, as the step's
        x = self.jnp.asarray(self.batch())
        w = self.state["params"]["W_enc"][0]
        mm = self.jax.jit(lambda a, b: self.jnp.dot(a.astype(dt), b.astype(dt), preferred_element_type=self.jnp.float32))
        self.jax.block_until_ready(mm(x, w))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            self.jax.block_until_ready(mm(x, w))
            ts.append(time.perf_counter() - t0)
        return float(self.np.median(ts))

    def save(self, folder: str, hook: str, hookpoint: str) -> None:
        """The dictionary on raw activations in sparsify's layout (`<hook>/cfg.json + sae.safetensors`)."""
        from safetensors.numpy import save_file

        raw = self.raw()
        sub = Path(folder) / hook
        sub.mkdir(parents=True)
        arrays = {"encoder.weight": raw["W_enc"].T, "encoder.bias": raw["b_enc"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
        save_file({k: self.np.ascontiguousarray(v, self.np.float32) for k, v in arrays.items()}, str(sub / "sae.safetensors"))
        cfg = {"num_latents": self.cfg["width"], "k": self.cfg["k"], "d_in": self.cfg["d_in"], "normalize_decoder": True}
        (sub / "cfg.json").write_text(json.dumps(cfg))

    def raw(self) -> dict:
        p = {k: self.np.asarray(v[0]) for k, v in self.state["params"].items()}
        s = self.scale  # the export fold (sae_jax/runs.py): unit decoder rows kept, biases / s
        return {"W_enc": p["W_enc"], "b_enc": p["b_enc"] / s, "W_dec": p["W_dec"], "b_dec": p["b_dec"] / s}

    def evaluate(self, rows) -> dict:
        from sae_jax.sae import folded

        raw = {k: self.jnp.asarray(v) for k, v in self.raw().items()}
        acc = Accumulator(self.cfg["width"])
        for c in range(0, len(rows), 1024):
            x = self.jnp.asarray(rows[c : c + 1024])
            v, i = folded.encode(raw, x, self.cfg["k"])
            acc.add(rows[c : c + 1024], folded.decode(raw, v, i), i, v)
        since = self.np.asarray(self.state["tokens_since_fired"][0])
        return {**acc.result(), "window_dead_frac": float((since >= self.window_tokens()).mean())}


class Sparsify(Trainer):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        import numpy as np
        import torch
        from sparsify import SparseCoder, SparseCoderConfig

        self.torch = torch
        torch.manual_seed(cfg["seed"])
        self.sae = SparseCoder(cfg["d_in"], SparseCoderConfig(num_latents=cfg["width"], k=cfg["k"]), "cpu", dtype=torch.float32)
        if cfg.get("init"):  # else the library's own initialisation
            D = torch.from_numpy(np.load(cfg["init"]))
            with torch.no_grad():
                self.sae.encoder.weight.copy_(D / np.sqrt(3.0))
                self.sae.W_dec.copy_(self.sae.encoder.weight)
                self.sae.set_decoder_norm_to_unit_norm()
        self.sched = None
        if cfg.get("optimizer", "adam") == "signum":  # sparsify's default: schedule-free SignSGD, no decay
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            self.opt = ScheduleFreeWrapper(SignSGD([dict(params=self.sae.parameters(), lr=cfg["lr"])]), momentum=0.95)
            self.opt.train()
        else:
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg["lr"])
            f = lambda s: schedule(s, cfg["steps"], cfg["warmup"], cfg["decay_frac"])  # noqa: E731
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, f)
        self.since_fired = torch.zeros(cfg["width"], dtype=torch.long)

    def one(self, x) -> None:
        torch, sae, cfg = self.torch, self.sae, self.cfg
        x = torch.from_numpy(x)
        if self.t == 0:
            with torch.no_grad():
                sae.b_dec.data = x.mean(0)  # sparsify: "ensure the preactivations are centered"
        sae.set_decoder_norm_to_unit_norm()
        dead = self.since_fired > cfg["dead_tokens"]
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead, total_variance=total_variance)
        did_fire = torch.zeros(cfg["width"], dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + cfg["aux_coef"] * out.auxk_loss).backward()
        self.since_fired += len(x)
        self.since_fired[did_fire] = 0
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        if self.sched is not None:
            self.sched.step()

    def sync(self) -> None:
        pass

    def save(self, folder: str, hook: str, hookpoint: str) -> None:
        if self.sched is None:
            self.opt.eval()  # schedule-free: the averaged weights, as sparsify saves them
        self.sae.save_to_disk(Path(folder) / hookpoint)

    def evaluate(self, rows) -> dict:
        torch = self.torch
        acc = Accumulator(self.cfg["width"])
        if self.sched is None:
            self.opt.eval()  # schedule-free: the averaged weights, as sparsify saves them
        self.sae.set_decoder_norm_to_unit_norm()  # as sparsify does before each forward
        if self.cfg.get("dec_out"):
            self.np.save(self.cfg["dec_out"], self.sae.W_dec.detach().numpy())
        with torch.no_grad():
            for c in range(0, len(rows), 1024):
                x = torch.from_numpy(self.np.array(rows[c : c + 1024], dtype=self.np.float32))
                enc = self.sae.encode(x)
                x_hat = self.sae.decode(enc.top_acts, enc.top_indices)
                acc.add(x.numpy(), x_hat.numpy(), enc.top_indices.numpy(), enc.top_acts.numpy())
        return {**acc.result(), "window_dead_frac": float((self.since_fired >= self.window_tokens()).float().mean())}


class SaeLens(Trainer):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        import numpy as np
        import torch
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.torch = torch
        torch.manual_seed(cfg["seed"])
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=cfg["d_in"], d_sae=cfg["width"], k=cfg["k"], dtype="float32", device="cpu"))
        D = torch.from_numpy(np.load(cfg["init"]))
        with torch.no_grad():
            sae.W_dec.copy_(0.1 * D)  # its decoder_init_norm
            sae.W_enc.copy_(sae.W_dec.T)
        steps = cfg["steps"]
        tcfg = SAETrainerConfig(
            total_training_samples=steps * self.B,
            train_batch_size_samples=self.B,
            lr=cfg["lr"],
            lr_end=0.0,
            lr_scheduler_name="constant",
            lr_warm_up_steps=cfg["warmup"],
            lr_decay_steps=steps - int(steps * (1 - cfg["decay_frac"])),
            device="cpu",
        )
        self.trainer = SAETrainer(tcfg, sae, data_provider=iter(()))
        self.sae = sae

    def one(self, x) -> None:
        tr = self.trainer
        tr.maybe_reset_sparsity()
        tr.step(self.torch.from_numpy(x))
        tr.n_training_steps += 1

    def sync(self) -> None:
        pass

    def save(self, folder: str, hook: str, hookpoint: str) -> None:
        self.sae.cfg.metadata.hook_name = hook
        self.sae.save_inference_model(folder)  # cfg.json + sae_weights.safetensors (SAELens's layout)

    def evaluate(self, rows) -> dict:
        torch = self.torch
        acc = Accumulator(self.cfg["width"])
        self.sae.eval()
        with torch.no_grad():
            for c in range(0, len(rows), 1024):
                x = torch.from_numpy(self.np.array(rows[c : c + 1024], dtype=self.np.float32))
                acts = self.sae.encode(x)
                x_hat = self.sae.decode(acts)
                if acts.is_sparse:
                    acts = acts.to_dense()
                v, i = torch.topk(acts, self.cfg["k"], dim=-1)
                acc.add(x.numpy(), x_hat.numpy(), i.numpy(), v.numpy())
        since = self.trainer.n_forward_passes_since_fired * self.B  # it counts steps
        return {**acc.result(), "window_dead_frac": float((since >= self.window_tokens()).float().mean())}


TRAINERS = {"sae_jax": SaeJax, "sparsify": Sparsify, "saelens": SaeLens}


def compute_threads(name: str) -> int:
    """Threads the library computes with: XLA:CPU's pool has one per CPU this process may run on
    (its MaxParallelism); PyTorch says its intra-op count."""
    if name == "sae_jax":
        return len(os.sched_getaffinity(0))
    import torch

    return torch.get_num_threads()


def main() -> None:
    name = sys.argv[1]
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    if name == "sae_jax" or os.environ.get("PEERS_KEEP_FREED_MEMORY"):  # what `sae-jax train` does (sae_jax/hostmem.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from sae_jax.hostmem import keep_freed_memory

        keep_freed_memory()
    trainer = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "init":
                t0 = time.perf_counter()
                trainer = TRAINERS[name](msg)
                extra = {"encoder_dtype": trainer.encoder_dtype} if hasattr(trainer, "encoder_dtype") else {}
                reply({"ok": True, "init_s": time.perf_counter() - t0, "threads": compute_threads(name), **extra})
            elif msg["cmd"] == "train":
                reply({"ok": True, "seconds": trainer.train(msg["steps"]), "step": trainer.t, "peak_rss_mib": peak_rss_mib()})
            elif msg["cmd"] == "matmul":
                reply({"ok": True, "seconds": trainer.matmul_seconds()})
            elif msg["cmd"] == "save":
                trainer.save(msg["folder"], msg["hook"], msg["hookpoint"])
                reply({"ok": True})
            elif msg["cmd"] == "eval":
                import numpy as np

                rows = np.load(msg["rows"], mmap_mode="r")
                reply({"ok": True, **trainer.evaluate(rows), "peak_rss_mib": peak_rss_mib()})
            elif msg["cmd"] == "quit":
                reply({"ok": True})
                return
        except Exception as e:  # reported to the driver, which stops with it
            import traceback

            traceback.print_exc()
            reply({"ok": False, "error": f"{name}: {type(e).__name__}: {e}"})
            return


if __name__ == "__main__":
    main()
