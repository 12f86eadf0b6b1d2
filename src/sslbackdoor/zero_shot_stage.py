"""`sslbackdoor evaluate --zero-shot`: zero-shot CA/BA/ASR-B/ASR of a (suspect) CLIP image
encoder, with the text tower of a clean CLIP model; writes results.json.

The classifiers themselves are `sslbackdoor.downstream.zeroshot`'s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sslbackdoor.data.triggers import Trigger
from sslbackdoor.downstream.evaluate import TaskData, check_target_class
from sslbackdoor.downstream.zeroshot import (
    evaluate_zero_shot,
    normalise_templates,
    templates_for,
    zero_shot_class_names,
    zero_shot_weights,
)
from sslbackdoor.errors import UserInputError


def _clip_arch(encoder_path: Path, arch: str | None) -> str:
    if arch is None and encoder_path.suffix == ".safetensors" and encoder_path.is_file():
        from sslbackdoor.models.checkpoints import read_safetensors_metadata

        arch = read_safetensors_metadata(encoder_path).get("encoder")
    if not arch or not arch.startswith("clip:"):
        raise UserInputError(f"--zero-shot needs a CLIP encoder: pass --arch clip:ARCH "
                             f"(e.g. clip:RN50), got {arch!r}")
    return arch


def _load_test_task(name: str, image_size: int, test_limit: int | None,
                    seed: int) -> TaskData:
    from sslbackdoor.data.datasets import load_dataset
    from sslbackdoor.data.sources import dataset_tensors

    test = load_dataset(name, "test", image_size=image_size, limit=test_limit, seed=seed)
    images, labels = dataset_tensors(test)
    empty = torch.empty(0)
    return TaskData(name, list(test.classes), empty, empty, images, labels,
                    {"test": test.provenance})


def run_zero_shot_stage(encoder_path: Path, task_names: list[str], out_dir: Path, *,
                        arch: str | None = None, clean: str | None = None,
                        clip_weights: str | None = None, templates: Sequence[str] = (),
                        target_class: int | None = None, trigger_size: int = 50,
                        image_size: int = 224, test_limit: int | None = None, seed: int = 0,
                        device: str = "auto") -> dict[str, Any]:
    """Zero-shot CA/BA/ASR-B/ASR of a (suspect) CLIP image encoder; writes results.json.

    The text tower comes from `clip_weights` (default: `clean`), a full CLIP weights file or
    an open_clip tag. The trigger (a white square at the bottom-right) applies to the first
    task, whose target class is `target_class`.
    """
    from sslbackdoor.data.triggers import TriggerSpec
    from sslbackdoor.engine import (
        atomic_write_text,
        environment,
        prepare_module,
        resolve_device,
        seed_everything,
    )
    from sslbackdoor.experiment import RESULTS_SCHEMA
    from sslbackdoor.models.checkpoints import encoder_provenance, load_encoder
    from sslbackdoor.models.clip import load_clip
    from sslbackdoor.run_lock import output_lock

    arch = _clip_arch(Path(encoder_path), arch)
    text_source = clip_weights or clean
    if text_source is None:
        raise UserInputError("--zero-shot needs the CLIP text tower: pass --clip-weights "
                             "FILE_OR_TAG (or --clean with the full CLIP weights file)")
    normalise_templates(templates)
    torch_device = resolve_device(device)
    seed_everything(seed)
    bundle = load_clip(arch, text_source)
    suspect = load_encoder(encoder_path, arch)
    if image_size != suspect.default_image_size:
        raise UserInputError(f"{arch} takes {suspect.default_image_size}×"
                             f"{suspect.default_image_size} images; pass --image-size "
                             f"{suspect.default_image_size}")
    # The text source's own image tower is the clean encoder when they are the same file.
    reference = (bundle.image_encoder if clean == text_source
                 else load_encoder(clean, arch) if clean else None)
    bundle.model.to(torch_device)
    suspect = prepare_module(suspect, torch_device)
    if reference is not None:
        reference = prepare_module(reference, torch_device)
    trigger = Trigger.from_spec(TriggerSpec(size=trigger_size), image_size)
    entries = []
    for index, name in enumerate(task_names):
        task = _load_test_task(name, image_size, test_limit, seed)
        targeted = index == 0 and target_class is not None
        if targeted:
            check_target_class(name, task.classes, target_class)  # type: ignore[arg-type]
        used = templates_for(name, templates)
        weights = zero_shot_weights(bundle, zero_shot_class_names(name, task.classes), used)
        scores = evaluate_zero_shot(reference, suspect, weights, task.test_images,
                                    task.test_labels, torch_device,
                                    trigger=trigger if targeted else None,
                                    target_class=target_class if targeted else None)
        entries.append({"task": name, "target_class": target_class if targeted else None,
                        **scores, "templates": used, "test_size": len(task.test_labels),
                        "provenance": task.provenance})
    results = {"schema": RESULTS_SCHEMA, "kind": "evaluate-zero-shot", "seed": seed,
               "encoder": encoder_provenance(encoder_path, arch),
               "clean_encoder": (bundle.provenance if clean == text_source
                                 else encoder_provenance(clean, arch) if clean else None),
               "text_tower": bundle.provenance, "tasks": entries,
               "environment": environment(torch_device)}
    with output_lock(out_dir):
        atomic_write_text(Path(out_dir) / "results.json", json.dumps(results, indent=2))
    return results
