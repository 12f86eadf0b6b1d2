"""Triggered test inputs of the poisoning experiment, one set per kind of trigger.

* The patch trigger (CorruptEncoder, CorruptEncoder+, SSL-Backdoor, PoisonedEncoder):
  pasted at a random place in the central band of each test image, as the paper tests.
* The same patch enlarged k× (nearest-neighbour, so the same pattern): a diagnostic. An
  encoder that learned a weak trigger → target association shows it only once the
  trigger covers more of the image; one that learned nothing stays at the clean level.
* CTRL's frequency trigger, with exactly the settings of the CTRL poisons: a CTRL encoder
  can only be judged by the trigger it was poisoned with.

Every set holds the same test images in the same order, so ASRs are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sslbackdoor.attacks.poisoning_baselines import BaselineConfig, ctrl_trigger, paste_central


def trigger_kind(method: str) -> str:
    """"ctrl" for CTRL, whose poisons carry its frequency trigger; "patch" for every other."""
    return "ctrl" if method == "ctrl" else "patch"


@dataclass
class TriggeredTestSets:
    """uint8 [N,3,S,S] test images with a trigger: `patch` at its own size, `enlarged`
    (trigger side in px → images) and `ctrl` (None when no CTRL run needs it)."""

    patch: torch.Tensor
    enlarged: dict[int, torch.Tensor]
    ctrl: torch.Tensor | None

    def for_method(self, method: str) -> torch.Tensor:
        """The set a method's encoder is attacked with (its own trigger)."""
        if trigger_kind(method) == "patch":
            return self.patch
        if self.ctrl is None:
            raise ValueError("no CTRL test set was made")
        return self.ctrl


def triggered_test_images(images: torch.Tensor, trigger: np.ndarray, seed: int) -> torch.Tensor:
    """The trigger [s,s,3] pasted at a random place in the central band of every image of
    uint8 [N,3,H,W]; the places depend only on `seed` and the sizes."""
    rng = np.random.default_rng(seed)
    stamped = [paste_central(image.permute(1, 2, 0).numpy(), trigger, rng)[0] for image in images]
    return torch.from_numpy(np.stack(stamped)).permute(0, 3, 1, 2).contiguous()


def enlarge_trigger(trigger: np.ndarray, factor: int) -> np.ndarray:
    """[s,s,3] → [k·s,k·s,3], every pixel repeated k×k times."""
    return np.repeat(np.repeat(trigger, factor, axis=0), factor, axis=1)


def ctrl_test_images(images: torch.Tensor, settings: BaselineConfig) -> torch.Tensor:
    """CTRL's frequency trigger, as `settings` applies it to the poisons, on uint8 [N,3,H,W]."""
    stamped = [ctrl_trigger(image.permute(1, 2, 0).numpy(), settings.ctrl_magnitude,
                            settings.ctrl_window, settings.ctrl_positions) for image in images]
    return torch.from_numpy(np.stack(stamped)).permute(0, 3, 1, 2).contiguous()


def triggered_test_sets(images: torch.Tensor, trigger: np.ndarray, scales: list[int],
                        ctrl: BaselineConfig | None, seed: int) -> TriggeredTestSets:
    """Every triggered version of the test images [N,3,H,W] an experiment evaluates."""
    enlarged = {trigger.shape[0] * k: triggered_test_images(images, enlarge_trigger(trigger, k),
                                                            seed)
                for k in scales}
    return TriggeredTestSets(patch=triggered_test_images(images, trigger, seed),
                             enlarged=enlarged,
                             ctrl=None if ctrl is None else ctrl_test_images(images, ctrl))
