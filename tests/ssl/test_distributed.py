"""Two gloo processes under torchrun train exactly like one process on the global batch
(SimCLR and MoCo v2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sslbackdoor.cli import main
from sslbackdoor.models.encoders import build_encoder
from sslbackdoor.ssl.simclr import SimCLRModel

LR = 1e-3
ARGS = ["pretrain", "simclr", "--dataset", "sklearn-digits", "--limit", "32",
        "--arch", "convnet:4", "--image-size", "16", "--epochs", "1", "--batch-size", "32",
        "--precision", "fp32", "--lr", str(LR), "--knn-every", "0", "--probe-epochs", "0",
        "--monitor-limit", "40", "--device", "cpu", "--seed", "1", "--quiet"]


def _run_both(tmp_path: Path, args: list[str] = ARGS
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "sslbackdoor", *args, "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=240, check=False)
    assert launched.returncode == 0, launched.stderr[-2000:]
    main([*args, "--out", str(tmp_path / "single")])
    return (load_file(str(tmp_path / "ddp" / "training_state.safetensors")),
            load_file(str(tmp_path / "single" / "training_state.safetensors")))


def test_one_step_on_two_gloo_processes_equals_one_process(tmp_path: Path) -> None:
    """One Adam step on a global batch of 32 sklearn digits: each process took 16 images
    (and its slice of the views' random parameters), gathered the other's projections as
    NT-Xent negatives and shared BatchNorm statistics (GlobalBatchNorm)."""
    ddp, single = _run_both(tmp_path)
    assert ddp.keys() == single.keys()

    def loss(folder: str) -> float:
        results = json.loads((tmp_path / folder / "results.json").read_text())
        return float(results["history"][0]["loss"])

    assert abs(loss("ddp") - loss("single")) < 1e-5
    for key in (k for k in single if ".running_" in k or "exp_avg" in k):
        # BatchNorm running statistics and Adam's moments (= the gradients): equal.
        assert torch.allclose(ddp[key], single[key], atol=1e-6, rtol=1e-4), key
    names = [n for n, _ in SimCLRModel(build_encoder("convnet:4"), 512, 128).named_parameters()]
    counted = determined_count = 0
    for index, name in enumerate(names):
        ours, theirs = ddp[f"model.{name}"], single[f"model.{name}"]
        # Adam's first step moves each weight by about lr·sign(gradient); where the gradient
        # is at float-noise level (|g| ≲ 1e-8, e.g. a bias whose effect the head's
        # BatchNorm cancels) the sign is arbitrary in either run, so those weights may
        # differ by up to 2·lr. Every weight with a real gradient must agree.
        determined = single[f"optim.{index}.exp_avg"].abs() > 1e-7  # |g| > 1e-6
        counted, determined_count = counted + determined.numel(), determined_count + int(
            determined.sum())
        assert torch.allclose(ours[determined], theirs[determined], atol=1e-6), name
        assert (ours - theirs).abs().max() <= 2 * LR + 1e-6, name
    assert determined_count > 0.99 * counted
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["world_size"] == 2


MOCO_ARGS = ["pretrain", "moco", *ARGS[2:], "--queue-size", "64", "--bn-splits", "4"]


def test_moco_step_on_two_gloo_processes_equals_one_process(tmp_path: Path) -> None:
    """One MoCo v2 step (SGD) on a global batch of 32: each process computed the queries of
    its 16 images (global BatchNorm) and the keys of its 2 of the 4 shuffled-BN chunks, then
    gathered the keys, so both processes enqueued the single process's 32 keys."""
    ddp, single = _run_both(tmp_path, MOCO_ARGS)
    assert ddp.keys() == single.keys()

    def loss(folder: str) -> float:
        results = json.loads((tmp_path / folder / "results.json").read_text())
        return float(results["history"][0]["loss"])

    assert abs(loss("ddp") - loss("single")) < 1e-5
    assert int(ddp["model.queue.position"]) == int(single["model.queue.position"]) == 32
    assert torch.allclose(ddp["model.queue.keys"], single["model.queue.keys"],
                          atol=1e-6, rtol=1e-4)
    # Keys enqueued this step replaced the random initial keys in rows 0..31 only.
    assert torch.equal(ddp["model.queue.keys"][32:], single["model.queue.keys"][32:])
    for key in single:
        # Online and key network weights, BatchNorm statistics; SGD's momentum buffers hold
        # the first step's gradients (plus weight decay), ten times Adam's exp_avg that the
        # SimCLR test compares with atol 1e-6: the same tolerance on the gradients.
        atol = 1e-5 if key.endswith(".momentum_buffer") else 1e-6
        assert torch.allclose(ddp[key], single[key], atol=atol, rtol=1e-4), key
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["world_size"] == 2
