"""One table of `corruptencoder` results across seeds.

At small scale one seed can move a backdoor's ASR by tens of points (new poisons, weights
and crops), so a ranking of methods needs several seeds. Each run folder holds one seed;
this lines their rows up, (method, crop) by (method, crop), with the ASR at the pasted and
the enlarged trigger sizes per seed and their mean. The folders must hold the same
experiment apart from the seed and which rows were run.
"""

from __future__ import annotations

from typing import Any

from sslbackdoor.attacks.poisoning_report import METHOD_NAMES, find_row
from sslbackdoor.errors import UserInputError
from sslbackdoor.report import markdown_table

# Keys that may differ between the folders: the seed and which rows each one ran.
_PER_FOLDER_KEYS = ("seed", "methods", "localized_crop")


def _shared_config(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results["config"].items() if k not in _PER_FOLDER_KEYS}


def check_same_experiment(runs: list[dict[str, Any]]) -> None:
    """Refuse results that are not `corruptencoder` runs of one config but the seed."""
    if not runs:
        raise UserInputError("give at least one run folder")
    for results in runs:
        if results.get("kind") != "corruptencoder":
            raise UserInputError(f"{results.get('name', '?')}: kind {results.get('kind')!r}; "
                                 "a seed table needs corruptencoder results")
    first = _shared_config(runs[0])
    for results in runs[1:]:
        other = _shared_config(results)
        differing = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differing:
            raise UserInputError(f"seed {results['seed']} differs from seed {runs[0]['seed']} "
                                 f"in {', '.join(differing)}; only seed, methods and "
                                 f"localized_crop may differ")
    seeds = [results["seed"] for results in runs]
    if len(set(seeds)) != len(seeds):
        raise UserInputError(f"seeds repeat across the folders: {seeds}; merge each seed's "
                             "rows into one folder (run with --resume and all methods)")


def _asr_by_size(row: dict[str, Any], trigger_size: int) -> dict[int, float]:
    """ASR (percent) by trigger size in px: the pasted size and every enlarged one."""
    sizes = {trigger_size: 100 * float(row["asr"])}
    sizes.update({int(px): 100 * float(v) for px, v in row.get("asr_enlarged", {}).items()})
    return sizes


Key = tuple[str, bool]  # (method, localized crop)
PerSeed = dict[Key, list[dict[int, float] | None]]  # ASR by trigger size, per seed


def seed_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per (method, crop), one column per seed and a mean column, each
    cell the ASR at every trigger size ("8 / 16 / 24" px), "–" where a seed lacks the row;
    then the standard-crop rows every seed ran, ranked by mean ASR at each size."""
    check_same_experiment(runs)
    runs = sorted(runs, key=lambda results: results["seed"])
    per_seed = _asr_per_seed(runs)
    sizes = sorted({px for rows in per_seed.values() for asr in rows if asr for px in asr})
    means = {key: _mean([asr for asr in rows if asr is not None], sizes)
             for key, rows in per_seed.items()}
    table = [[METHOD_NAMES[method], "localized" if localized else "standard",
              *(_cell(asr, sizes) for asr in rows),
              f"{_cell(means[method, localized], sizes)} "
              f"(n={sum(asr is not None for asr in rows)})"]
             for (method, localized), rows in per_seed.items()]
    header = ["method", "crop", *(f"seed {res['seed']}" for res in runs), "mean"]
    return (f"ASR (%) at trigger sizes {' / '.join(f'{px}' for px in sizes)} px, "
            "per seed and averaged over the seeds that ran the row.\n\n"
            + markdown_table(header, table)
            + "\n\nStandard-crop rows that every seed ran, by mean ASR:\n\n"
            + "\n".join(_ranking(per_seed, means, sizes)))


def _asr_per_seed(runs: list[dict[str, Any]]) -> PerSeed:
    """Every (method, crop) of any seed, in the report's method order, with its ASR by
    trigger size in each seed (None where that seed did not run it)."""
    trigger_size = int(runs[0]["config"]["trigger_size"])
    keys = sorted({(r["method"], bool(r["localized_crop"])) for res in runs for r in res["rows"]},
                  key=lambda key: (list(METHOD_NAMES).index(key[0]), key[1]))
    return {key: [None if (row := find_row(res["rows"], *key)) is None
                  else _asr_by_size(row, trigger_size) for res in runs] for key in keys}


def _ranking(per_seed: PerSeed, means: dict[Key, dict[int, float]],
             sizes: list[int]) -> list[str]:
    everywhere = [key for key, rows in per_seed.items() if not key[1] and None not in rows]
    return [f"- {px} px: " + " > ".join(
        f"{METHOD_NAMES[key[0]]} {means[key][px]:.2f}"
        for key in sorted(everywhere, key=lambda key: -means[key].get(px, -1.0))
        if px in means[key]) for px in sizes]


def _mean(rows: list[dict[int, float]], sizes: list[int]) -> dict[int, float]:
    return {px: sum(values) / len(values) for px in sizes
            if (values := [asr[px] for asr in rows if px in asr])}


def _cell(asr: dict[int, float] | None, sizes: list[int]) -> str:
    if asr is None:
        return "–"
    return " / ".join("–" if px not in asr else f"{asr[px]:.2f}" for px in sizes)
