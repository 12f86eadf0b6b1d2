"""report.md of the `corruptencoder` experiment: the table next to the paper's, the
trigger/object pair counts, ASR under enlarged triggers, and the paper's claims checked
against the measured rows. Works on results.json dicts only (rows with fractions)."""

from __future__ import annotations

from typing import Any

from sslbackdoor.attacks.crop_pairs import PairCriteria
from sslbackdoor.report import markdown_table, percent

BASELINES = ("ssl-backdoor", "poisonedencoder", "ctrl")

METHOD_NAMES = {"clean": "clean", "corruptencoder": "CorruptEncoder",
                "corruptencoder+": "CorruptEncoder+", "ssl-backdoor": "SSL-Backdoor",
                "poisonedencoder": "PoisonedEncoder", "ctrl": "CTRL"}

# CorruptEncoder (CVPR 2024), ImageNet100-A → ImageNet100-B, 0.5% poisons, 3 references.
PAPER_CA_ASR: dict[str, tuple[float, float]] = {
    "clean": (61.2, 0.4), "corruptencoder": (61.6, 92.9), "corruptencoder+": (61.7, 99.5),
    "poisonedencoder": (61.1, 35.5), "ssl-backdoor": (61.3, 14.3)}
PAPER_POISON_EPOCHS = 650 * 200  # ImageNet100-A poisons × MoCo-v2 epochs in the paper

def find_row(rows: list[dict[str, Any]], method: str, localized: bool) -> dict[str, Any] | None:
    """The row of `method` with or without localized cropping, None if it was not run."""
    return next((r for r in rows if r["method"] == method
                 and bool(r["localized_crop"]) == localized), None)


def _points(value: float) -> float:
    """A fraction in [0, 1] as percentage points, rounded as the report prints them."""
    return round(100 * float(value), 2)


def poisoning_findings(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's claims checked against measured rows (fractions `ca`, `asr` per
    `method` and `localized_crop`), one Markdown bullet each; claims whose methods are
    missing from the rows are skipped."""
    lines: list[str] = []
    attack, clean = find_row(rows, "corruptencoder", False), find_row(rows, "clean", False)
    baselines = [row for method in BASELINES if (row := find_row(rows, method, False))]
    if attack is not None and baselines:
        best = max(baselines, key=lambda r: float(r["asr"]))
        asr, base = _points(attack["asr"]), _points(best["asr"])
        lines.append(
            f"- {_verdict(asr >= base + 20)}: CorruptEncoder's ASR is at least 20 points above "
            f"the best baseline's — measured {asr:.2f} vs {base:.2f} "
            f"({METHOD_NAMES[best['method']]}), a margin of {asr - base:+.2f} points "
            f"(paper: 92.9 vs 35.5, PoisonedEncoder).")
        lines += _enlarged_claim(attack, baselines)

    def within(claim: str, metric: str, points: float, attacked: dict[str, Any] | None,
               reference: dict[str, Any] | None, paper: str = "") -> None:
        """A claim that the attacked encoder's metric is within `points` of the clean one's."""
        if attacked is None or reference is None:
            return
        ours, theirs = _points(attacked[metric]), _points(reference[metric])
        lines.append(f"- {_verdict(abs(ours - theirs) <= points)}: {claim} — measured "
                     f"{ours:.2f} vs {theirs:.2f} ({ours - theirs:+.2f}{paper}).")

    within("CorruptEncoder's CA is within 1 point of the clean encoder's", "ca", 1,
           attack, clean, "; paper: 61.6 vs 61.2")
    within("with localized cropping CorruptEncoder's ASR is within 5 points of the clean "
           "encoder's (the defense works)", "asr", 5, find_row(rows, "corruptencoder", True),
           find_row(rows, "clean", True))
    lines += _defense_claim(rows)
    if attack is not None and clean is not None:
        asr, clean_asr = _points(attack["asr"]), _points(clean["asr"])
        if abs(asr - clean_asr) <= 5:
            lines.append(
                f"- **Caveat**: the backdoor was not learned at this scale — CorruptEncoder's "
                f"ASR ({asr:.2f}) is within 5 points of the clean encoder's ({clean_asr:.2f}), "
                f"so a defense that \"holds\" above has nothing to remove.{_pairs_note(attack)}"
                f"{_enlarged_note(attack, clean)}")
    return lines


def _verdict(holds: bool) -> str:
    return "**Holds**" if holds else "**Does not hold**"


def _strongest_enlarged(row: dict[str, Any]) -> tuple[str, float] | None:
    """(trigger px, ASR points) of a row's highest enlarged-trigger ASR; None if unmeasured."""
    measured = row.get("asr_enlarged") or {}
    if not measured:
        return None
    px = max(measured, key=lambda size: (float(measured[size]), -int(size)))
    return px, _points(measured[px])


