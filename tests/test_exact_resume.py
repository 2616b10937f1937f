"""``--resume`` after ``kill -9`` reproduces the uninterrupted run: the same ``metrics.json``
losses and bit-identical final weights (CPU, same seed), with 0 and 2 loader workers and with
2 processes over gloo; a kill during a checkpoint write never leaves a file that is loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK_RCNN = "common/configs/baselines/mask_rcnn_R_18_FPN_gn_scratch_shapes.yaml"
MAX_ITER = 24  # metrics.json rows at iterations 19 and 23 (Detectron2 writes every 20)
KILL_AFTER = "model_0000009.pth"  # checkpoints every 5 iterations: killed at >= 10 of 24


def _opts(shapes_tiny, workers: int) -> list[str]:
    return [
        *shapes_tiny.cfg_opts,
        "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(MAX_ITER),
        "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.STEPS", "(15,)",
        "SOLVER.CHECKPOINT_PERIOD", "5",
        "DATALOADER.NUM_WORKERS", str(workers),
        "INPUT.MIN_SIZE_TRAIN", "(48, 64, 80)",
        "INPUT.MAX_SIZE_TRAIN", "128",
        "SEED", "7",
    ]  # fmt: skip


def _cmd(shapes_tiny, out_dir, workers: int, gpus: int, resume: bool = False) -> list[str]:
    args = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", MASK_RCNN]
    args += ["--num-gpus", str(gpus)] + (["--resume"] if resume else [])
    return [*args, *_opts(shapes_tiny, workers), "OUTPUT_DIR", str(out_dir)]


def _env(shapes_tiny) -> dict[str, str]:
    return dict(os.environ, DETECTRON2_DATASETS=shapes_tiny.root, OMP_NUM_THREADS="1")


def _run(cmd, env) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def _kill_after_checkpoint(cmd, env, out_dir, name: str) -> None:
    """Start training and ``kill -9`` it as soon as ``last_checkpoint`` names ``name``."""
    pointer = os.path.join(out_dir, "last_checkpoint")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(pointer) and open(pointer).read().strip() >= name:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: gloo children too
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-run:\n{proc.stderr.read()[-3000:]}"
    assert not os.path.exists(os.path.join(out_dir, "model_final.pth"))


def _losses(out_dir) -> dict[int, dict[str, float]]:
    """The last row logged for each iteration (a killed run may have logged some twice)."""
    rows = {}
    with open(os.path.join(out_dir, "metrics.json")) as f:
        for line in f:
            m = json.loads(line)
            if "total_loss" in m:
                rows[m["iteration"]] = {k: v for k, v in m.items() if k.startswith("loss")}
                rows[m["iteration"]]["total_loss"] = m["total_loss"]
    return rows


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[i][k] - b[i][k]) for i in a for k in a[i])


def _final_weights(out_dir) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["model"]


@pytest.mark.parametrize(
    "workers,gpus",
    [(0, 1), (2, 1), pytest.param(0, 2, marks=pytest.mark.slow, id="gloo-2-processes")],
)
def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path, shapes_tiny, workers, gpus):
    env = _env(shapes_tiny)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _run(_cmd(shapes_tiny, whole, workers, gpus), env)
    _kill_after_checkpoint(_cmd(shapes_tiny, broken, workers, gpus), env, broken, KILL_AFTER)
    log = _run(_cmd(shapes_tiny, broken, workers, gpus, resume=True), env)
    assert "resuming the data stream at batch" in log
    ref, got = _losses(whole), _losses(broken)
    assert sorted(ref) == [19, MAX_ITER - 1]
    assert _max_difference(ref, got) == 0.0, (ref, got)
    a, b = _final_weights(whole), _final_weights(broken)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ"


_KILL_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from common.engine.checkpoint import QSCheckpointer
    model = torch.nn.Linear(3, 2)
    ckpt = QSCheckpointer(model, sys.argv[1])
    ckpt.save("model_0000000")
    real_save = torch.save

    def half_then_die(obj, f, *a, **k):
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = half_then_die
    with torch.no_grad():
        model.weight.fill_(7.0)
    ckpt.save("model_0000001")
    """
)


def test_kill_during_checkpoint_write_leaves_nothing_loadable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE, str(tmp_path)], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "model_0000001.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    from common.engine.checkpoint import QSCheckpointer

    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ckpt = QSCheckpointer(model, str(tmp_path))
    ckpt.resume_or_load("", resume=True)
    assert not torch.equal(model.weight, torch.full_like(model.weight, 7.0))
    assert not torch.equal(model.weight, torch.full_like(model.weight, 1.0))  # it did load


def test_non_finite_weights_are_never_saved(tmp_path):
    from common.engine.checkpoint import NonFiniteWeightsError, QSCheckpointer

    model = torch.nn.Linear(3, 2)
    ckpt = QSCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000000")
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"model_0000001.*bias.*model_0000000\.pth"):
        ckpt.save("model_0000001")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
