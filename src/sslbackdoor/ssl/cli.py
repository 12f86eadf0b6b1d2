"""`sslbackdoor pretrain simclr ...`: thin wrapper over `run_pretrain`.

Works alone or under `torchrun --nproc-per-node N -m sslbackdoor pretrain simclr ...`
(every process trains its share of each batch; rank 0 writes the files). Heavy modules
are imported inside the command so that `sslbackdoor --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sslbackdoor.errors import UserInputError

pretrain_app = typer.Typer(no_args_is_help=True,
                           help="Self-supervised pre-training of a clean encoder.")


def _source(text: str, limit: int | None) -> dict[str, Any]:
    """`NAME` or `NAME/SPLIT` → a DataSource dict (kind:ARG names keep their slashes)."""
    name, split = text, "train"
    if "/" in text and not text.startswith(("npz:", "imagefolder:")):
        name, _, split = text.rpartition("/")
    if split not in ("train", "test", "unlabeled"):
        raise UserInputError(f"--dataset {text!r}: split {split!r} is not one of "
                             f"train, test, unlabeled")
    return {"dataset": name, "split": split, "limit": limit}


@pretrain_app.command("simclr")
def simclr(
    dataset: Annotated[list[str], typer.Option(help="NAME or NAME/SPLIT of unlabeled training "
                                                    "images, repeatable (e.g. stl10/unlabeled)")],
    out: Annotated[Path, typer.Option("--out", help="output folder")],
    arch: Annotated[str, typer.Option(help="encoder architecture")] = "convnet-small",
    epochs: Annotated[int, typer.Option()] = 100,
    batch_size: Annotated[int, typer.Option(help="global batch (all processes)")] = 256,
    image_size: Annotated[int, typer.Option()] = 32,
    lr: Annotated[float, typer.Option()] = 1e-3,
    weight_decay: Annotated[float, typer.Option()] = 1e-6,
    temperature: Annotated[float, typer.Option()] = 0.5,
    precision: Annotated[str, typer.Option(help="bf16 | fp32")] = "bf16",
    limit: Annotated[int | None, typer.Option(help="use a stratified subset of N images "
                                                   "of each --dataset")] = None,
    monitor_dataset: Annotated[str | None, typer.Option(
        help="labelled set for kNN and the linear probe (default: first --dataset)")] = None,
    monitor_limit: Annotated[int | None, typer.Option(
        help="at most N bank and N test images in the kNN monitor and probe")] = None,
    knn_every: Annotated[int, typer.Option(help="epochs between kNN checks (0: end)")] = 1,
    probe_epochs: Annotated[int, typer.Option(help="linear-probe epochs (0: none)")] = 100,
    seed: Annotated[int, typer.Option()] = 0,
    data_root: Annotated[str | None, typer.Option(help="datasets folder")] = None,
    download: Annotated[bool, typer.Option(
        "--download", help="let torchvision download missing datasets (needs internet)")] = False,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue from the last epoch checkpoint in --out")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress output")] = False,
) -> None:
    """SimCLR pre-training → encoder.safetensors, training_state.safetensors, results.json."""
    from sslbackdoor.progress import set_quiet
    from sslbackdoor.ssl.distributed import shutdown_distributed
    from sslbackdoor.ssl.pretrain import load_pretrain_config, run_pretrain

    set_quiet(quiet)
    config = load_pretrain_config({
        "name": f"simclr-{arch}", "seed": seed, "device": device, "image_size": image_size,
        "data_root": data_root, "download": download,
        "data": [_source(d, limit) for d in dataset],
        "simclr": {"arch": arch, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                   "weight_decay": weight_decay, "temperature": temperature,
                   "precision": precision},
        "monitor": {"dataset": monitor_dataset, "knn_every": knn_every,
                    "bank_limit": monitor_limit, "test_limit": monitor_limit,
                    "probe": ({"kind": "linear", "epochs": probe_epochs, "lr": 1e-3,
                               "batch_size": 256} if probe_epochs else None)},
    }, label="pretrain simclr")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    try:
        results = run_pretrain(config, out, resume=resume)
    finally:
        shutdown_distributed()
    if results:
        final = results["final"]
        probe = final.get("linear_probe_accuracy")
        typer.echo(f"wrote {out / 'encoder.safetensors'}: kNN {final['knn_accuracy']:.4f}"
                   + (f", linear probe {probe:.4f}" if probe is not None else ""))
