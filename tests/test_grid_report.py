from typing import Any

from sslbackdoor.grid_report import findings_section, paper_asr, render_grid_report


def _entry(ca: float, ba: float, asr: float, asr_all: float | None) -> dict[str, Any]:
    entry = {"task": "gtsrb", "target_class": 12, "target_name": "priority road", "ca": ca,
             "ba": ba, "asr_b": 0.01, "asr": asr}
    if asr_all is not None:
        entry.update(asr_b_all=0.03, asr_all=asr_all)
    return entry


def _table(entry: dict[str, Any]) -> dict[str, Any]:
    return {"name": "t", "study": "table", "scale": "small", "seed": 0,
            "config": {"image_size": 32, "targets": [{"task": "gtsrb", "paper": "GTSRB"}],
                       "attack": {"epochs": 1, "batch_size": 8, "lr": 0.01},
                       "downstream": {"probe": {"kind": "mlp", "epochs": 1},
                                      "train_limit": None, "test_limit": None}},
            "environment": {"device": "cpu", "threads": 2, "torch": "2"},
            "encoders": [{"name": "C", "paper": "CIFAR10", "arch": "resnet18-cifar",
                          "weights": "w"}],
            "cells": [{"encoder": "C", "targets": [0], "variable": None, "tasks": [entry]}],
            "timings_s": {"grid": 1.0}}


def test_the_papers_bar_is_judged_on_all_triggered_inputs() -> None:
    """94.9% of the non-target inputs but 95.1% of all inputs: the paper's ASR ≥ 95% holds
    in the paper's convention, and the target-excluded figure is shown beside it."""
    entry = _entry(0.90, 0.90, 0.949, 0.951)
    assert paper_asr(entry) == 0.951
    text = findings_section(_table(entry))[1]
    assert "**holds** (1 of 1 pairs)" in text
    assert "target class included" in text
    failing = _entry(0.90, 0.90, 0.99, 0.94)
    text = findings_section(_table(failing))[1]
    assert "**does not hold** (0 of 1 pairs)" in text
    assert "ASR (all) 94.00, target excluded 99.00" in text


def test_the_table_sets_the_papers_figures_beside_both_conventions() -> None:
    report = render_grid_report(_table(_entry(0.80, 0.81, 0.97, 0.975)))
    header = next(line for line in report.splitlines() if line.startswith("| pre-train"))
    assert "| ASR-B | ASR | ASR-B (all) | ASR (all) |" in header
    assert "paper ASR-B (all) | paper ASR (all)" in header
    row = next(line for line in report.splitlines() if line.startswith("| C → gtsrb"))
    assert "| 1.00 | 97.00 | 3.00 | 97.50 | CIFAR10 → GTSRB | 81.84 | 82.27 | 2.79 | 98.64 |" in row


def test_a_results_file_without_the_all_inputs_fields_still_renders() -> None:
    old = _entry(0.90, 0.90, 0.96, None)
    assert paper_asr(old) == 0.96
    report = render_grid_report(_table(old))
    assert "| 1.00 | 96.00 | – | – |" in report
    assert "predates the all-inputs ASR" in report
    assert "**holds** (1 of 1 pairs)" in report


def test_every_study_renders_both_conventions(tmp_path: Any) -> None:
    from sslbackdoor.grid_report import write_grid_figures

    for study, variables in (("multi-target", ["one", "all"]), ("trigger-size", [4, 10]),
                             ("shadow-distribution", ["A", "B"])):
        results = _table(_entry(0.9, 0.9, 0.9, 0.96))
        results["study"] = study
        results["config"]["shadows"] = [{"label": "A", "paper": "subset"},
                                        {"label": "B", "paper": None}]
        results["cells"] = [{"encoder": "C", "targets": [0], "variable": v,
                             "tasks": [_entry(0.9, 0.9, 0.9 + i / 100, 0.96 + i / 100)]}
                            for i, v in enumerate(variables)]
        assert write_grid_figures(results, tmp_path) == (
            {"sweep": "sweep.png"} if study == "trigger-size" else {})
        report = render_grid_report(results)
        assert "ASR (all)" in report and "target class included" in report
        if study == "trigger-size":
            assert "4 → 96.00, 10 → 97.00" in report  # the trend in the paper's convention
