"""``fitformer quantize``: post-training LSQ quantization of a classifier to a packed file (and ONNX)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..data import encode, split_dataset
from ..errors import UserError
from ..io import read_json
from ..models import load_classifier
from .options import DataOpt, LabelColOpt, TaskOpt, TextColOpt, load_dataset


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        model: Path = typer.Option(..., "--model", "-m", help="A classifier directory (e.g. the teacher's)."),
        out: Path = typer.Option(..., "--out", "-o", help="Packed .safetensors file to write."),
        task: str = TaskOpt,
        data: Path = DataOpt,
        text_col: list[str] = TextColOpt,
        label_col: str = LabelColOpt,
        weight_bits: int = typer.Option(8, help="Weight bits (2..8) of every Linear and Embedding."),
        act_bits: int = typer.Option(8, help="Input bits (2..8) of every Linear; 0 for weight-only."),
        per_tensor: bool = typer.Option(False, "--per-tensor", help="One step size per tensor (not per row)."),
        asymmetric: bool = typer.Option(False, "--asymmetric", help="Unsigned weights with a zero point."),
        spec: Path = typer.Option(None, "--spec", help="JSON spec: layer name/pattern/type -> plan (overrides bits)."),
        calibration_batches: int = typer.Option(8, help="Training batches (of 32) that set activation ranges."),
        onnx: Path = typer.Option(None, "--onnx", help="Also export an ONNX model with integer MatMuls here."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Quantize a classifier (LSQ initialisation + calibration, no training) and save it packed.

        Example: fitformer quantize -m runs/teacher/best --weight-bits 4 --act-bits 8 -o model-w4a8.safetensors
        """
        from ..compress.quant import QuantPlan, calibrate, freeze, spec_from_dict
        from ..compress.quant import quantize as quantize_model
        from ..export.quantized import save_quantized

        if calibration_batches < 1:
            raise UserError(f"--calibration-batches {calibration_batches}: must be at least 1")
        if out.suffix != ".safetensors":
            raise UserError(f"--out {out}: use a file name ending in .safetensors")
        if spec is not None:
            if not spec.is_file():
                raise UserError(f"--spec {spec}: no such file; pass a JSON file")
            try:
                raw = read_json(spec)
            except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
                raise UserError(f"--spec {spec}: not valid JSON ({str(exc).splitlines()[0]})") from None
            plan_spec = spec_from_dict(raw)
        else:
            plan_spec = QuantPlan(weight_bits, act_bits or None, not per_tensor, not asymmetric).validate()
        net, tokenizer = load_classifier(model)
        dataset = load_dataset(task, data, text_col, label_col)
        train = encode(tokenizer, split_dataset(dataset, seed=0).train, 128)
        q = quantize_model(net, plan_spec)
        calibrate(q, list(train.select(range(min(len(train), 32 * calibration_batches))).batches(32)))
        frozen = freeze(q)
        result = {"out": str(out), "size_bytes": save_quantized(frozen, out, meta={"source": str(model)})}
        if onnx is not None:
            from ..export.onnx_quant import export_quantized_onnx

            result["onnx"] = export_quantized_onnx(frozen, onnx)
        typer.echo(json.dumps(result, indent=2) if as_json else
                   f"wrote {out} ({result['size_bytes'] / 1e6:.2f} MB)" + (f" and {onnx}" if onnx else ""))
