"""Grid results.json → report.md laid out like the paper's tables, plus sweep figures.

Rows are "pre-train → target" (Tables I/II), columns CA/BA/ASR-B/ASR with the paper's
numbers for the analogous setting beside them; sweeps get a table and a PNG of ASR and BA
against the swept value.

Two ASR conventions (metrics.py): `asr`/`asr_b` exclude test inputs of the target class,
`asr_all`/`asr_b_all` count every triggered test input, as the BadEncoder paper's tables and
its reference code do. Both are shown; the paper's figures sit beside the `(all)` columns and
the Findings judge the paper's bar on them (`paper_asr`). A results.json written before the
`(all)` fields existed renders with "–" there and is judged on `asr`, which the report says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sslbackdoor.engine import atomic_write
from sslbackdoor.paper import (
    BADENCODER_CIFAR_STL,
    BADENCODER_CLIP_MLP,
    BADENCODER_IMAGENET,
    BADENCODER_SHADOW_DISTRIBUTION_ASR,
    BADENCODER_SOURCE,
    PaperRow,
)
from sslbackdoor.report import markdown_table, percent

PAPER_ROWS: dict[str, PaperRow] = {
    row.setting.replace(" (MLP)", ""): row
    for row in (*BADENCODER_CIFAR_STL, *BADENCODER_IMAGENET, *BADENCODER_CLIP_MLP)}
METRICS = ("ca", "ba", "asr_b", "asr", "asr_b_all", "asr_all")
METRIC_HEADER = ["CA", "BA", "ASR-B", "ASR", "ASR-B (all)", "ASR (all)"]
SWEEP_FIGURE = "sweep.png"
ASR_BAR = 0.95  # the paper: ASR ≥ 95% ...
BA_SLACK = 0.01  # ... with BA ≥ CA − 1 point
RISE_SLACK = 0.01  # a sweep "rises" if no step falls by more than this


class SweepAxis(NamedTuple):
    noun: str  # in prose: "ASR rises with <noun>"
    unit: str  # table column and plot axis


SWEEP_AXES = {"shadow-size": SweepAxis("shadow-set size", "shadow images"),
              "trigger-size": SweepAxis("trigger size", "trigger side (px)")}


def target_entry(results: dict[str, Any], cell: dict[str, Any], index: int) -> dict[str, Any]:
    """The task result of target `index` (into config.targets) in a cell."""
    task = results["config"]["targets"][index]["task"]
    return next(t for t in cell["tasks"] if t["task"] == task)


def paper_row(results: dict[str, Any], encoder: str, index: int) -> PaperRow | None:
    paper_encoder = next((e["paper"] for e in results["encoders"] if e["name"] == encoder), None)
    paper_target = results["config"]["targets"][index].get("paper")
    if not paper_encoder or not paper_target:
        return None
    return PAPER_ROWS.get(f"{paper_encoder} → {paper_target}")


def _label(results: dict[str, Any], encoder: str, index: int) -> str:
    target = results["config"]["targets"][index]
    return f"{encoder} → {target['task']}"


def _target_name(entry: dict[str, Any]) -> str:
    return f"{entry['target_class']} ({entry['target_name']})"


def _metrics(entry: dict[str, Any]) -> list[str]:
    return [percent(entry.get(m)) for m in METRICS]


def paper_asr(entry: dict[str, Any]) -> float:
    """ASR in the paper's convention (every triggered input, target class included); an
    entry from before `asr_all` existed falls back to the target-excluded `asr`."""
    value = entry.get("asr_all")
    return float(entry["asr"] if value is None else value)


def convention_line(results: dict[str, Any]) -> str:
    """Which ASR the Findings judged: the paper's convention, unless the file predates it."""
    entries = [entry for _, entry in _attacked_pairs(results)]
    if entries and all(entry.get("asr_all") is not None for entry in entries):
        return ("- ASR here is the paper's: over every triggered test input, target class "
                "included (`ASR (all)`); the target-excluded `ASR` is in the tables beside it.")
    return ("- ASR here excludes target-class inputs: this results.json predates the "
            "all-inputs ASR, so the paper's bar is judged on a stricter quantity than its own.")


