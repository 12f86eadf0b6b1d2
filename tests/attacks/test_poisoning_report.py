"""report.md of the `corruptencoder` experiment: the paper's claims checked against rows,
the enlarged-trigger diagnostic and the CTRL note."""

from __future__ import annotations

from typing import Any

from sslbackdoor.attacks.poisoning_report import (
    attack_pairs_section,
    enlarged_trigger_section,
    poisoning_findings,
    render_poisoning_report,
    view_scale_section,
)


def _rows(values: dict[tuple[str, bool], tuple[float, float]]) -> list[dict[str, Any]]:
    return [{"method": m, "localized_crop": loc, "ca": ca / 100, "asr": asr / 100}
            for (m, loc), (ca, asr) in values.items()]


def test_findings_when_the_paper_holds() -> None:
    lines = poisoning_findings(_rows({
        ("clean", False): (61.2, 0.4), ("corruptencoder", False): (61.6, 92.9),
        ("poisonedencoder", False): (61.1, 35.5), ("ssl-backdoor", False): (61.3, 14.3),
        ("clean", True): (55.0, 0.5), ("corruptencoder", True): (55.2, 3.0)}))
    assert len(lines) == 3 and all(line.startswith("- **Holds**") for line in lines)
    assert "92.90 vs 35.50 (PoisonedEncoder)" in lines[0] and "+57.40" in lines[0]
    assert "61.60 vs 61.20" in lines[1]
    assert "3.00 vs 0.50" in lines[2]
    assert not any("not learned" in line for line in lines)


def test_findings_when_the_paper_fails_and_the_backdoor_was_not_learned() -> None:
    lines = poisoning_findings(_rows({
        ("clean", False): (80.0, 2.0), ("corruptencoder", False): (77.5, 5.0),
        ("ctrl", False): (79.9, 1.0), ("clean", True): (70.0, 1.0),
        ("corruptencoder", True): (70.0, 30.0)}))
    assert len(lines) == 4
    assert all(line.startswith("- **Does not hold**") for line in lines[:3])
    assert "5.00 vs 1.00 (CTRL)" in lines[0]
    assert "-2.50" in lines[1]
    assert "30.00 vs 1.00" in lines[2]
    assert "the backdoor was not learned at this scale" in lines[3]


def test_findings_skip_claims_whose_methods_are_missing() -> None:
    assert poisoning_findings(_rows({("clean", False): (60.0, 1.0)})) == []
    only_attack = poisoning_findings(_rows({("corruptencoder", False): (60.0, 90.0),
                                            ("ssl-backdoor", False): (60.0, 80.0)}))
    assert len(only_attack) == 1 and only_attack[0].startswith("- **Does not hold**")


def _not_learned(attack_enlarged: float) -> list[str]:
    rows = _rows({("clean", False): (80.0, 0.3), ("corruptencoder", False): (80.1, 0.5)})
    rows[0]["asr_enlarged"] = {"16": 0.001, "24": 0.002}
    rows[1]["asr_enlarged"] = {"16": 0.03, "24": attack_enlarged}
    return poisoning_findings(rows)


def test_the_not_learned_caveat_tells_a_weak_backdoor_from_none() -> None:
    weak = _not_learned(0.072)[-1]
    assert "With the trigger enlarged to 24 px its ASR is 7.20 vs the clean encoder's 0.20" in weak
    assert "a weak trigger → target association was learned" in weak
    none = _not_learned(0.04)[-1]
    assert ("4.00 vs the clean encoder's 0.20, so no association of more than 5 points shows "
            "even then") in none


def test_the_caveat_quotes_the_size_where_the_attack_exceeds_clean_most() -> None:
    rows = _rows({("clean", False): (95.0, 0.3), ("corruptencoder", False): (95.1, 0.6)})
    rows[0]["asr_enlarged"] = {"16": 0.0003, "24": 0.0}
    rows[1]["asr_enlarged"] = {"16": 0.039, "24": 0.003}
    assert "enlarged to 16 px its ASR is 3.90 vs the clean encoder's 0.03" in \
        poisoning_findings(rows)[-1]


def test_the_ranking_is_checked_again_with_enlarged_triggers() -> None:
    rows = _rows({("clean", False): (95.0, 0.3), ("corruptencoder", False): (95.1, 0.6),
                  ("ssl-backdoor", False): (95.0, 0.7), ("poisonedencoder", False): (95.1, 2.0),
                  ("ctrl", False): (95.0, 0.3)})
    for row, enlarged in zip(rows, [{"16": 0.0003, "24": 0.0}, {"16": 0.039, "24": 0.003},
                                    {"16": 0.07, "24": 0.981}, {"16": 0.8267, "24": 1.0}],
                             strict=False):
        row["asr_enlarged"] = enlarged
    lines = poisoning_findings(rows)
    assert lines[1] == ("- **Does not hold**: with enlarged test triggers (the section above) "
                        "CorruptEncoder's highest ASR is at least 20 points above the best "
                        "baseline's — measured 3.90 (16 px) vs 100.00 (PoisonedEncoder, 24 px).")
    rows[1]["asr_enlarged"] = {"16": 0.95}
    rows[2]["asr_enlarged"] = rows[3]["asr_enlarged"] = {"16": 0.5}
    assert poisoning_findings(rows)[1].startswith("- **Holds**: with enlarged test triggers")


