"""Contrastive pre-training stage (SimCLR or MoCo v2): config, training loop, checkpoint
every epoch, exact resume.

`simclr.method` picks the method: SimCLR (NT-Xent over the two views of the batch) or
MoCo v2 (InfoNCE of online queries against momentum keys and a queue of earlier keys;
`ssl.moco`). Both share the views, the encoder + MLP head, the optimizer (Adam or SGD with
momentum 0.9) and the learning-rate schedule (constant or cosine, set every epoch).

Writes into the output folder (rank 0 only when distributed):
  config.yaml                  the resolved config
  training_state.safetensors   after the last finished epoch: the model (SimCLR: encoder +
                               head; MoCo: online network, key network and the key queue's
                               buffers) and the optimizer state
  encoder.safetensors          the pre-trained (online) encoder, backbone only, via save_encoder
  results.json                 loss / kNN accuracy per epoch, final kNN and linear probe

Resuming replays nothing: every epoch draws its batch order and view parameters from a
generator seeded by (seed, epoch), and MoCo's key shuffles from a second stream seeded by
(seed, epoch, 1), so a resumed run makes exactly the views and updates the uninterrupted
run would have made.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import Field, ValidationError, model_validator
from torch.nn.parallel import DistributedDataParallel

from sslbackdoor.config_io import Strict, dump_config, format_validation_error
from sslbackdoor.data.datasets import Split, load_dataset
from sslbackdoor.data.native import PretrainImages, device_images, image_sizes
from sslbackdoor.data.sources import DataSource, dataset_tensors
from sslbackdoor.downstream.probe import ProbeConfig
from sslbackdoor.engine import (
    atomic_write_text,
    autocast,
    environment,
    prepare_module,
    seed_everything,
)
from sslbackdoor.errors import UserInputError
from sslbackdoor.models.checkpoints import save_encoder
from sslbackdoor.models.encoders import build_encoder
from sslbackdoor.progress import log, track
from sslbackdoor.run_lock import output_lock
from sslbackdoor.ssl.distributed import (
    DistContext,
    convert_global_batchnorm,
    gather_rows,
    init_distributed,
    local_slice,
    mean_over_processes,
)
from sslbackdoor.ssl.moco import MoCoModel, moco_loss, unshuffle
from sslbackdoor.ssl.monitor import LabeledImages, knn_accuracy, linear_probe_accuracy
from sslbackdoor.ssl.simclr import (
    AugmentConfig,
    SimCLRModel,
    SimCLRViews,
    ViewParams,
    nt_xent_loss,
)
from sslbackdoor.training_state import TrainingState, load_training_state, save_training_state

RESULTS_SCHEMA = "sslbackdoor.pretrain/1"
CACHE_FORMAT = "1"  # bump when a change alters the weights a config produces


class MoCoSettings(Strict):
    """MoCo v2's key network and queue; defaults are CorruptEncoder's setting."""

    queue_size: int = Field(65536, ge=1, description="keys kept as negatives (≥ batch_size)")
    momentum: float = Field(0.999, ge=0, lt=1, description="EMA momentum of the key network")
    bn_splits: int = Field(8, ge=1, description="chunks of the shuffled key batch with their "
                                                "own BatchNorm statistics (shuffled BN)")


class ContrastiveConfig(Strict):
    """Everything that determines the weights; defaults are BadEncoder's CIFAR10 SimCLR
    setting (CorruptEncoder's MoCo v2: method moco-v2, temperature 0.2, lr 0.06, optimizer
    sgd, schedule cosine, weight_decay 1e-4)."""

    arch: str = Field("resnet18-cifar", description="registered encoder, e.g. convnet-small")
    epochs: int = Field(1000, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    temperature: float = Field(0.5, gt=0)
    hidden_dim: int = Field(512, ge=1)
    projection_dim: int = Field(128, ge=1)
    precision: Literal["bf16", "fp32"] = "bf16"
    augment: AugmentConfig = AugmentConfig()
    method: Literal["simclr", "moco-v2"] = Field("simclr", description="simclr | moco-v2")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam, or sgd with "
                                                                  "momentum 0.9")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning rate per epoch: constant, or cosine "
                                "lr·½(1+cos(π·epoch/epochs))")
    moco: MoCoSettings | None = Field(None, description="moco-v2 only (defaults if omitted)")

    @model_validator(mode="after")
    def _method_settings(self) -> ContrastiveConfig:
        if self.method == "simclr":
            if self.moco is not None:
                raise ValueError("`moco` settings apply only to method moco-v2 (this config "
                                 "has method simclr); remove `moco` or set method: moco-v2")
            return self
        if self.moco is None:
            self.moco = MoCoSettings()
        splits = self.moco.bn_splits
        if self.batch_size % splits or self.batch_size // splits < 2:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of "
                             f"moco.bn_splits {splits} with at least 2 images per chunk")
        if self.moco.queue_size < self.batch_size:
            raise ValueError(f"moco.queue_size {self.moco.queue_size} is smaller than one "
                             f"batch ({self.batch_size})")
        return self

    def learning_rate(self, epoch: int) -> float:
        """The learning rate of (0-based) `epoch`: lr, or with the cosine schedule
        lr·½·(1+cos(π·epoch/epochs)); the trainer sets it at the start of every epoch."""
        if self.schedule == "constant":
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))


# Fields added after encoders were cached: hashed only when they differ from their default,
# so that every earlier config keeps its cache key.
_LATER_FIELDS = ("method", "optimizer", "schedule", "moco")


class MonitorConfig(Strict):
    """kNN monitor during training and a linear probe at the end (labelled data)."""

    dataset: str | None = Field(None, description="labelled set with train/test splits "
                                                  "(default: the first data source)")
    root: str | None = None
    knn_every: int = Field(1, ge=0, description="epochs between kNN evaluations (0: end only)")
    knn_k: int = Field(200, ge=1)
    knn_t: float = Field(0.5, gt=0)
    bank_limit: int | None = Field(None, ge=1, description="train images in the kNN bank")
    test_limit: int | None = Field(None, ge=1, description="test images evaluated")
    probe: ProbeConfig | None = Field(
        ProbeConfig(kind="linear", epochs=100, lr=1e-3, batch_size=256),
        description="linear probe at the end; null: none")


class PretrainConfig(Strict):
    """A contrastive pre-training run (the `simclr` field holds SimCLR's or MoCo's settings)."""

    name: str = "simclr"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int = Field(32, ge=8)
    data_root: str | None = None
    download: bool = Field(False, description="let torchvision download missing datasets")
    data: list[DataSource] = Field(..., min_length=1, description="unlabeled training images")
    simclr: ContrastiveConfig = ContrastiveConfig()
    monitor: MonitorConfig = MonitorConfig()

    def monitor_dataset(self) -> str:
        return self.monitor.dataset or self.data[0].dataset


def load_pretrain_config(raw: dict[str, Any], label: str = "pretrain") -> PretrainConfig:
    try:
        return PretrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserInputError(format_validation_error(exc, label)) from None


def pretrain_hash(config: PretrainConfig, include_epochs: bool = True) -> str:
    """Hash of what determines the weights (data, seed, size, hyper-parameters), not of
    where they run or how they are monitored: the encoder cache key.

    Without epochs it identifies the training trajectory, which a resumed run may extend
    (with a constant learning rate epoch k is the same in a longer run; with the cosine
    schedule it depends on the total, so epochs stay in). Fields added later (method,
    optimizer, schedule, moco) are left out while at their defaults: old keys still match.
    """
    settings = config.simclr
    simclr = settings.model_dump(mode="json")
    for name in _LATER_FIELDS:
        if getattr(settings, name) == ContrastiveConfig.model_fields[name].default:
            del simclr[name]
    if not include_epochs and settings.schedule == "constant":
        del simclr["epochs"]
    key = {"format": CACHE_FORMAT, "seed": config.seed, "image_size": config.image_size,
           "data": [s.model_dump(mode="json", exclude={"root"}) for s in config.data],
           "simclr": simclr}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_pretrain_images(config: PretrainConfig) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """All training images (uint8 [N,3,S,S]) and one provenance entry per source."""
    from sslbackdoor.data.sources import load_sources

    return load_sources(config.data, config.image_size, data_root=config.data_root,
                        seed=config.seed, download=config.download)


def load_monitor_data(config: PretrainConfig) -> tuple[LabeledImages, LabeledImages]:
    """The labelled (train bank, test) pair of the kNN monitor and linear probe."""
    from sslbackdoor.downstream.evaluate import check_split_leakage, check_two_splits

    name, monitor = config.monitor_dataset(), config.monitor
    root = monitor.root or config.data_root
    check_two_splits(name)
    sets = []
    splits: tuple[tuple[Split, int | None], ...] = (("train", monitor.bank_limit),
                                                    ("test", monitor.test_limit))
    for split, limit in splits:
        try:
            dataset = load_dataset(name, split, image_size=config.image_size, root=root,
                                   limit=limit, seed=config.seed, download=config.download)
        except UserInputError as exc:
            raise UserInputError(f"monitor.dataset {name!r} needs labelled train and test "
                                 f"splits ({exc})") from None
        images, labels = dataset_tensors(dataset)
        sets.append(LabeledImages(images, labels, len(dataset.classes)))
    check_split_leakage(f"monitor.dataset {name}", sets[0].images, sets[1].images)
    return sets[0], sets[1]


class ContrastiveTrainer:
    """Owns the model, optimizer and views of a SimCLR or MoCo v2 run; `train_epoch` is one
    pass over the data.

    `model` is a `SimCLRModel` (SimCLR) or a `MoCoModel` (MoCo v2: online network, key
    network and queue); either way `model.encoder` is the encoder being pre-trained and
    `model` as a whole is what the training state saves.
    """

    def __init__(self, config: PretrainConfig, device: torch.device,
                 context: DistContext | None = None) -> None:
        self.config, self.device = config, device
        self.context = context or DistContext()
        simclr = config.simclr
        local_slice(simclr.batch_size, self.context)  # fails early on an indivisible batch
        seed_everything(config.seed)
        online = SimCLRModel(build_encoder(simclr.arch), simclr.hidden_dim, simclr.projection_dim)
        model: SimCLRModel | MoCoModel
        if simclr.method == "moco-v2":
            assert simclr.moco is not None
            if simclr.moco.bn_splits % self.context.world_size:
                raise UserInputError(f"simclr.moco.bn_splits {simclr.moco.bn_splits} is not "
                                     f"divisible by the {self.context.world_size} processes")
            model = MoCoModel(online, simclr.moco.queue_size)
            if self.context.enabled:  # global statistics for queries; keys keep their chunks
                model.online = cast(SimCLRModel, convert_global_batchnorm(model.online, device))
        else:
            model = online
            if self.context.enabled:
                model = convert_global_batchnorm(model, device)  # type: ignore[assignment]
        self.model: SimCLRModel | MoCoModel = prepare_module(model, device)
        self.network: torch.nn.Module = self.model
        if self.context.enabled:
            self.network = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)  # BatchNorm statistics are global already
        self.optimizer = self._optimizer()
        self.views = SimCLRViews(config.image_size, simclr.augment)

    def _optimizer(self) -> torch.optim.Optimizer:
        simclr = self.config.simclr
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type in ("cpu", "cuda")
        if simclr.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=simclr.lr, momentum=0.9,
                                   weight_decay=simclr.weight_decay, fused=fused)
        return torch.optim.Adam(parameters, lr=simclr.lr, weight_decay=simclr.weight_decay,
                                fused=fused)

    @property
    def label(self) -> str:
        return "MoCo v2" if self.config.simclr.method == "moco-v2" else "SimCLR"

    def epoch_generator(self, epoch: int, stream: int = 0) -> torch.Generator:
        """The CPU generator of one epoch's draws, seeded by (seed, epoch, stream): stream 0
        draws the batch order and the view parameters, stream 1 MoCo's key shuffles."""
        if stream == 0:
            return torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        digest = hashlib.sha256(f"{self.config.seed}/{epoch}/{stream}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def set_learning_rate(self, epoch: int) -> float:
        lr = self.config.simclr.learning_rate(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_epoch(self, images: PretrainImages, epoch: int) -> dict[str, float]:
        """One epoch over uint8 images [N,3,H,W] or `NativeImages` (drop_last) → mean loss
        and speed."""
        batch = self.config.simclr.batch_size
        steps = len(images) // batch
        if steps == 0:
            raise UserInputError(f"{len(images)} training images are fewer than one batch "
                                 f"({batch}); lower simclr.batch_size")
        self.set_learning_rate(epoch)
        generator = self.epoch_generator(epoch)
        key_generator = (self.epoch_generator(epoch, stream=1)
                         if isinstance(self.model, MoCoModel) else None)
        order = torch.randperm(len(images), generator=generator)
        self.model.train()
        started, total = time.perf_counter(), 0.0
        for step in track(range(steps), f"{self.label} epoch {epoch + 1}", total=steps):
            index = order[step * batch:(step + 1) * batch]
            params = self.views.sample_pairs(batch, *image_sizes(images[index]), generator)
            total += float(self.step(images[index], params, key_generator))
        seconds = time.perf_counter() - started
        loss = mean_over_processes(total / steps, self.context, self.device)
        return {"loss": loss, "seconds": round(seconds, 3),
                "images_per_second": round(steps * batch / seconds, 2)}

    def step(self, batch: PretrainImages, params: ViewParams,
             key_generator: torch.Generator | None = None) -> torch.Tensor:
        """One update on a global batch (uint8 [B,3,H,W]) with view params of 2B views
        (rows i and B+i: the two views of image i); a distributed process uses only its
        slice of both. MoCo draws its key shuffle from `key_generator`. Returns the
        (local) loss."""
        if isinstance(self.model, MoCoModel):
            return self._moco_step(self.model, batch, params, key_generator)
        size = len(batch)
        part = local_slice(size, self.context)
        local = device_images(batch[part], self.device)
        views = torch.cat([self.views.apply(local, params[part]),
                           self.views.apply(local, params[size:][part])])
        with autocast(self.device, self.config.simclr.precision == "bf16"):
            projections = self.network(views.contiguous(memory_format=torch.channels_last))
        first, second = projections.float().chunk(2)
        both = torch.cat([gather_rows(first, self.context), gather_rows(second, self.context)])
        loss = nt_xent_loss(both, self.config.simclr.temperature, self._anchors(part, size))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _moco_step(self, model: MoCoModel, batch: PretrainImages, params: ViewParams,
                   generator: torch.Generator | None) -> torch.Tensor:
        """Queries = online(view 1) of this process's slice; keys = key network(view 2) of
        the global batch; InfoNCE against the queue; then the optimizer step, the momentum
        update of the key network and the keys (the same on every process) enqueued."""
        simclr = self.config.simclr
        assert simclr.moco is not None
        size = len(batch)
        part = local_slice(size, self.context)
        local = device_images(batch[part], self.device)
        queries_in = self.views.apply(local, params[part])
        with autocast(self.device, simclr.precision == "bf16"):
            queries = self.network(queries_in.contiguous(memory_format=torch.channels_last))
            keys = self._moco_keys(model, batch, params[size:], generator)
        loss = moco_loss(queries.float(), keys[part.start:part.stop], model.queue.keys,
                         simclr.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        model.update_key_network(simclr.moco.momentum)
        model.queue.enqueue(keys)
        return loss.detach()

    def _moco_keys(self, model: MoCoModel, batch: PretrainImages, params: ViewParams,
                   generator: torch.Generator | None) -> torch.Tensor:
        """Key projections float [B,D] of the second views of the global batch uint8
        [B,3,H,W] (params of B views), identical on every process.

        Shuffled BatchNorm: the batch is permuted with `generator` and cut into bn_splits
        chunks with their own statistics; each process computes the views and keys of its
        contiguous share of the shuffled batch (bn_splits / world_size chunks), the shares
        are gathered and put back in order. Alone, this is `MoCoModel.keys` on all views.
        """
        assert self.config.simclr.moco is not None
        size = len(batch)
        order = torch.randperm(size, generator=generator)
        mine = order[local_slice(size, self.context)]
        views = self.views.apply(device_images(batch[mine], self.device), params[mine])
        splits = self.config.simclr.moco.bn_splits // self.context.world_size
        local = model.key_projections(views.contiguous(memory_format=torch.channels_last),
                                      splits)
        return unshuffle(gather_rows(local, self.context), order)

    def _anchors(self, part: slice, size: int) -> torch.Tensor | None:
        if not self.context.enabled:
            return None
        own = torch.arange(part.start, part.stop, device=self.device)
        return torch.cat([own, own + size])


def run_pretrain(config: PretrainConfig, out_dir: Path, resume: bool = False,
                 images: PretrainImages | None = None) -> dict[str, Any]:
    """Pre-train, checkpointing every epoch; returns the results also in results.json.

    `images` (uint8 [N,3,S,S]) replaces loading `config.data`, for callers that build the
    training set themselves (e.g. clean images plus poisons; `data` should still describe
    them, since it keys the cache). Under `torchrun` every process trains its share; only
    rank 0 writes and evaluates.
    """
    context, device = init_distributed(config.device)
    out_dir = Path(out_dir)
    if images is None:
        images, provenance = load_pretrain_images(config)
    else:
        provenance = [{"images": len(images), "source": "given by the caller"}]
    monitor = load_monitor_data(config) if context.is_main else None
    trainer = ContrastiveTrainer(config, device, context)
    # Only rank 0 writes, so only it locks the folder (the others would refuse themselves).
    with output_lock(out_dir) if context.is_main else contextlib.nullcontext():
        if context.is_main:
            atomic_write_text(out_dir / "config.yaml", dump_config(config))
        history = _train(trainer, images, out_dir, resume, monitor)
        if not context.is_main:
            return {}
        assert monitor is not None
        results = _final_results(trainer, history, monitor, provenance, out_dir)
        atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    return results


def _train(trainer: ContrastiveTrainer, images: PretrainImages, out_dir: Path, resume: bool,
           monitor: tuple[LabeledImages, LabeledImages] | None) -> list[dict[str, Any]]:
    config, context = trainer.config, trainer.context
    state_path = out_dir / "training_state.safetensors"
    history: list[dict[str, Any]] = []
    start = 0
    if resume and state_path.is_file():
        start, history = _resume(trainer, state_path)
    elif resume:
        log(f"no {state_path.name} in {out_dir}: starting from epoch 0")
    every = config.monitor.knn_every
    for epoch in range(start, config.simclr.epochs):
        entry: dict[str, Any] = {"epoch": epoch + 1, **trainer.train_epoch(images, epoch)}
        if monitor is not None and every and (epoch + 1) % every == 0:
            entry["knn_accuracy"] = _knn(trainer, monitor)
        history.append(entry)
        if context.is_main:
            log(f"epoch {epoch + 1}/{config.simclr.epochs}: " +
                " ".join(f"{k}={v:.4f}" for k, v in entry.items() if k != "epoch"))
            save_training_state(state_path, trainer.model, trainer.optimizer,
                                TrainingState(epoch + 1, {"history": history, "trajectory":
                                                          pretrain_hash(config, False)}))
    return history


def _resume(trainer: ContrastiveTrainer, path: Path) -> tuple[int, list[dict[str, Any]]]:
    state = load_training_state(path, trainer.model, trainer.optimizer)
    expected = pretrain_hash(trainer.config, include_epochs=False)
    if state.extras.get("trajectory") != expected:
        raise UserInputError(f"{path} was written by a different pre-training config "
                             f"(data, seed or hyper-parameters differ); use a new --out "
                             f"folder or run without --resume")
    log(f"resuming {trainer.label} from {path} after epoch {state.epoch}")
    return state.epoch, list(state.extras.get("history", []))


def _knn(trainer: ContrastiveTrainer, monitor: tuple[LabeledImages, LabeledImages]) -> float:
    settings = trainer.config.monitor
    return round(knn_accuracy(trainer.model.encoder, monitor[0], monitor[1], trainer.device,
                              settings.knn_k, settings.knn_t,
                              trainer.config.simclr.precision), 5)


def _final_results(trainer: ContrastiveTrainer, history: list[dict[str, Any]],
                   monitor: tuple[LabeledImages, LabeledImages],
                   provenance: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    config = trainer.config
    encoder_path = out_dir / "encoder.safetensors"
    sha = save_encoder(trainer.model.encoder, encoder_path,
                       {"config_hash": pretrain_hash(config),
                        "pretrain": config.model_dump(mode="json")})
    final: dict[str, Any] = {"knn_accuracy": history[-1].get("knn_accuracy") if history
                             else None}
    if final["knn_accuracy"] is None:
        final["knn_accuracy"] = _knn(trainer, monitor)
    if config.monitor.probe is not None:
        final["linear_probe_accuracy"] = round(linear_probe_accuracy(
            trainer.model.encoder, monitor[0], monitor[1], trainer.device,
            config.monitor.probe, config.seed, config.simclr.precision), 5)
    seconds = sum(float(h["seconds"]) for h in history)
    trained = sum(float(h["seconds"]) * float(h["images_per_second"]) for h in history)
    return {"schema": RESULTS_SCHEMA, "kind": f"pretrain-{config.simclr.method}", "name": config.name,
            "config": config.model_dump(mode="json"), "config_hash": pretrain_hash(config),
            "history": history, "final": final,
            "encoder": {"file": encoder_path.name, "arch": trainer.model.encoder.name,
                        "sha256": sha},
            "train_seconds": round(seconds, 2),
            "images_per_second": round(trained / seconds, 2) if seconds else None,
            "monitor": {"dataset": config.monitor_dataset(),
                        "bank": int(monitor[0].labels.numel()),
                        "test": int(monitor[1].labels.numel())},
            "provenance": provenance, "world_size": trainer.context.world_size,
            "environment": environment(trainer.device)}
