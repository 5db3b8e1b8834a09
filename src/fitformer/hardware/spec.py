"""Device specifications: a validated YAML schema and the built-in catalog.

A device file lists figures (throughput, bandwidth, power, energy), each as ``{value, source}`` so every
number says where it came from (a datasheet, a paper, a measurement, or a derivation from those).
Users add a device by writing one YAML file and passing its path wherever a device name is accepted.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserError

CATALOG_DIR = Path(__file__).with_name("catalog")
DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4")
DTYPE_BITS = {"fp32": 32, "tf32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4}
SPARSITY_FORMATS = ("unstructured", "2:4", "block", "hp")


class Figure(BaseModel):
    """A non-negative number with its source (``datasheet: ...``, ``paper: ...``, ``measured: ...``,
    ``derived: ...`` or ``estimate: ...``)."""

    model_config = ConfigDict(extra="forbid")
    value: float = Field(ge=0)
    source: str = Field(min_length=3)


class DeviceSpec(BaseModel):
    """One device. Throughput in FLOP/s (or OP/s for integers), bandwidth in bytes/s, sizes in bytes,
    overhead in seconds, power in watts, energy in picojoules."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    kind: Literal["cpu", "gpu", "edge", "fpga"]
    description: str = ""
    peak_flops: dict[str, Figure]
    dram_bandwidth: Figure
    onchip_bandwidth: Figure
    onchip_bytes: Figure
    dram_bytes: Figure
    launch_overhead_s: Figure
    static_power_w: Figure
    max_power_w: Figure
    energy_pj_per_flop: dict[str, Figure]
    energy_pj_per_dram_byte: Figure
    energy_pj_per_onchip_byte: Figure
    sparsity_formats: list[str] = Field(default_factory=list)
    sparse_speedup: float = Field(default=1.0, ge=1.0)  # max speed-up of a supported sparse format
    relative_cost: Figure
    references: dict[str, str] = Field(default_factory=dict)

    @field_validator("peak_flops", "energy_pj_per_flop")
    @classmethod
    def _known_dtypes(cls, value: dict[str, Figure]) -> dict[str, Figure]:
        unknown = sorted(set(value) - set(DTYPES))
        if unknown:
            raise ValueError(f"unknown data type(s) {unknown}; known: {list(DTYPES)}")
        if not value:
            raise ValueError("needs at least one data type")
        return value

    @field_validator("sparsity_formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(SPARSITY_FORMATS))
        if unknown:
            raise ValueError(f"unknown sparsity format(s) {unknown}; known: {list(SPARSITY_FORMATS)}")
        return value

    @model_validator(mode="after")
    def _energy_for_each_dtype(self) -> DeviceSpec:
        missing = sorted(set(self.peak_flops) - set(self.energy_pj_per_flop))
        if missing:
            raise ValueError(f"energy_pj_per_flop lacks the data type(s) {missing} listed in peak_flops")
        return self

    def peak(self, dtype: str) -> float:
        return self.peak_flops[dtype].value

    def dtype_for_bits(self, bits: int) -> tuple[str, bool]:
        """The fastest supported data type of exactly ``bits`` bits (fp before tf32/bf16), and whether the
        device supports it; otherwise the narrowest wider type it supports (emulation), flagged False."""
        exact = [d for d in DTYPES if DTYPE_BITS[d] == bits and d in self.peak_flops and d != "tf32"]
        if exact:
            return exact[0], True
        wider = sorted((DTYPE_BITS[d], d) for d in self.peak_flops if DTYPE_BITS[d] > bits)
        if wider:
            return wider[0][1], False
        return max(self.peak_flops, key=lambda d: DTYPE_BITS[d]), False


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def spec_from_dict(data: object, origin: str = "<dict>") -> DeviceSpec:
    """Validate ``data``; errors name the field and the file."""
    if not isinstance(data, dict):
        raise UserError(f"{origin}: a device file must be a YAML mapping of fields (name, kind, peak_flops, ...)")
    try:
        return DeviceSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _field_path(err["loc"]) or "(top level)"
        msg = "missing; add it with a value and a source" if err["type"] == "missing" else err["msg"]
        more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        raise UserError(f"{origin}: field '{where}': {msg}{more}") from None


def load_spec(path: str | Path) -> DeviceSpec:
    """Read and validate one device YAML file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{p}: cannot read the device file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text; save the device file as UTF-8") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return spec_from_dict(data, str(p))


@functools.lru_cache(maxsize=4)
def _catalog(directory: str) -> dict[str, DeviceSpec]:
    specs: dict[str, DeviceSpec] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        spec = load_spec(path)
        if spec.name in specs:
            raise UserError(f"{path}: device name '{spec.name}' is used twice in the catalog")
        specs[spec.name] = spec
    return specs


def load_catalog(directory: str | Path | None = None) -> dict[str, DeviceSpec]:
    """Name -> spec of every device file in ``directory`` (default: the built-in catalog)."""
    return dict(_catalog(str(directory or CATALOG_DIR)))


def get_device(name_or_path: str | Path) -> DeviceSpec:
    """A catalog device by name, or a device YAML file by path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return load_spec(text)
    catalog = load_catalog()
    if text not in catalog:
        raise UserError(f"device '{text}' is not in the catalog; known: {', '.join(sorted(catalog))} "
                        "(or pass the path of a device YAML file)")
    return catalog[text]