def test_enlarged_section_lists_patch_rows_by_trigger_size() -> None:
    rows = _rows({("clean", False): (80.0, 0.3), ("ctrl", False): (80.0, 2.0)})
    rows[0]["asr_enlarged"] = {"24": 0.002, "16": 0.001}
    title, _, table = enlarged_trigger_section(rows, 8)
    assert title.startswith("## ASR with enlarged test triggers")
    assert table.splitlines()[0] == "| method | crop | ASR (8 px) | ASR (16 px) | ASR (24 px) |"
    assert table.splitlines()[2] == "| clean | standard | 0.30 | 0.10 | 0.20 |"
    assert len(table.splitlines()) == 3  # CTRL's frequency trigger cannot be enlarged
    assert enlarged_trigger_section(_rows({("clean", False): (80.0, 0.3)}), 8) == []


def test_pairs_section_shows_split_and_nested_pairs_and_dashes_for_older_results() -> None:
    rows = _rows({("corruptencoder", False): (80.0, 1.0), ("corruptencoder", True): (80.0, 0.5)})
    rows[0]["attack_pairs"] = {"triggered_poisons": 50, "probability": 0.002,
                               "expected_pairs": 5.0}
    rows[1]["attack_pairs"] = {"triggered_poisons": 50, "probability": 0.0,
                               "expected_pairs": 0.0, "nested_probability": 0.01,
                               "expected_nested_pairs": 25.0}
    table = attack_pairs_section(rows)[-1].splitlines()
    assert table[2] == "| CorruptEncoder | standard | 50 | 0.200 | 5.0 | 260 | – | – |"
    assert table[3] == "| CorruptEncoder | localized | 50 | 0.000 | 0.0 | 0 | 1.000 | 25.0 |"


def test_report_names_the_trigger_ctrl_is_attacked_with() -> None:
    rows = _rows({("clean", False): (80.0, 0.3), ("ctrl", False): (80.0, 12.5)})
    rows[0]["asr_ctrl"] = 0.011
    results: dict[str, Any] = {
        "name": "t", "rows": rows, "clean_images": 100, "poison_count": 1, "seconds": 1.0,
        "environment": {"device": "cpu"},
        "config": {"methods": ["clean", "ctrl"], "localized_crop": [False], "poison_ratio": 0.01,
                   "image_size": 32, "trigger_size": 8,
                   "simclr": {"arch": "convnet:4", "epochs": 1, "batch_size": 8},
                   "downstream": {"dataset": "d", "classes": [0, 1], "target_class": 1}}}
    report = render_poisoning_report(results)
    assert ("CTRL's rows are attacked with CTRL's own frequency trigger, made with the settings "
            "of its poisons (the clean encoder's ASR under it: 1.10)") in report
    assert "| ctrl | 80.00 | 12.50 | – | – |" in report


def test_localized_cropping_is_judged_where_the_backdoors_show() -> None:
    rows = _rows({("clean", False): (95.0, 0.3), ("poisonedencoder", False): (95.1, 2.0),
                  ("clean", True): (95.2, 0.2), ("poisonedencoder", True): (95.5, 0.3),
                  ("ssl-backdoor", True): (95.3, 0.5)})
    for row, enlarged in zip(rows, [{"16": 0.0, "24": 0.0}, {"16": 0.8267, "24": 1.0},
                                    {"16": 0.0, "24": 0.0}, {"16": 0.002, "24": 0.0},
                                    {"16": 0.0003, "24": 0.0}], strict=True):
        row["asr_enlarged"] = enlarged
    defense = [line for line in poisoning_findings(rows) if "localized cropping no method" in line]
    assert defense == ["- **Holds**: with localized cropping no method's enlarged-trigger ASR "
                       "exceeds the clean encoder's by more than 5 points — largest excess "
                       "+0.20 (PoisonedEncoder, 16 px); without it: +100.00 "
                       "(PoisonedEncoder, 24 px)."]
    rows[3]["asr_enlarged"] = {"16": 0.3, "24": 0.0}
    assert any(line.startswith("- **Does not hold**: with localized cropping no method")
               for line in poisoning_findings(rows))


def test_view_scale_section_sits_beside_the_official_pipeline() -> None:
    rows = _rows({("clean", False): (80.0, 1.0), ("corruptencoder", False): (80.0, 90.0)})
    rows[1]["view_trigger_scale"] = {"p10": 0.6, "median": 0.8, "p90": 1.05,
                                     "views_with_trigger": 0.5}
    official = {"p10": 0.7, "median": 0.85, "p90": 1.03, "views_with_trigger": 0.35}
    section = "\n".join(view_scale_section(rows, official))
    assert "| CorruptEncoder | standard | 0.60 | 0.80 | 1.05 | 50 |" in section
    assert "| official pipeline | standard | 0.70 | 0.85 | 1.03 | 35 |" in section
    assert view_scale_section(rows[:1], official) == []  # nothing measured: no section