def _enlarged_claim(attack: dict[str, Any], baselines: list[dict[str, Any]]) -> list[str]:
    """The paper's ranking checked again at the enlarged trigger size where each backdoor
    shows most (patch baselines only: CTRL's trigger has no size)."""
    ours = _strongest_enlarged(attack)
    theirs = [(row, best) for row in baselines if (best := _strongest_enlarged(row))]
    if ours is None or not theirs:
        return []
    row, (px, base) = max(theirs, key=lambda item: item[1][1])
    return [f"- {_verdict(ours[1] >= base + 20)}: with enlarged test triggers (the section "
            f"above) CorruptEncoder's highest ASR is at least 20 points above the best "
            f"baseline's — measured {ours[1]:.2f} ({ours[0]} px) vs {base:.2f} "
            f"({METHOD_NAMES[row['method']]}, {px} px)."]


def _excess(row: dict[str, Any], clean: dict[str, Any]) -> tuple[float, str] | None:
    """Largest enlarged-trigger ASR excess over the clean row (points) and its size."""
    shared = sorted(set(row.get("asr_enlarged", {})) & set(clean.get("asr_enlarged", {})), key=int)
    if not shared:
        return None
    excess, size = max((_points(row["asr_enlarged"][px]) - _points(clean["asr_enlarged"][px]),
                        int(px)) for px in shared)
    return round(excess, 2), str(size)


def _defense_claim(rows: list[dict[str, Any]]) -> list[str]:
    """Localized cropping judged on the enlarged triggers, where backdoors too weak for the
    table show: every attacked row's excess over the clean encoder, with and without it."""
    worst: dict[bool, tuple[float, str, str]] = {}
    for localized in (False, True):
        clean = find_row(rows, "clean", localized)
        attacked = [row for row in rows if row["method"] != "clean"
                    and bool(row["localized_crop"]) == localized]
        excesses = [(*excess, METHOD_NAMES[row["method"]]) for row in attacked
                    if clean is not None and (excess := _excess(row, clean)) is not None]
        if excesses:
            worst[localized] = max(excesses)
    if True not in worst:
        return []
    points, px, name = worst[True]
    without = ("" if False not in worst else
               f"; without it: {worst[False][0]:+.2f} ({worst[False][2]}, {worst[False][1]} px)")
    return [f"- {_verdict(points <= 5)}: with localized cropping no method's enlarged-trigger "
            f"ASR exceeds the clean encoder's by more than 5 points — largest excess "
            f"{points:+.2f} ({name}, {px} px){without}."]


def _enlarged_note(attack: dict[str, Any], clean: dict[str, Any]) -> str:
    """Whether an enlarged trigger shows a weak association: the size where the attack's
    ASR exceeds the clean encoder's most, and whether by more than 5 points."""
    excess = _excess(attack, clean)
    if excess is None:
        return ""
    points, px = excess
    asr, clean_asr = _points(attack["asr_enlarged"][px]), _points(clean["asr_enlarged"][px])
    verdict = ("so a weak trigger → target association was learned" if points > 5
               else "so no association of more than 5 points shows even then")
    return (f" With the trigger enlarged to {px} px its ASR is {asr:.2f} vs the clean "
            f"encoder's {clean_asr:.2f}, {verdict}.")


def _pairs_note(row: dict[str, Any]) -> str:
    pairs = row.get("attack_pairs")
    if pairs is None:
        return ""
    nested = pairs.get("expected_nested_pairs")
    nested_note = "" if nested is None else f" and {nested:.1f} nested"
    return (f" Pre-training drew an expected {pairs['expected_pairs']:.1f} split trigger/object "
            f"positive pairs{nested_note} in all (the section above).")


