"""Plan kind ``subnet``: extract a sub-network of a trained SuperTransformer (HAT) as the first model step.

The model given to ``apply_plan`` is the SuperTransformer's full-size classifier (``train_supernet`` saves
it, already importance-reordered, in ``<out>/supernet``): the handler takes the leading slices named by the
plan, exactly as :func:`fitformer.models.elastic.extract` does. Layer steps that follow in the same plan
(factorise, quantize, prune) then apply to the smaller model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import UserError
from ..models.elastic import ElasticBert, ElasticSpace, SubConfig, extract
from .plan import ModelPlan, register_handler, register_plan


@register_plan
@dataclass(frozen=True)
class SubnetPlan(ModelPlan):
    """A sub-network: hidden size and, per layer, heads and FFN width (fields of :class:`SubConfig`)."""

    kind: ClassVar[str] = "subnet"
    hidden: int
    heads: tuple[int, ...]
    ffn: tuple[int, ...]

    @property
    def subconfig(self) -> SubConfig:
        return SubConfig(self.hidden, self.heads, self.ffn)

    @classmethod
    def from_subconfig(cls, sub: SubConfig) -> SubnetPlan:
        return cls(hidden=sub.hidden, heads=sub.heads, ffn=sub.ffn)


@register_handler(SubnetPlan)
def _extract_subnet(model: nn.Module, plan: SubnetPlan) -> nn.Module:
    """Leading-slice extraction; the sizes must fit inside the model (any choice up to its full sizes)."""
    elastic = model if isinstance(model, ElasticBert) else ElasticBert(model)
    full, sub = elastic.full, plan.subconfig
    if sub.depth > full.depth or sub.hidden > full.hidden or max(sub.heads) > full.heads[0] \
            or max(sub.ffn) > full.ffn[0]:
        raise UserError(f"sub-network {sub.describe()} is larger than the model ({full.describe()}); "
                        "shrink it to fit")
    if sub.hidden % elastic.head_dim:
        raise UserError(f"sub-network hidden size {sub.hidden} must be a multiple of the head dimension "
                        f"{elastic.head_dim}")
    space = ElasticSpace(depth=(sub.depth,), hidden=(sub.hidden,), heads=tuple(sorted(set(sub.heads))),
                         ffn=tuple(sorted(set(sub.ffn))), head_dim=elastic.head_dim, layers=elastic.space.layers)
    return extract(ElasticBert(elastic.model, space), sub)
