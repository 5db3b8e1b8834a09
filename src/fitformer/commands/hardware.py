"""``fitformer devices list/show``, ``fitformer profile`` and ``fitformer calibrate``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UserError
from .options import ModelOpt


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def register(app: typer.Typer) -> None:
    devices_app = typer.Typer(help="The device catalog (built-in YAML specs).", no_args_is_help=True)
    app.add_typer(devices_app, name="devices")

    @devices_app.command("list")
    def devices_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """List the catalog devices with their headline figures.

        Example: fitformer devices list
        """
        from ..hardware.spec import load_catalog

        catalog = load_catalog()
        if as_json:
            typer.echo(json.dumps({n: s.model_dump() for n, s in catalog.items()}, indent=2))
            return
        table = Table("name", "kind", "peak (best dtype)", "DRAM BW", "on-chip", "power", "sparsity", "cost")
        for name, s in catalog.items():
            dtype = max(s.peak_flops, key=lambda d: s.peak_flops[d].value)
            table.add_row(name, s.kind, f"{_si(s.peak(dtype), 'OP/s')} {dtype}", _si(s.dram_bandwidth.value, "B/s"),
                          _si(s.onchip_bytes.value, "B"), f"{s.static_power_w.value:g}-{s.max_power_w.value:g} W",
                          ",".join(s.sparsity_formats) or "-", f"{s.relative_cost.value:g}")
        Console().print(table)

    @devices_app.command("show")
    def devices_show(name: str = typer.Argument(..., help="Catalog name or path of a device YAML file."),
                     as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Every figure of one device with its source.

        Example: fitformer devices show nvidia-t4
        """
        from ..hardware.spec import Figure, get_device

        spec = get_device(name)
        if as_json:
            typer.echo(json.dumps(spec.model_dump(), indent=2))
            return
        console = Console()
        console.print(f"[bold]{spec.name}[/] ({spec.kind}): {spec.description}")
        table = Table("field", "value", "source")
        for field_name, value in spec:
            if isinstance(value, Figure):
                table.add_row(field_name, f"{value.value:.4g}", value.source)
            elif isinstance(value, dict) and value and isinstance(next(iter(value.values())), Figure):
                for key, fig in value.items():
                    table.add_row(f"{field_name}.{key}", f"{fig.value:.4g}", fig.source)
        table.add_row("sparsity_formats", ", ".join(spec.sparsity_formats) or "-", "")
        console.print(table)

    @app.command()
    def profile(
        model: str = ModelOpt,
        batch: int = typer.Option(1, help="Sequences per forward pass."),
        seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sequence."),
        threads: int = typer.Option(None, help="PyTorch / onnxruntime intra-op threads (default: all cores)."),
        backend: str = typer.Option("eager", help="eager or onnxruntime."),
        repeats: int = typer.Option(20, help="Timed repetitions (after warm-up)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Measure again even if a cached profile exists."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Measure a model's latency on this machine, with a per-layer table (eager).

        Example: fitformer profile --model minilm-l6 --batch 1 --seq-len 128
        """
        from ..hardware.profiler import profile_model
        from ..models import load_classifier
        from ..utils import set_threads

        threads = set_threads(threads)
        net, _ = load_classifier(model)
        result = profile_model(net, batch=batch, seq_len=seq_len, threads=threads, backend=backend,
                               repeats=repeats, use_cache=not no_cache)
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        t = result.total
        console = Console()
        console.print(f"[bold]{model}[/] {backend}, batch {batch} x {seq_len} tokens, {threads} threads"
                      f"{' (cached)' if result.cached else ''}: {t['mean_ms']:.3f} ms (median {t['median_ms']:.3f}, "
                      f"std {t['std_ms']:.3f}, {t['repeats']} runs)")
        if result.layers:
            table = Table("layer", "type", "params", "mean ms", "std ms", "share")
            for row in result.layers:
                table.add_row(row["name"], row["type"], f"{row['params']:,}", f"{row['timing']['mean_ms']:.3f}",
                              f"{row['timing']['std_ms']:.3f}", f"{row['share']:.1%}")
            console.print(table)

    @app.command()
    def calibrate(
        threads: int = typer.Option(None, help="Threads to calibrate for (default: all cores)."),
        quick: bool = typer.Option(False, "--quick", help="Fewer probes and repetitions (about 20 s)."),
        energy_like: str = typer.Option("laptop-i7-1185g7", help="Catalog device whose energy figures the host "
                                        "borrows (host power is not measured)."),
        out: Path = typer.Option(None, "--out", "-o", help="Where to write the calibration JSON (default: cache)."),
        clock: str = typer.Option("wall", help="wall, or cpu (one thread: CPU time, robust on a busy machine)."),
        as_json: bool = typer.Option(False, "--json", help="Print the fitted parameters as JSON."),
    ) -> None:
        """Fit the analytic model's efficiency parameters to micro-benchmarks on this machine.

        Example: fitformer calibrate --threads 2
        """
        from ..hardware.calibrate import calibrate_host, save_calibration
        from ..utils import set_threads

        if clock not in ("wall", "cpu"):
            raise UserError(f"--clock must be wall or cpu, got '{clock}'")
        if out is not None and out.is_dir():
            raise UserError(f"--out {out} is a directory; pass a file path ending in .json")
        threads = set_threads(threads)
        console = Console()
        result = calibrate_host(threads, quick=quick, energy_like=energy_like, clock=clock,
                                log=None if as_json else (lambda msg: console.print(msg, highlight=False)))
        path = save_calibration(result, out)
        if as_json:
            typer.echo(json.dumps({k: result[k] for k in ("key", "efficiency", "probe_mape")}, indent=2))
            return
        console.print(f"probe MAPE {result['probe_mape']:.3f}; fp32 peak "
                      f"{_si(result['spec']['peak_flops']['fp32']['value'], 'FLOP/s')}, launch "
                      f"{result['spec']['launch_overhead_s']['value'] * 1e6:.2f} us; wrote {path}")
