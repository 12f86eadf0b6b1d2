"""results.json → report.md (tables next to the paper's figures) and plots."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from sslbackdoor.engine import atomic_write
from sslbackdoor.metrics import empirical_cdf
from sslbackdoor.paper import (
    BADENCODER_CLIP_MLP,
    BADENCODER_CLIP_ZERO_SHOT,
    BADENCODER_IMAGENET,
    BADENCODER_SOURCE,
    PaperRow,
)

CONVENTION_NOTE = ("`ASR` and `ASR-B` exclude test inputs whose true label is the target "
                   "(CorruptEncoder's convention); `ASR (all)` and `ASR-B (all)` count every "
                   "triggered test input, as the BadEncoder paper and its reference code do.")


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def plot_similarity_cdfs(similarities: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Fig. 4 analogue: CDF of cos(triggered input, reference), clean vs backdoored."""
    count = len(similarities)
    figure, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.4), squeeze=False)
    for axis, (task, series) in zip(axes[0], similarities.items(), strict=True):
        for label, style in (("clean", "--"), ("backdoored", "-")):
            values, fractions = empirical_cdf(torch.tensor(series[label]))
            axis.plot(values.numpy(), fractions.numpy(), style, label=f"{label} encoder")
        axis.set_title(task)
        axis.set_xlabel("cosine similarity to reference")
        axis.set_ylabel("CDF")
        axis.set_xlim(-0.2, 1.0)
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def paper_table(rows: Sequence[PaperRow]) -> str:
    """The paper's figures; its ASR-B and ASR count every triggered input (our `(all)`)."""
    return markdown_table(["setting (paper)", "CA", "BA", "ASR-B (all)", "ASR (all)"],
                          [[r.setting, f"{r.ca:.2f}", f"{r.ba:.2f}", f"{r.asr_b:.2f}",
                            f"{r.asr:.2f}"] for r in rows])


def scale_line(results: dict[str, Any]) -> str:
    config = results["config"]
    attack = config["attack"]
    shadow = sum(s["images"] for s in results["provenance"]["shadow"])
    env = results["environment"]
    probe = config["downstream"]["probe"]
    return (f"Scale: encoder `{config['encoder']['arch']}` ({config['encoder']['weights']}), "
            f"{config['image_size']}×{config['image_size']} px, {shadow} shadow images, "
            f"{attack['epochs']} attack epochs (batch {attack['batch_size']}, lr {attack['lr']}), "
            f"{probe['kind']} probe {probe['epochs']} epochs (batch {probe['batch_size']}, "
            f"lr {probe['lr']}); device {env['device']} ({env['threads']} threads), "
            f"torch {env['torch']}; seed {results['seed']}.")


def paper_section(results: dict[str, Any]) -> list[str]:
    """The paper's case study closest to this run: CLIP for clip: encoders, else ImageNet."""
    if str(results["config"]["encoder"]["arch"]).startswith("clip:"):
        return [f"{BADENCODER_SOURCE}, CLIP case study (CLIP RN50 image tower, 224 px, CIFAR10 "
                f"as shadow set, 200 epochs, GPUs), multi-shot MLP classifiers.",
                paper_table(BADENCODER_CLIP_MLP)]
    return [f"{BADENCODER_SOURCE}, public ImageNet encoder case study (SimCLR ResNet50, 224 px, "
            f"1% of ImageNet as shadow set, 200 epochs, GPUs). Our row differs in encoder, data, "
            f"resolution and epochs, stated above; compare the pattern (BA ≈ CA, ASR ≫ ASR-B), "
            f"not the digits.", paper_table(BADENCODER_IMAGENET)]


# Experiment kinds with a report of their own: module and function, imported when needed.
KIND_RENDERERS: dict[str, tuple[str, str]] = {
    "grid": ("sslbackdoor.grid_report", "render_grid_report"),
    "corruptencoder": ("sslbackdoor.attacks.poisoning_report", "render_poisoning_report"),
    "defenses": ("sslbackdoor.defenses.experiment", "render_defenses_report"),
}


def render_report(results: dict[str, Any]) -> str:
    """report.md of any experiment's results.json (BadEncoder's unless its kind has its own)."""
    renderer = KIND_RENDERERS.get(str(results.get("kind")))
    if renderer is not None:
        module, function = renderer
        rendered: str = getattr(importlib.import_module(module), function)(results)
        return rendered
    rows = [[t["task"], "–" if t["target_class"] is None else f"{t['target_class']} ({t['target_name']})",
             str(t["test_size"]), percent(t["ca"]), percent(t["ba"]), percent(t["asr_b"]),
             percent(t["asr"]), percent(t.get("asr_b_all")), percent(t["asr_all"])]
            for t in results["tasks"]]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items())
    parts = [
        f"# {results['name']}: BadEncoder results",
        scale_line(results),
        "## Results (percent)",
        CONVENTION_NOTE,
        markdown_table(["task", "target class", "test inputs", "CA", "BA", "ASR-B", "ASR",
                        "ASR-B (all)", "ASR (all)"], rows),
        "## The paper's figures for the analogous setting",
        "The paper counts every triggered test input, target class included: compare its "
        "ASR-B and ASR with the `(all)` columns above.",
        *paper_section(results),
        "## Provenance",
        _provenance_lines(results),
        f"Stage timings: {timing}. Attack throughput: "
        f"{results['attack']['shadow_images_per_second']:.1f} shadow images/s.",
    ]
    if results.get("zero_shot"):
        parts += ["## Zero-shot classifiers (percent)",
                  "Built from the CLIP text tower and prompt templates; no training.",
                  markdown_table(["task", "target class", "CA", "BA", "ASR-B", "ASR",
                                  "ASR-B (all)", "ASR (all)"],
                                 [[z["task"], f"{z['target_class']} ({z['target_name']})",
                                   percent(z["ca"]), percent(z["ba"]), percent(z["asr_b"]),
                                   percent(z["asr"]), percent(z.get("asr_b_all")),
                                   percent(z["asr_all"])]
                                  for z in results["zero_shot"]]),
                  paper_table(BADENCODER_CLIP_ZERO_SHOT)]
    if "figures" in results:
        parts += ["## Fig. 4 analogue", "Cosine similarity between the reference feature and "
                  "the features of triggered test inputs, clean vs backdoored encoder.",
                  f"![similarity CDFs]({results['figures']['similarity_cdf']})"]
    return "\n\n".join(parts) + "\n"


def _provenance_lines(results: dict[str, Any]) -> str:
    provenance = results["provenance"]
    encoder = provenance["encoder"]
    lines = [f"- encoder: `{encoder['arch']}` weights {encoder['weights']}"
             + (f" from {encoder['file']}" if "file" in encoder else "")
             + (f", sha256 {encoder['sha256']}" if "sha256" in encoder else "")]
    lines += [f"- shadow: {s['images']} images from {s['dataset']}/{s['split']} — {s['source']}"
              for s in provenance["shadow"]]
    lines += [f"- references for target {i}: {r['dataset']}/{r['split']} class {r['label']} "
              f"indices {r['indices']} — {r['source']}"
              for i, r in enumerate(provenance["references"])]
    lines += [f"- task {name}: train {p['train']}; test {p['test']}"
              for name, p in provenance["tasks"].items()]
    return "\n".join(lines)