def _paper_metrics(row: PaperRow | None) -> list[str]:
    if row is None:
        return ["–"] * 5
    return [row.setting, f"{row.ca:.2f}", f"{row.ba:.2f}", f"{row.asr_b:.2f}", f"{row.asr:.2f}"]


def table_section(results: dict[str, Any]) -> list[str]:
    """Tables I/II: one row per (encoder, target), single-target attacks."""
    rows = []
    for cell in results["cells"]:
        if len(cell["targets"]) != 1:
            continue
        index = cell["targets"][0]
        entry = target_entry(results, cell, index)
        rows.append([_label(results, cell["encoder"], index), _target_name(entry),
                     *_metrics(entry), *_paper_metrics(paper_row(results, cell["encoder"],
                                                                 index))])
    header = ["pre-train → target", "target class", *METRIC_HEADER,
              "paper setting", "paper CA", "paper BA", "paper ASR-B (all)", "paper ASR (all)"]
    return ["## Results (percent), as in the paper's Tables I/II",
            "The paper counts every triggered test input, target class included: its ASR-B "
            "and ASR compare with our `(all)` columns.", markdown_table(header, rows)]


def multi_target_section(results: dict[str, Any]) -> list[str]:
    """Each target alone vs all targets injected at once."""
    alone = {(c["encoder"], c["targets"][0]): c for c in results["cells"]
             if len(c["targets"]) == 1}
    together = {c["encoder"]: c for c in results["cells"] if len(c["targets"]) > 1}
    rows = []
    for (encoder, index), cell in alone.items():
        single = target_entry(results, cell, index)
        joint = (target_entry(results, together[encoder], index) if encoder in together
                 else {})  # an encoder with a single target
        row = paper_row(results, encoder, index)
        rows.append([_label(results, encoder, index), _target_name(single), percent(single["ca"]),
                     percent(single["ba"]), percent(single["asr"]), percent(single.get("asr_all")),
                     percent(joint.get("ba")), percent(joint.get("asr")),
                     percent(joint.get("asr_all")), f"{row.asr:.2f}" if row else "–"])
    header = ["pre-train → target", "target class", "CA", "BA alone", "ASR alone",
              "ASR (all) alone", "BA all at once", "ASR all at once", "ASR (all) all at once",
              "paper ASR (all, alone)"]
    return ["## One target at a time vs all targets at once (percent)",
            markdown_table(header, rows)]


def sweep_section(results: dict[str, Any]) -> list[str]:
    axis = SWEEP_AXES[results["study"]]
    rows = [[label, str(x), *_metrics(entry)]
            for label, points in _sweep_series(results).items() for x, entry in points]
    parts = [f"## ASR and BA vs {axis.noun} (percent)",
             markdown_table(["pre-train → target", axis.unit, *METRIC_HEADER], rows)]
    if "sweep" in results.get("figures", {}):
        parts.append(f"![ASR and BA vs {axis.unit}]({results['figures']['sweep']})")
    return parts


