"""``fitformer compress`` (the whole pipeline) and ``fitformer config example``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def summary_table(summary: dict) -> Table:
    """Teacher, baselines and candidates side by side (* marks the chosen model)."""
    first = summary["devices"][0]
    table = Table(title=f"fitformer compress ({summary['status']}); EDP modelled on {first}")
    for col in ("model", "test acc", "ms b1", "ms b32", "MB disk", "EDP mJ*s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    chosen = (summary.get("chosen") or {}).get("key")
    rows = [("teacher", summary["teacher"]), *summary["baselines"].items(),
            *((k[:8] + (" *" if k == chosen else ""), v) for k, v in summary["candidates"].items())]
    for name, row in rows:
        table.add_row(name, f"{row['test_accuracy']:.4f}", f"{row['latency_ms_b1']:.2f}",
                      f"{row['latency_ms_b32']:.1f}", f"{row['size_bytes'] / 1e6:.2f}", f"{row['edp'][first]:.3g}")
    return table


def run_and_print(run_config) -> None:
    """Run (or resume) ``compress`` with stage lines, then the summary table and the report's path."""
    from ..pipeline import compress

    console = Console()
    result = compress(run_config, log=lambda message: console.print(f"[dim]stage[/dim] {message}"))
    console.print(summary_table(result.summary))
    chosen = result.chosen
    console.print(f"chosen {chosen['key'][:8]} ({chosen['runtime']}): accuracy drop "
                  f"{chosen['accuracy_drop_points']:.2f} points, {chosen['speedup_b32']:.2f}x faster at batch 32, "
                  f"{chosen['size_ratio']:.2f}x smaller on disk")
    console.print(f"report: {result.run_dir / 'report.html'}")


def register(app: typer.Typer) -> None:
    @app.command("compress")
    def compress_cmd(
        model: str = typer.Option(None, "--model", "-m", help="Built-in model name or local model directory."),
        task: str = typer.Option(None, "--task", "-t", help="Built-in task (default: rotten-tomatoes)."),
        data: Path = typer.Option(None, "--data", help="CSV, TSV or JSONL file with labelled texts."),
        text_col: list[str] = typer.Option(None, "--text-col", help="Text column (twice for pairs)."),
        label_col: str = typer.Option(None, "--label-col", help="Label column of --data."),
        device: list[str] = typer.Option(None, "--device", "-d", help="Target device (repeat); first is primary."),
        max_latency_ms: float = typer.Option(None, help="Modelled latency limit on every target device."),
        max_accuracy_drop: float = typer.Option(None, help="Largest test-accuracy loss in points (default 1)."),
        max_size_mb: float = typer.Option(None, help="Largest predicted model size in MB."),
        objective: str = typer.Option(None, help="latency, energy, edp or size (default latency)."),
        budget_minutes: float = typer.Option(None, help="Distillation minutes, split among the candidates."),
        out: Path = typer.Option(None, "--out", "-o", help="Run directory (rerun to resume)."),
        config: Path = typer.Option(None, "--config", "-c", help="YAML run configuration (fitformer config example)."),
        preset: str = typer.Option(None, help="quick (the demo) or thorough."),
        search_budget: int = typer.Option(None, help="Candidates scored by the search per device."),
        candidates: int = typer.Option(None, help="Candidates distilled and measured."),
        teacher_epochs: int = typer.Option(None, help="Fine-tuning epochs of the teacher."),
        threads: int = typer.Option(None, help="PyTorch threads for host timing."),
        seed: int = typer.Option(None, help="Seed of search and distillation."),
    ) -> None:
        """Search, distil, measure, export and report: a compressed model that fits the target device.

        Example: fitformer compress --preset quick -d raspberry-pi-4 --max-accuracy-drop 1 --out runs/demo
        """
        from ..config import build_config
        run_config = build_config(
            preset, config, model=model, task=task, data=data, text_col=text_col, label_col=label_col,
            devices=device, max_latency_ms=max_latency_ms, max_accuracy_drop=max_accuracy_drop,
            max_size_mb=max_size_mb, objective=objective, budget_minutes=budget_minutes, out=out,
            search_budget=search_budget, candidates=candidates, teacher_epochs=teacher_epochs, threads=threads,
            seed=seed)
        run_and_print(run_config)

    @app.command()
    def demo(out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory (rerun to resume).")
             ) -> None:
        """The main job on the built-in default: ``compress --preset quick`` of MiniLM-L6 on rotten-tomatoes.

        Example: fitformer demo --out runs/demo
        """
        from ..config import build_config

        run_and_print(build_config("quick", out=out))

    config_app = typer.Typer(help="Run configurations for fitformer compress.", no_args_is_help=True)
    app.add_typer(config_app, name="config")

    @config_app.command("example")
    def example() -> None:
        """Print a commented YAML run configuration with every field at its default.

        Example: fitformer config example > run.yaml && fitformer compress --config run.yaml
        """
        from ..config import example_yaml

        typer.echo(example_yaml(), nl=False)
