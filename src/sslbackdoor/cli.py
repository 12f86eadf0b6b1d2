"""The `sslbackdoor` command: thin wrappers over the Python API.

Exit codes: 0 ok, 2 bad input (one line on stderr, no traceback), 1 unexpected failure.
"""

from __future__ import annotations

import errno
import functools
import json
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from sslbackdoor.attacks.cli import poison_app
from sslbackdoor.defenses.cli import defend_app, scan
from sslbackdoor.errors import UserInputError, first_line
from sslbackdoor.ssl.cli import pretrain_app

# Help texts are plain text: under rich markup, `DATASET[/SPLIT]` is read as a closing tag
# and `--help` fails. Every sub-app gets the setting too, whichever one a typer version reads.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Backdoor attacks on pre-trained self-supervised encoders, and defenses.")
attack_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Run an attack and save the backdoored encoder.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="Offline data set-up and listings.")
for _name, _sub_app in (("attack", attack_app), ("data", data_app), ("poison", poison_app),
                        ("pretrain", pretrain_app), ("defend", defend_app)):
    _sub_app.rich_markup_mode = None
    app.add_typer(_sub_app, name=_name)
app.command("scan")(scan)

OutOption = Annotated[Path, typer.Option("--out", help="output folder")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config field: KEY=VALUE")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="no progress output")]
ResumeOption = Annotated[bool, typer.Option("--resume", help="continue from the last epoch checkpoint in --out")]
DownloadOption = Annotated[bool, typer.Option("--download", help="let torchvision download missing datasets (needs internet)")]
DataRootOption = Annotated[Path | None, typer.Option("--data-root", help="where datasets live (default $SSLBACKDOOR_DATA or ./data)")]


def shipped_experiments() -> dict[str, Path]:
    folder = resources.files("sslbackdoor") / "experiments"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def resolve_experiment(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserInputError(f"experiment file not found: {path}")
        return path
    shipped = shipped_experiments()
    if name_or_path not in shipped:
        raise UserInputError(f"unknown experiment {name_or_path!r}; shipped: "
                             f"{', '.join(sorted(shipped))} (or give a .yaml path)")
    return shipped[name_or_path]


def _run_config(path: Path, out: Path | None, overrides: list[str], device: str, quiet: bool,
                resume: bool, download: bool = False, data_root: Path | None = None,
                scale: str | None = None) -> None:
    from sslbackdoor.config import merged_config, read_yaml, select_scale
    from sslbackdoor.progress import set_quiet
    from sslbackdoor.runners import dry_run_experiment, run_experiment

    set_quiet(quiet)
    extra = [f"device={device}"] if device != "auto" else []
    extra += ["download=true"] if download else []
    extra += [f"data_root={data_root}"] if data_root else []
    raw = merged_config(select_scale(read_yaml(path), scale, str(path)), [*overrides, *extra])
    if out is None:
        for line in dry_run_experiment(raw, label=str(path)):
            typer.echo(line)
        return
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    results = run_experiment(raw, out, resume=resume, label=str(path))
    _print_summary(results, out)


def _print_summary(results: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    if "rows" in results:  # a poisoning experiment: CA and ASR per method and crop policy
        _print_poisoning_summary(results, out)
        return

    table = Table(title=f"{results['name']} (percent; ASR excludes target-class inputs)")
    for column in ("task", "target", "CA", "BA", "ASR-B", "ASR"):
        table.add_column(column, justify="right" if column not in ("task", "target") else "left")

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.2f}"

    tasks = results.get("tasks") or [{**t, "task": f"{c['id']}: {t['task']}"}  # grid cells
                                     for c in results.get("cells", []) for t in c["tasks"]]
    for task in tasks:
        table.add_row(task["task"], str(task.get("target_name") or "–"), pct(task["ca"]),
                      pct(task["ba"]), pct(task["asr_b"]), pct(task["asr"]))
    console = Console()
    console.print(table)
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'}")


def _print_poisoning_summary(results: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['name']} (percent; ASR excludes target-class inputs)")
    for column in ("method", "crop", "poisons", "CA", "ASR"):
        table.add_column(column, justify="left" if column in ("method", "crop") else "right")
    for row in results["rows"]:
        table.add_row(row["method"], "localized" if row["localized_crop"] else "standard",
                      str(row["poisons"]), f"{100 * row['ca']:.2f}", f"{100 * row['asr']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'}")


@app.command()
def demo(out: OutOption = Path("runs/demo"), device: DeviceOption = "auto",
         resume: ResumeOption = False, quiet: QuietOption = False,
         set_: SetOption = None) -> None:
    """Backdoor a real ImageNet MobileNetV2 for two tasks and report CA/BA/ASR-B/ASR."""
    _run_config(shipped_experiments()["demo"], out, set_ or [], device, quiet, resume)


@app.command()
def run(experiment: Annotated[str | None, typer.Argument(help="shipped name or YAML path")] = None,
        out: Annotated[Path | None, typer.Option("--out", help="output folder")] = None,
        set_: SetOption = None, device: DeviceOption = "auto", resume: ResumeOption = False,
        quiet: QuietOption = False, download: DownloadOption = False,
        data_root: DataRootOption = None,
        scale: Annotated[str | None, typer.Option(
            "--scale", help="small | paper: the YAML's `scales` block (default small)")] = None,
        list_: Annotated[bool, typer.Option("--list", help="list shipped experiments")] = False,
        dry: Annotated[bool, typer.Option(
            "--dry-run", help="validate the config and resolve every dataset it reads; "
                              "train nothing, write nothing")] = False) -> None:
    """Run an experiment file (or a shipped experiment by name)."""
    if list_ or experiment is None:
        for name, path in sorted(shipped_experiments().items()):
            first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
            typer.echo(f"{name:24s} {first}")
        return
    if out is None and not dry:
        raise UserInputError("--out DIR is required to run an experiment (or pass --dry-run)")
    _check_data_root(data_root, download)
    _run_config(resolve_experiment(experiment), None if dry else out, set_ or [], device, quiet,
                resume, download, data_root, scale)


def _check_data_root(data_root: Path | None, download: bool) -> None:
    """A data root must be a folder; one that does not exist only makes sense to download into."""
    if data_root is None or data_root.is_dir() or (download and not data_root.exists()):
        return
    problem = "is not a folder" if data_root.exists() else "does not exist (pass --download to fetch into it)"
    raise UserInputError(f"--data-root {data_root} {problem}; give the folder that holds the datasets")


@attack_app.command("badencoder")
def attack_badencoder(
    out: OutOption,
    arch: Annotated[str, typer.Option(help="encoder architecture")] = "torchvision:mobilenet_v2",
    weights: Annotated[str, typer.Option(help="'imagenet' or a checkpoint path")] = "imagenet",
    shadow: Annotated[list[str] | None, typer.Option(help="DATASET[/SPLIT][@LIMIT], repeatable")] = None,
    target: Annotated[list[str] | None, typer.Option(help="TASK:CLASS, repeatable")] = None,
    reference: Annotated[list[str] | None, typer.Option(
        help="DATASET[/SPLIT][@COUNT] per --target (default: the task's train split)")] = None,
    trigger_size: Annotated[int, typer.Option(help="trigger side in pixels")] = 10,
    image_size: Annotated[int, typer.Option(help="side of the images the encoder sees")] = 32,
    epochs: Annotated[int, typer.Option()] = 200,
    lr: Annotated[float, typer.Option()] = 1e-3,
    batch_size: Annotated[int, typer.Option()] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOption = "auto", resume: ResumeOption = False, quiet: QuietOption = False,
) -> None:
    """Inject one or more backdoors into an encoder (no evaluation; see `evaluate`)."""
    from sslbackdoor.config import load_config
    from sslbackdoor.experiment import run_attack_stage
    from sslbackdoor.progress import set_quiet

    set_quiet(quiet)
    if not shadow or not target:
        raise UserInputError("give at least one --shadow DATASET and one --target TASK:CLASS")
    targets = [_parse_target(t, (reference or [])[i] if i < len(reference or []) else None,
                             trigger_size) for i, t in enumerate(target)]
    config = load_config({
        "name": "attack-badencoder", "seed": seed, "device": device, "image_size": image_size,
        "encoder": {"arch": arch, "weights": weights},
        "shadow": [_parse_source(s) for s in shadow], "targets": targets,
        "attack": {"epochs": epochs, "lr": lr, "batch_size": batch_size},
    }, label="attack badencoder")
    stage = run_attack_stage(config, out, resume=resume)
    typer.echo(f"wrote {stage.encoder_path} (sha256 {stage.encoder_sha256[:16]}…)")


def _parse_source(text: str) -> dict[str, Any]:
    name, _, limit = text.partition("@")
    dataset, _, split = name.rpartition("/") if "/" in name and not name.startswith(("npz:", "imagefolder:")) else (name, "", "")
    source: dict[str, Any] = {"dataset": dataset or name, "split": split or "train"}
    if limit:
        source["limit"] = _int(limit, text)
    return source


def _parse_target(text: str, reference: str | None, trigger_size: int) -> dict[str, Any]:
    task, sep, cls = text.rpartition(":")
    if not sep or not task:
        raise UserInputError(f"--target {text!r}: expected TASK:CLASS, e.g. mnist-5k:1")
    ref = _parse_source(reference or f"{task}/train")
    return {"task": task, "target_class": _int(cls, text),
            "trigger": {"size": trigger_size},
            "references": {"dataset": ref["dataset"], "split": ref["split"],
                           "count": ref.get("limit", 1)}}


def _int(text: str, context: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserInputError(f"{context!r}: {text!r} is not an integer") from None


@app.command()
def evaluate(
    encoder: Annotated[Path, typer.Option(help="encoder checkpoint (.safetensors or reference .pth)")],
    task: Annotated[list[str], typer.Option(help="downstream dataset, repeatable")],
    out: OutOption,
    arch: Annotated[str | None, typer.Option(help="architecture (read from .safetensors when absent)")] = None,
    clean: Annotated[str | None, typer.Option(help="clean encoder for CA/ASR-B: 'imagenet' or a path")] = None,
    target_class: Annotated[int | None, typer.Option(help="target class of the first --task")] = None,
    trigger_size: Annotated[int, typer.Option()] = 10,
    image_size: Annotated[int, typer.Option()] = 32,
    probe_epochs: Annotated[int, typer.Option()] = 500,
    train_limit: Annotated[int | None, typer.Option()] = None,
    test_limit: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOption = "auto", quiet: QuietOption = False,
    zero_shot: Annotated[bool, typer.Option(
        "--zero-shot", help="classify with the CLIP text tower instead of training an MLP "
                            "(needs --arch clip:ARCH)")] = False,
    template: Annotated[list[str] | None, typer.Option(
        help="zero-shot prompt with {} for the class name, repeatable")] = None,
    clip_weights: Annotated[str | None, typer.Option(
        help="zero-shot text tower: full CLIP weights file or open_clip tag "
             "(default: --clean)")] = None,
) -> None:
    """Train downstream classifiers on an encoder and report accuracy (and ASR)."""
    from sslbackdoor.experiment import run_evaluate_stage
    from sslbackdoor.progress import set_quiet

    set_quiet(quiet)
    if (template or clip_weights) and not zero_shot:
        raise UserInputError("--template and --clip-weights only apply with --zero-shot")
    if zero_shot:
        from sslbackdoor.zero_shot_stage import run_zero_shot_stage

        results = run_zero_shot_stage(encoder, task, out, arch=arch, clean=clean,
                                      clip_weights=clip_weights, templates=template or [],
                                      target_class=target_class, trigger_size=trigger_size,
                                      image_size=image_size, test_limit=test_limit,
                                      seed=seed, device=device)
        typer.echo(json.dumps(results["tasks"], indent=2))
        return
    results = run_evaluate_stage(encoder, task, out, arch=arch, clean=clean,
                                 target_class=target_class, trigger_size=trigger_size,
                                 image_size=image_size, probe_epochs=probe_epochs,
                                 train_limit=train_limit, test_limit=test_limit, seed=seed,
                                 device=device)
    typer.echo(json.dumps(results["tasks"], indent=2))


@app.command()
def report(folders: Annotated[list[Path], typer.Argument(help="run folders with results.json")],
           across_seeds: Annotated[Path | None, typer.Option(
               help="also write this markdown file: the folders' corruptencoder rows side by "
                    "side, one column per seed, and their mean")] = None) -> None:
    """Re-render report.md from each folder's results.json."""
    from sslbackdoor.attacks.seed_summary import seed_table
    from sslbackdoor.engine import atomic_write_text, check_output_file
    from sslbackdoor.report import render_report

    if across_seeds is not None:
        check_output_file(across_seeds, "--across-seeds")
    runs = [_read_results(folder) for folder in folders]
    table = None if across_seeds is None else seed_table(runs)  # refuses before writing
    reports = [_render(render_report, results, folder) for folder, results in zip(folders, runs, strict=True)]
    for folder, text in zip(folders, reports, strict=True):
        atomic_write_text(folder / "report.md", text)
        typer.echo(f"wrote {folder / 'report.md'}")
    if across_seeds is not None and table is not None:
        atomic_write_text(across_seeds, f"# {runs[0]['name']}: ASR across seeds\n\n{table}\n")
        typer.echo(f"wrote {across_seeds}")


def _render(render: Callable[[dict[str, Any]], str], results: dict[str, Any], folder: Path) -> str:
    """A report of a results.json; one that lacks a field the report needs is bad input."""
    try:
        return render(results)
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise UserInputError(f"{folder / 'results.json'} is incomplete or malformed for its kind "
                             f"({type(exc).__name__}: {first_line(exc)}); was it written by "
                             f"sslbackdoor?") from None


def _read_results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    if not path.is_file():
        raise UserInputError(f"no results.json in {folder}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise UserInputError(f"{path} is not valid JSON ({first_line(exc)})") from None
    if not isinstance(results, dict) or "name" not in results:
        raise UserInputError(f"{path} is not an sslbackdoor results.json (expected a JSON "
                             f"object with a 'name')")
    return results


@data_app.command("prepare")
def data_prepare(root: Annotated[Path | None, typer.Option(help="data folder")] = None) -> None:
    """Unpack the offline datasets where the loaders look (run by `make data`)."""
    from sslbackdoor.data.datasets import data_dir
    from sslbackdoor.data.offline import prepare_offline_data
    from sslbackdoor.engine import check_output_folder

    check_output_folder(root or data_dir(), "--root")
    for line in prepare_offline_data(root or data_dir()):
        typer.echo(line)


@data_app.command("list")
def data_list() -> None:
    """List registered datasets."""
    from sslbackdoor.data.datasets import DATASETS, dataset_names

    for name in dataset_names():
        entry = DATASETS[name]
        typer.echo(f"{name:18s} splits={','.join(entry.splits):22s} {entry.description}")


@app.command()
def encoders() -> None:
    """List registered encoder architectures."""
    from sslbackdoor.models.encoders import ENCODERS

    for name, factory in sorted(ENCODERS.items()):
        typer.echo(f"{name:18s} {factory.description}")
    typer.echo(f"{'clip:ARCH':18s} an open_clip image tower (pip install open_clip_torch)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input → exit 2 with one line; a full disk → exit 1 with one line;
    anything else unexpected keeps its traceback (exit 1)."""
    import sslbackdoor.data.images  # noqa: F401 - caps Pillow's pixel limit for every image read
    from sslbackdoor.run_lock import locking

    # Every command with an --out folder holds its lock (one run per folder at a time), and
    # an --out that could not be written is refused before the lock or any work.
    command = wrap_out_commands(typer.main.get_command(app), lambda run: _checking_out(locking(run)))
    try:
        code = command.main(args=argv, prog_name="sslbackdoor", standalone_mode=False)
    except UserInputError as exc:
        _fail(str(exc), 2)
    except OSError as exc:
        _fail_on_os_error(exc)
    except Exception as exc:
        _fail_on_library_error(exc)
    if isinstance(code, int) and code != 0:  # typer.Exit(code) and Ctrl-C (130) come back here
        raise SystemExit(code)


def _fail(message: str, code: int) -> NoReturn:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)


def _fail_on_library_error(exc: Exception) -> None:
    """Usage errors of typer's click (either copy), aborts and Pillow's bomb check; else re-raise."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    usage: Any = exc  # duck-typed: click's or typer's ClickException
    if "NoArgsIsHelpError" in names:  # a bare group: its help is the answer
        typer.echo(usage.ctx.get_help())
        raise SystemExit(0)
    if "ClickException" in names and callable(getattr(usage, "format_message", None)):
        _fail(_usage_message(usage), int(getattr(usage, "exit_code", 2)))
    if "Abort" in names:
        raise SystemExit(130) from None
    if "DecompressionBombError" in names:
        from sslbackdoor.data.images import PIXEL_LIMIT

        _fail(f"{first_line(exc).rstrip('.')}; images of at most {PIXEL_LIMIT // 1_000_000} "
              f"megapixels are read", 2)
    raise exc


def _fail_on_os_error(exc: OSError) -> NoReturn:
    """A full disk is not bad input (rerunning after freeing space works): exit 1. A path
    that cannot be written or read as given is: exit 2. Either way one line."""
    where = exc.filename or "a file"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        _fail(f"no space left on the device while writing {where}; files written earlier are "
              f"intact: free some space and rerun (with --resume where the command has it)", 1)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR):
        _fail(f"cannot use {where}: {exc.strerror}; give a path you can read and write", 2)
    raise exc


def _usage_message(exc: Any) -> str:
    """Click's message, with what is valid where click does not say, and where help is."""
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    commands = list(ctx.command.list_commands(ctx)) if hasattr(ctx.command, "list_commands") else []
    valid: list[str] = []
    if "No such option" in message and "Possible options" not in message:
        valid = sorted(opt for param in ctx.command.params if not getattr(param, "hidden", False)
                       for opt in getattr(param, "opts", []) if opt.startswith("-"))
        valid += [*ctx.help_option_names, *([f"or a command: {', '.join(commands)}"] if commands else [])]
    elif "No such command" in message:
        valid = commands
    listed = f"; valid: {', '.join(valid)}" if valid else ""
    return f"{message.rstrip('.')}{listed} (see '{ctx.command_path} --help')"


def wrap_out_commands(command: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """Wrap the callback of every command (of a click-style group, recursively) that takes an
    `out` folder. Duck-typed: typer ships its own copy of click, whose classes are not click's."""
    subcommands = getattr(command, "commands", None)
    if isinstance(subcommands, dict):
        for sub in subcommands.values():
            wrap_out_commands(sub, wrap)
    elif command.callback is not None and any(p.name == "out" for p in command.params):
        command.callback = wrap(command.callback)
    return command


def _checking_out(callback: Callable[..., Any]) -> Callable[..., Any]:
    """`callback` refusing an unusable `out` (a file, a path under a file, a read-only
    folder) before doing any work."""
    @functools.wraps(callback)
    def checked(*args: Any, **kwargs: Any) -> Any:
        from sslbackdoor.engine import check_output_folder

        if kwargs.get("out") is not None:
            check_output_folder(Path(kwargs["out"]))
        return callback(*args, **kwargs)
    return checked


if __name__ == "__main__":
    main()