def method_label(simclr: dict[str, Any]) -> str:
    """SimCLR or MoCo-v2, from the pre-training config's `method` (SimCLR if absent)."""
    return {"moco-v2": "MoCo-v2"}.get(str(simclr.get("method", "simclr")), "SimCLR")


def render_poisoning_report(results: dict[str, Any]) -> str:
    config = results["config"]
    rows = []
    for method in config["methods"]:
        cells = [method]
        for localized in config["localized_crop"]:
            row = find_row(results["rows"], method, localized)
            cells += ["–", "–"] if row is None else [percent(row["ca"]), percent(row["asr"])]
        paper = PAPER_CA_ASR.get(method)
        cells += [f"{paper[0]:.1f}", f"{paper[1]:.1f}"] if paper else ["–", "–"]
        rows.append(cells)
    header = ["method"]
    for localized in config["localized_crop"]:
        suffix = " (localized crop)" if localized else ""
        header += [f"CA{suffix}", f"ASR{suffix}"]
    header += ["paper CA", "paper ASR"]
    simclr = config["simclr"]
    epochs = f"{simclr['epochs']} epoch{'' if simclr['epochs'] == 1 else 's'}"
    scale = (f"Scale: {method_label(simclr)} `{simclr['arch']}` {epochs} "
             f"(batch {simclr['batch_size']}) on {results['clean_images']} clean + "
             f"{results['poison_count']} poisoned images ({100 * config['poison_ratio']:.2f}%), "
             f"{config['image_size']} px, {config['trigger_size']} px trigger; downstream "
             f"{config['downstream']['dataset']} classes {config['downstream']['classes']} "
             f"(target {config['downstream']['target_class']}, absent from pre-training), "
             f"linear probe ({config['downstream'].get('probe', {}).get('kind', 'linear')}); "
             f"device "
             f"{results['environment']['device']}; "
             f"{results['seconds']:.0f} s in all. Paper: ImageNet100-A → ImageNet100-B, "
             f"MoCo-v2 ResNet-18, 200 epochs, 0.5% poisons, GPUs.")
    pairs = attack_pairs_section(results["rows"])
    enlarged = enlarged_trigger_section(results["rows"], config["trigger_size"])
    scales = view_scale_section(results["rows"], results.get("official_view_trigger_scale"))
    findings = poisoning_findings(results["rows"]) or ["- No claim can be checked: the rows "
                                                       "lack the methods they compare."]
    return "\n\n".join([
        f"# {results['name']}: CorruptEncoder and baselines (percent)", scale,
        "ASR excludes test inputs of the target class; test images are Resize + CenterCrop "
        "of the native image and the trigger is pasted at a random place in the central "
        "band of each. Pre-training images and poisons keep their native size; views are "
        "cut from them as they are." + _ctrl_note(results["rows"]),
        markdown_table(header, rows), *scales, *pairs, *enlarged,
        "## Findings (measured here)",
        "\n".join(findings)]) + "\n"


def view_scale_section(rows: list[dict[str, Any]], official: dict[str, float] | None
                       ) -> list[str]:
    """The trigger's side in the training views ÷ its side on a test image, per patch row,
    beside the official pipeline's value (empty for results written before it existed)."""
    measured = [row for row in rows if row.get("view_trigger_scale", {}).get("median")]
    if not measured:
        return []

    def cells(scale: dict[str, float]) -> list[str]:
        return [f"{scale['p10']:.2f}", f"{scale['median']:.2f}", f"{scale['p90']:.2f}",
                f"{100 * scale['views_with_trigger']:.0f}"]

    table = [[METHOD_NAMES[row["method"]], "localized" if row["localized_crop"] else "standard",
              *cells(row["view_trigger_scale"])] for row in measured]
    if official and official.get("median"):
        table.append(["official pipeline", "standard", *cells(official)])
    return ["## Trigger size in training views ÷ on test images",
            "From this run's own crop boxes on its poisons at their native size: the side of "
            "the trigger in the views that hold ≥ 90% of it, over its side on a test image "
            "(10th, 50th, 90th percentile), and the share of views holding it. The official "
            "pipeline's row uses its parameters (40 px trigger on 684 × 300 canvases, "
            "RandomResizedCrop(224, scale 0.2–1), 40 px on 224 px test images). Above 1 the "
            "encoder learns a trigger larger than a test input shows.",
            markdown_table(["method", "crop", "p10", "median", "p90", "views with it (%)"],
                           table)]


