"""`sslbackdoor pretrain simclr|moco ...`: thin wrappers over `run_pretrain`.

Both commands come from one factory (`_pretrain_command`): the same options, with each
method's defaults (SimCLR: BadEncoder's, Adam lr 1e-3, τ 0.5; MoCo v2: CorruptEncoder's,
SGD lr 0.06 with a cosine schedule, τ 0.2, weight decay 1e-4, queue 65,536, momentum 0.999).
`--queue-size`, `--momentum` and `--bn-splits` belong to `pretrain moco` only.

Works alone or under `torchrun --nproc-per-node N -m sslbackdoor pretrain simclr ...`
(every process trains its share of each batch; rank 0 writes the files). Heavy modules
are imported inside the command so that `sslbackdoor --help` stays fast.
"""

# No `from __future__ import annotations`: the command's annotations use per-method values
# (hidden=...) that typer could not evaluate later from strings.
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from sslbackdoor.errors import UserInputError

pretrain_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                           help="Self-supervised pre-training of a clean encoder.")

AUGMENTS = {"standard": False, "localized-crop": True}  # --augment → augment.localized_crop


@dataclass(frozen=True)
class MethodDefaults:
    """A pre-training method as the command line offers it."""

    command: str  # sslbackdoor pretrain COMMAND
    method: str  # simclr.method in the config
    title: str
    lr: float
    weight_decay: float
    temperature: float
    optimizer: str
    schedule: str


METHODS = (
    MethodDefaults("simclr", "simclr", "SimCLR", lr=1e-3, weight_decay=1e-6, temperature=0.5,
                   optimizer="adam", schedule="constant"),
    MethodDefaults("moco", "moco-v2", "MoCo v2", lr=0.06, weight_decay=1e-4, temperature=0.2,
                   optimizer="sgd", schedule="cosine"),
)


def _source(text: str, limit: int | None) -> dict[str, Any]:
    """`NAME` or `NAME/SPLIT` → a DataSource dict (kind:ARG names keep their slashes)."""
    name, split = text, "train"
    if "/" in text and not text.startswith(("npz:", "imagefolder:", "images:")):
        name, _, split = text.rpartition("/")
    if split not in ("train", "test", "unlabeled"):
        raise UserInputError(f"--dataset {text!r}: split {split!r} is not one of "
                             f"train, test, unlabeled")
    return {"dataset": name, "split": split, "limit": limit}


def _moco_settings(defaults: MethodDefaults, queue_size: int | None, momentum: float | None,
                   bn_splits: int | None) -> dict[str, Any] | None:
    given = {"queue_size": queue_size, "momentum": momentum, "bn_splits": bn_splits}
    given = {k: v for k, v in given.items() if v is not None}
    if defaults.method != "moco-v2":
        if given:
            options = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UserInputError(f"{options}: only for `sslbackdoor pretrain moco`, not "
                                 f"`pretrain {defaults.command}`")
        return None
    return given


def _augment(text: str) -> bool:
    if text not in AUGMENTS:
        raise UserInputError(f"--augment {text!r}: expected one of {', '.join(AUGMENTS)}")
    return AUGMENTS[text]


def _pretrain_command(defaults: MethodDefaults) -> Callable[..., None]:
    """The `pretrain COMMAND` function for one method (its defaults in the signature)."""
    moco = defaults.method == "moco-v2"

    def command(
        dataset: Annotated[list[str], typer.Option(
            help="NAME or NAME/SPLIT of unlabeled training images, repeatable (e.g. "
                 "stl10/unlabeled, images:DIR)")],
        out: Annotated[Path, typer.Option("--out", help="output folder")],
        arch: Annotated[str, typer.Option(help="encoder architecture")] = "convnet-small",
        epochs: Annotated[int, typer.Option()] = 100,
        batch_size: Annotated[int, typer.Option(help="global batch (all processes)")] = 256,
        image_size: Annotated[int, typer.Option()] = 32,
        lr: Annotated[float, typer.Option(help="(peak) learning rate")] = defaults.lr,
        weight_decay: Annotated[float, typer.Option()] = defaults.weight_decay,
        temperature: Annotated[float, typer.Option()] = defaults.temperature,
        optimizer: Annotated[str, typer.Option(
            help="adam | sgd (momentum 0.9)")] = defaults.optimizer,
        schedule: Annotated[str, typer.Option(
            help="constant | cosine learning rate")] = defaults.schedule,
        augment: Annotated[str, typer.Option(
            help="standard | localized-crop (CorruptEncoder's defense)")] = "standard",
        queue_size: Annotated[int | None, typer.Option(
            help="keys in the queue (default 65536)", hidden=not moco)] = None,
        momentum: Annotated[float | None, typer.Option(
            help="key-network EMA momentum (default 0.999)", hidden=not moco)] = None,
        bn_splits: Annotated[int | None, typer.Option(
            help="shuffled-BatchNorm chunks of the key batch (default 8)",
            hidden=not moco)] = None,
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
            "--download", help="let torchvision download missing datasets (needs internet)")
        ] = False,
        device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
        resume: Annotated[bool, typer.Option(
            "--resume", help="continue from the last epoch checkpoint in --out")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="no progress output")] = False,
    ) -> None:
        from sslbackdoor.progress import set_quiet
        from sslbackdoor.ssl.distributed import shutdown_distributed
        from sslbackdoor.ssl.pretrain import load_pretrain_config, run_pretrain

        set_quiet(quiet)
        settings = _moco_settings(defaults, queue_size, momentum, bn_splits)
        simclr: dict[str, Any] = {
            "method": defaults.method, "arch": arch, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "weight_decay": weight_decay, "temperature": temperature,
            "optimizer": optimizer, "schedule": schedule, "precision": precision,
            "augment": {"localized_crop": _augment(augment)}}
        if settings is not None:
            simclr["moco"] = settings
        config = load_pretrain_config({
            "name": f"{defaults.method}-{arch}", "seed": seed, "device": device,
            "image_size": image_size, "data_root": data_root, "download": download,
            "data": [_source(d, limit) for d in dataset],
            "simclr": simclr,
            "monitor": {"dataset": monitor_dataset, "knn_every": knn_every,
                        "bank_limit": monitor_limit, "test_limit": monitor_limit,
                        "probe": ({"kind": "linear", "epochs": probe_epochs, "lr": 1e-3,
                                   "batch_size": 256} if probe_epochs else None)},
        }, label=f"pretrain {defaults.command}")
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

    command.__doc__ = (f"{defaults.title} pre-training → encoder.safetensors, "
                       f"training_state.safetensors, results.json.")
    command.__name__ = defaults.command
    return command


for _defaults in METHODS:
    pretrain_app.command(_defaults.command)(_pretrain_command(_defaults))
