"""``fitformer prune``: one-shot structured pruning by weight magnitude, with optional N:M sparsity inside."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from ..compress import CompressionPlan, apply_plan
from ..compress.prune import (
    BalancedSparsityPlan,
    StructuredPrunePlan,
    layer_shapes,
    load_pruned_classifier,
    save_hp_state,
)
from ..errors import UserError
from ..layers.sparse import SparseLinear, format_bytes
from ..models import count_parameters, resolve_model_dir, save_classifier

ENCODER_LINEARS = ["*.self.query", "*.self.key", "*.self.value", "*.output.dense", "*.intermediate.dense"]


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"--nm '{text}': write it as N:M, e.g. 2:4") from None
    if not (m >= 1 and 0 <= n <= m):
        raise UserError(f"N:M sparsity needs integers 0 <= n <= m and m >= 1, got {n}:{m}; use e.g. 2:4")
    return n, m


def register(app: typer.Typer) -> None:
    @app.command()
    def prune(
        model: str = typer.Option(..., "--model", "-m", help="Classifier directory (or built-in name)."),
        heads: float = typer.Option(0.25, help="Fraction of attention heads to remove (ranked globally)."),
        ffn: float = typer.Option(0.5, help="Fraction of FFN neurons to remove in every layer."),
        drop_layer: list[int] = typer.Option(None, "--drop-layer", help="Remove this layer (repeatable)."),
        nm: str = typer.Option(None, "--nm", help="Also keep N of every M weights inside, e.g. 2:4 (HP format)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory for the pruned classifier."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Remove heads, FFN neurons and layers by weight magnitude and save a smaller dense classifier.

        Data-free and one-shot; for pruning during distillation use the Python API (GradualPruner).
        Example: fitformer prune -m runs/teacher --heads 0.25 --ffn 0.5 --nm 2:4 -o runs/pruned
        """
        nm_pair = parse_nm(nm) if nm else None  # bad input fails before anything is written
        net, tokenizer = load_pruned_classifier(resolve_model_dir(model))
        before = count_parameters(net)
        plan = StructuredPrunePlan(drop_layers=tuple(drop_layer or ()), prune_heads=heads, prune_ffn=ffn).resolve(net)
        small = apply_plan(net, CompressionPlan(model_steps=[plan]))
        save_classifier(small, tokenizer, out, {"plan": CompressionPlan(model_steps=[plan]).to_dict()})
        result = {"out": str(out), "parameters_before": before, "parameters_after": count_parameters(small),
                  "layer_shapes": layer_shapes(small)}
        if nm_pair is not None:
            n, m = nm_pair
            sparse = apply_plan(small, CompressionPlan(layers={k: [BalancedSparsityPlan(n, m, kernel="dense")]
                                                               for k in ENCODER_LINEARS}))
            result["hp_files_bytes"] = save_hp_state(sparse, Path(out) / "hp")
            totals: dict[str, int] = {}
            for layer in sparse.modules():
                if isinstance(layer, SparseLinear):
                    for k, v in format_bytes((layer.weight * layer.mask).detach(), n, m).items():
                        totals[k] = totals.get(k, 0) + v
            result["encoder_weight_bytes"] = totals
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        console = Console()
        console.print(f"saved {out}: {before:,} -> {result['parameters_after']:,} parameters; heads per layer "
                      f"{[s['heads'] for s in result['layer_shapes']]}, FFN width "
                      f"{[s['intermediate'] for s in result['layer_shapes']]}")
        if nm:
            console.print(f"{nm} encoder weights (bytes): {result['encoder_weight_bytes']}; HP files in {out}/hp")