def _sweep_series(results: dict[str, Any]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """label → [(swept value, task entry)], by swept value; one target per sweep cell."""
    series: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for cell in results["cells"]:
        index = cell["targets"][0]
        series.setdefault(_label(results, cell["encoder"], index), []).append(
            (int(cell["variable"]), target_entry(results, cell, index)))
    return {label: sorted(points, key=lambda point: point[0])
            for label, points in series.items()}


def shadow_distribution_section(results: dict[str, Any]) -> list[str]:
    """Table IV: which shadow set, and the paper's ASR for the analogous one."""
    kinds = {v["label"]: v.get("paper") for v in results["config"]["shadows"]}
    rows = []
    for cell in results["cells"]:
        index = cell["targets"][0]
        entry = target_entry(results, cell, index)
        paper_target = results["config"]["targets"][index].get("paper")
        paper = BADENCODER_SHADOW_DISTRIBUTION_ASR.get(paper_target or "", {}).get(
            kinds.get(cell["variable"]) or "")
        rows.append([_label(results, cell["encoder"], index), str(cell["variable"]),
                     kinds.get(cell["variable"]) or "–", str(cell.get("shadow_images", "–")),
                     *_metrics(entry), f"{paper:.2f}" if paper is not None else "–"])
    header = ["pre-train → target", "shadow set", "kind", "images", *METRIC_HEADER,
              "paper ASR (all)"]
    return ["## Shadow set distribution, as in the paper's Table IV (percent)",
            markdown_table(header, rows)]


def encoders_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for e in results["encoders"]:
        final = e.get("final") or {}
        rows.append([e["name"], e.get("paper") or "–", f"`{e['arch']}`",
                     ", ".join(e.get("data", [])) or f"given: {e['weights']}",
                     str(e.get("epochs", "–")), percent(final.get("knn_accuracy")),
                     percent(final.get("linear_probe_accuracy")),
                     _pretrain_minutes(e)])
    header = ["encoder", "paper analogue", "arch", "pre-training data", "epochs",
              "kNN acc", "linear probe acc", "minutes"]
    section = ["## Clean encoders", markdown_table(header, rows)]
    if any(e.get("shipped") for e in results["encoders"]):
        section.append("*shipped*: this pre-training (same hash) ships with the package and "
                       "was copied into the cache instead of pre-training here; its minutes "
                       "are those of the machine it was trained on. `--set "
                       "shipped_encoders=false` pre-trains here.")
    return section


def _pretrain_minutes(encoder: dict[str, Any]) -> str:
    if "train_seconds" not in encoder:
        return "–"
    minutes = f"{encoder['train_seconds'] / 60:.1f}"
    environment = encoder.get("pretrain_environment") or {}
    where = (f" on {environment['device']}, {environment['threads']} threads, "
             f"{'bf16' if environment['bf16'] else 'fp32'}" if environment else "")
    return minutes + where + (" (*shipped*)" if encoder.get("shipped") else "")


def scale_line(results: dict[str, Any]) -> str:
    config, env = results["config"], results["environment"]
    attack, probe = config["attack"], config["downstream"]["probe"]
    shadows = sorted({c.get("shadow_images") for c in results["cells"]} - {None})
    return (f"Scale: **{results['scale']}** — {config['image_size']}×{config['image_size']} px; "
            f"BadEncoder {attack['epochs']} epochs (batch {attack['batch_size']}, lr "
            f"{attack['lr']}), shadow sets of {', '.join(map(str, shadows)) or '?'} images; "
            f"downstream {probe['kind']} probe {probe['epochs']} epochs (train ≤ "
            f"{config['downstream']['train_limit'] or 'all'}, test ≤ "
            f"{config['downstream']['test_limit'] or 'all'} per task); device {env['device']} "
            f"({env['threads']} threads), torch {env['torch']}; {_seed_phrase(results)}. "
            f"The paper: ResNet18 SimCLR encoders pre-trained 1000 epochs on CIFAR10/STL10, "
            f"200 attack epochs on 50,000 shadow images, MLP probes 500 epochs, GPUs — compare "
            f"the pattern (BA ≈ CA, ASR ≫ ASR-B), not the digits, unless the scale is `paper`.")


def _seed_phrase(results: dict[str, Any]) -> str:
    attack_seed = results.get("attack_seed", results["seed"])
    if attack_seed == results["seed"]:
        return f"seed {results['seed']}"
    return f"seed {results['seed']} (pre-training), {attack_seed} (attacks and probes)"


def _attacked_pairs(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, task entry) of every attacked pair; all-at-once cells are labelled so."""
    pairs = []
    for cell in results["cells"]:
        together = " (all at once)" if len(cell["targets"]) > 1 else ""
        suffix = f" [{cell['variable']}]" if cell["variable"] not in (None, "one", "all") else ""
        for index in cell["targets"]:
            pairs.append((_label(results, cell["encoder"], index) + together + suffix,
                          target_entry(results, cell, index)))
    return pairs


def pair_findings(results: dict[str, Any]) -> list[str]:
    """The paper's headline claim, checked on every attacked pair: ASR ≥ 95% with
    BA ≥ CA − 1 point."""
    return _claim_lines(
        results, f"ASR ≥ {100 * ASR_BAR:.0f}% with BA ≥ CA − {100 * BA_SLACK:.0f} point on "
        "every attacked pair", "pairs",
        lambda e: paper_asr(e) < ASR_BAR or e["ba"] < e["ca"] - BA_SLACK,
        lambda e: f"{_asr_detail(e)}, CA {percent(e['ca'])}, BA {percent(e['ba'])}")


def _asr_detail(entry: dict[str, Any]) -> str:
    if entry.get("asr_all") is None:
        return f"ASR {percent(entry['asr'])}"
    return f"ASR (all) {percent(entry['asr_all'])}, target excluded {percent(entry['asr'])}"


def utility_findings(results: dict[str, Any]) -> list[str]:
    """The paper's clean-accuracy claim alone, BA ≥ CA − 1 point, at every swept value:
    a sweep's ASR is meant to fall short at its low end, its BA is not."""
    return _claim_lines(
        results, f"BA ≥ CA − {100 * BA_SLACK:.0f} point at every swept value", "values",
        lambda e: e["ba"] < e["ca"] - BA_SLACK,
        lambda e: f"CA {percent(e['ca'])}, BA {percent(e['ba'])}")


def _claim_lines(results: dict[str, Any], claim: str, counted: str,
                 fails: Callable[[dict[str, Any]], bool],
                 detail: Callable[[dict[str, Any]], str]) -> list[str]:
    """One verdict line for a claim over every attacked pair, then one line per failure."""
    pairs = _attacked_pairs(results)
    failing = [(label, e) for label, e in pairs if fails(e)]
    verdict = "holds" if not failing else "does not hold"
    return ([f"- {claim}: **{verdict}** ({len(pairs) - len(failing)} of {len(pairs)} "
             f"{counted})."]
            + [f"  - {label}: {detail(e)}" for label, e in failing])


def sweep_findings(results: dict[str, Any]) -> list[str]:
    """ASR should rise with the swept value (shadow size or trigger side), BA stay ≈ CA."""
    unit = SWEEP_AXES[results["study"]].noun
    lines = []
    for label, entries in _sweep_series(results).items():
        points = [(x, paper_asr(entry)) for x, entry in entries]
        curve = ", ".join(f"{x} → {100 * asr:.2f}" for x, asr in points)
        lines.append(f"- {label}: ASR {_trend_phrase(points, unit)}: {curve}; "
                     f"{_threshold_phrase(points)}.")
    return lines + utility_findings(results)


def _trend_phrase(points: list[tuple[int, float]], unit: str) -> str:
    """Rising means no step down by more than RISE_SLACK; a curve whose whole span is
    within that slack is flat, which is not the paper's rise."""
    slack = f"{100 * RISE_SLACK:.0f} point"
    asrs = [asr for _, asr in points]
    if len(asrs) < 2:
        return f"has one {unit} only, so no trend"
    if not all(b >= a - RISE_SLACK for a, b in pairwise(asrs)):
        return f"**does not rise** with {unit} (a step down by more than {slack})"
    if max(asrs) - min(asrs) <= RISE_SLACK:
        return f"**stays flat** with {unit} (all within {slack})"
    return f"rises with {unit} (no step down by more than {slack})"


def _threshold_phrase(points: list[tuple[int, float]]) -> str:
    """Where ASR first reaches the bar; a sweep that starts above it cannot show the
    paper's threshold, and saying "first at <smallest>" would read as if it had."""
    bar = f"{100 * ASR_BAR:.0f}%"
    reached = next((x for x, asr in points if asr >= ASR_BAR), None)
    if reached is None:
        return f"never ≥ {bar}"
    if reached == points[0][0]:
        return (f"already ≥ {bar} at the smallest value swept ({reached}): any threshold "
                f"lies below this range and **does not show here**")
    return f"first ≥ {bar} at {reached}"


FINDINGS = {
    "table": pair_findings,
    "multi-target": pair_findings,
    "shadow-distribution": pair_findings,
    "shadow-size": sweep_findings,
    "trigger-size": sweep_findings,
}


def findings_section(results: dict[str, Any]) -> list[str]:
    """The paper's findings for this study, checked against the measured numbers."""
    return ["## Findings (measured here, at the scale above)",
            "\n".join([*FINDINGS[results["study"]](results), convention_line(results)])]


STUDY_SECTIONS = {
    "table": table_section,
    "multi-target": multi_target_section,
    "shadow-distribution": shadow_distribution_section,
    "shadow-size": sweep_section,
    "trigger-size": sweep_section,
}


def render_grid_report(results: dict[str, Any]) -> str:
    study = results["study"]
    body = STUDY_SECTIONS[study](results)
    parts = [f"# {results['name']}: BadEncoder grid ({study})", scale_line(results),
             *encoders_section(results), *body, *findings_section(results),
             f"Paper numbers: {BADENCODER_SOURCE}. `ASR` and `ASR-B` exclude test inputs of the "
             f"target class; `ASR (all)` and `ASR-B (all)` count them, as the paper does.",
             timings_line(results)]
    return "\n\n".join(parts) + "\n"


def timings_line(results: dict[str, Any]) -> str:
    """This run's wall-clock, plus the cells' own compute: a `--resume` that reuses
    finished cells takes seconds, which alone would read as if the grid were free."""
    this_run = ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items())
    cells = results["cells"]
    if not cells or "seconds" not in cells[0]:
        return f"Timings: {this_run}."
    reused = sum(bool(c.get("reused")) for c in cells)
    own = sum(c["seconds"] for c in cells)
    return (f"Timings: this run {this_run}; the cells' own runs {own:,.0f} s in all "
            f"({reused} of {len(cells)} reused from earlier runs in this folder).")