def attack_pairs_section(rows: list[dict[str, Any]]) -> list[str]:
    """A report section on the trigger/object positive pairs of the CorruptEncoder rows
    (empty when no row has them, e.g. results written before they were counted)."""
    counted = [row for row in rows if "attack_pairs" in row]
    if not counted:
        return []
    criteria = PairCriteria()
    table = [[METHOD_NAMES[row["method"]], "localized" if row["localized_crop"] else "standard",
              str(row["attack_pairs"]["triggered_poisons"]), *_pair_cells(row["attack_pairs"])]
             for row in counted]
    return ["## Trigger/object pairs (why ASR is what it is)",
            "The paper's analysis: CorruptEncoder plants its backdoor through split pairs, "
            f"whose one view holds the trigger (≥ {criteria.trigger_in:.0%} of it) without "
            f"the object and the other holds the object (≥ {criteria.object_in:.0%}) without "
            f"the trigger (≤ {criteria.other_out:.0%} of the other box each). Nested pairs "
            "pair the same trigger-only view with a view holding the object and the trigger "
            "both; localized cropping still draws them. Sampled from this run's crop policy "
            "and the poisons' boxes: the chance per poison and epoch, the expected pairs over "
            "the whole run, and the same chance applied to the paper's 650 poisons × 200 "
            "epochs.",
            markdown_table(["method", "crop", "triggered poisons", "split: chance per epoch (%)",
                            "split: expected (this run)", "split: at the paper's scale",
                            "nested: chance per epoch (%)", "nested: expected (this run)"],
                           table)]


def _pair_cells(pairs: dict[str, float]) -> list[str]:
    """Split-pair chance, expected count and paper-scale count; the nested-pair chance and
    count ("–" in results written before nested pairs were counted)."""
    nested = pairs.get("nested_probability")
    return [f"{100 * pairs['probability']:.3f}", f"{pairs['expected_pairs']:.1f}",
            f"{PAPER_POISON_EPOCHS * pairs['probability']:.0f}",
            "–" if nested is None else f"{100 * nested:.3f}",
            "–" if nested is None else f"{pairs['expected_nested_pairs']:.1f}"]




def _ctrl_note(rows: list[dict[str, Any]]) -> str:
    clean = find_row(rows, "clean", False)
    if not any(row["method"] == "ctrl" for row in rows):
        return ""
    level = ("" if clean is None or "asr_ctrl" not in clean else
             f" (the clean encoder's ASR under it: {_points(clean['asr_ctrl']):.2f})")
    return (f" CTRL's rows are attacked with CTRL's own frequency trigger, made with the "
            f"settings of its poisons{level}; every other row with the patch.")


def enlarged_trigger_section(rows: list[dict[str, Any]], trigger_size: int) -> list[str]:
    """ASR of every patch-trigger row with the test trigger enlarged (empty when no row
    has such measurements, e.g. results written before they were made)."""
    measured = [row for row in rows if row.get("asr_enlarged")]
    if not measured:
        return []
    sizes = sorted({px for row in measured for px in row["asr_enlarged"]}, key=int)
    table = [[METHOD_NAMES[row["method"]], "localized" if row["localized_crop"] else "standard",
              percent(row["asr"]),
              *(percent(row["asr_enlarged"][px]) if px in row["asr_enlarged"] else "–"
                for px in sizes)]
             for row in measured]
    return ["## ASR with enlarged test triggers (a weak backdoor, or none?)",
            "The same trigger pattern, every pixel repeated, pasted the same way into the same "
            "test images. A backdoor too weak to outweigh the image at the trained size shows "
            "up as an ASR that grows with the trigger faster than the clean encoder's.",
            markdown_table(["method", "crop", f"ASR ({trigger_size} px)",
                            *(f"ASR ({px} px)" for px in sizes)], table)]