def write_grid_figures(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Sweep studies: ASR and BA (with CA dashed) against the swept value, one line per
    encoder→target."""
    if results["study"] not in SWEEP_AXES:
        return {}
    series = {label: [(float(x), 100 * paper_asr(e), 100 * e["ba"], 100 * e["ca"])
                      for x, e in points]
              for label, points in _sweep_series(results).items()}
    plot_sweep(series, SWEEP_AXES[results["study"]].unit, out_dir / SWEEP_FIGURE)
    return {"sweep": SWEEP_FIGURE}


def plot_sweep(series: dict[str, list[tuple[float, float, float, float]]], unit: str,
               path: Path) -> None:
    """Two panels (ASR, BA) of percent vs `unit`; series: label → [(x, asr, ba, ca)], ASR
    in the paper's convention (`paper_asr`).
    CA is drawn dashed beside BA: the paper's claim is BA ≈ CA, which BA alone hides."""
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, points in series.items():
        xs, asr, ba, ca = zip(*sorted(points), strict=True)
        _line(axes[0], xs, asr, label)
        [ba_line] = _line(axes[1], xs, ba, f"{label}: BA")
        axes[1].plot(xs, ca, linestyle="--", color=ba_line.get_color(), label=f"{label}: CA")
    for axis, metric in zip(axes, ("ASR, all inputs", "BA, CA dashed"), strict=True):
        axis.set_xlabel(unit)
        axis.set_ylabel(f"{metric} (%)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
    for axis in axes:
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)


def _line(axis: Any, xs: Sequence[float], ys: Sequence[float], label: str) -> list[Any]:
    return list(axis.plot(xs, ys, marker="o", label=label))
