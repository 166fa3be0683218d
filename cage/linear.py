"""The QAT linear layer, model preparation and the optimizer's parameter groups."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import backend as _backend
from .config import QuantConfig
from .functional import fake_quantize
from .ops import qat_linear as _int8

DEFAULT_SKIP = ("lm_head", "output", "head")


def autocast_activation(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on (as ``F.linear`` would cast it).

    An activation quantized before the product would otherwise reach the quantizer in fp32
    (an RMSNorm's output, say) and cost the fp32 rotation and an extra cast, only for the
    product to round it to bf16 anyway. The quantizer's math stays fp32 and it emits ``q``
    in bf16. Weights are not cast: their codes, CAGE's grid and convert's bit-identity are
    defined on the stored weights. Like autocast, fp64 is left alone.
    """
    device_type = x.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return x
    dtype = torch.get_autocast_dtype(device_type)
    if x.dtype == dtype or x.dtype == torch.float64 or not x.is_floating_point():
        return x
    return x.to(dtype)


class QATLinear(nn.Linear):
    """``nn.Linear`` whose weight (per output row) and input activations (per token)
    are fake-quantized in the forward pass with straight-through gradients."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_quant: QuantConfig | None = None,
        act_quant: QuantConfig | None = None,
        backend: str = "auto",
        matmul: str = "auto",
        device=None,
        dtype=None,
    ):
        _backend.check_backend_name(backend, "QATLinear")
        _int8.check_matmul_name(matmul, "QATLinear")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        for name, cfg in (("weight_quant", weight_quant), ("act_quant", act_quant)):
            if cfg is not None and not isinstance(cfg, QuantConfig):
                raise TypeError(f"QATLinear: {name} must be a QuantConfig or None, got {cfg!r}")
            if cfg is not None:
                cfg.check_row_length(in_features)
        self.weight_quant = weight_quant
        self.act_quant = act_quant
        self.backend = backend
        # How the forward multiplies (a runtime choice, not part of the saved model): "dequant"
        # (F.linear on the fake-quantized operands), "int8" (torch._int_mm on their integer
        # codes) or "int8-fused" (the Triton int8 GEMM); "auto" is "dequant" for now.
        self.matmul = matmul

    @classmethod
    def from_linear(cls, linear: nn.Linear, **quant) -> "QATLinear":
        """A QATLinear that holds ``linear``'s own parameter tensors (not copies)."""
        new = cls(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta", **quant
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def _shares_rotation(self) -> bool:
        w, a = self.weight_quant, self.act_quant
        return (
            w is not None and a is not None and w.hadamard and a.hadamard
            and w.block_size == a.block_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = autocast_activation(x)
        matmul = _int8.resolve_matmul(self.matmul)
        if matmul != "dequant" and _int8.int8_product_takes(matmul, x, self.out_features, self.weight.dtype,
                                                            self.weight_quant, self.act_quant):
            return _int8.int8_qat_linear(x, self.weight, self.bias, self.weight_quant, self.act_quant, self.backend,
                                         matmul)
        # With one block Hadamard on both sides, Q(x) Q(W)^T = q(x_h) q(W_h)^T: skip both
        # rotations back to the input space.
        rotate_back = not self._shares_rotation()
        w = self.weight
        if self.weight_quant is not None:
            w = fake_quantize(w, self.weight_quant, backend=self.backend, rotate_back=rotate_back)
        if self.act_quant is not None:
            x = fake_quantize(x, self.act_quant, backend=self.backend, rotate_back=rotate_back)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_quant={self.weight_quant}, act_quant={self.act_quant}"
                + ("" if self.matmul == "auto" else f", matmul={self.matmul}"))


def _skip_fn(skip) -> Callable[[str, nn.Module], bool]:
    if callable(skip):
        return skip
    names = (skip,) if isinstance(skip, str) else tuple(skip or ())
    return lambda qualified_name, module: qualified_name.rsplit(".", 1)[-1] in names


AUTO_BLOCK = "auto"


def fit_block(config: QuantConfig | None, in_features: int) -> QuantConfig | None:
    """``config`` with the largest power-of-two block up to its own ``block_size`` that divides
    ``in_features`` (``prepare_qat(..., block_size="auto")``); unrotated configs as they are."""
    if config is None or not config.hadamard or in_features % config.block_size == 0:
        return config
    b = config.block_size
    while in_features % b:
        b //= 2
    return dataclasses.replace(config, block_size=b)


def prepare_qat(
    model: nn.Module,
    weight: QuantConfig | None = None,
    activation: QuantConfig | None = None,
    skip: Iterable[str] | Callable[[str, nn.Module], bool] | str | None = DEFAULT_SKIP,
    backend: str = "auto",
    matmul: str = "auto",
    block_size: str | None = None,
) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for a :class:`QATLinear`, in place.

    Parameters stay the same tensors under the same ``state_dict`` names. ``skip`` is a
    set of module names (the last component of the qualified name; by default the output
    head, ``DEFAULT_SKIP``) or a predicate ``(qualified_name, module) -> bool``. It works by
    name only: the layers of an ``nn.Sequential`` are named ``"0"``, ``"1"``, ..., so its last
    layer is quantized unless skipped by its name (``skip=("2",)``) or a predicate.

    A linear layer whose input width the rotation block does not divide is an error that names
    the layer; ``block_size="auto"`` instead gives each layer the largest power of two up to
    the config's ``block_size`` (128 by default) that divides its ``in_features``, on both
    sides (as ``cage train`` chooses its block). ``matmul`` chooses how the forward multiplies
    (see :class:`QATLinear`; a runtime option).

    Errors, before anything changes: a model with no ``nn.Linear`` (nothing to quantize), and a
    model already prepared whose ``QATLinear`` layers have other configs than this call's (a
    second call with other bits is not silently ignored: prepare the original model, or set
    ``layer.weight_quant`` / ``layer.act_quant`` yourself). A second call with the same configs
    converts the ``nn.Linear`` layers left (those it does not skip); the layers prepared before
    keep their ``backend`` and ``matmul``. A call that skips every ``nn.Linear`` warns.

    A transformers ``PreTrainedModel`` also gets the ``"cage"`` quantizer attached
    (:func:`cage.hf.attach_quantization_config`): its ``save_pretrained``, and every checkpoint
    transformers' ``Trainer`` writes, carry the ``quantization_config`` that plain
    ``AutoModelForCausalLM.from_pretrained`` (after ``import cage.hf``) rebuilds the layers from.
    """
    _backend.check_backend_name(backend, "prepare_qat")
    _int8.check_matmul_name(matmul, "prepare_qat")
    if block_size not in (None, AUTO_BLOCK):
        raise ValueError(f"prepare_qat: block_size must be None or 'auto' (per layer), got {block_size!r}; "
                         "a fixed block goes in QuantConfig(block_size=...)")
    should_skip = _skip_fn(skip)

    def configs(linear: nn.Linear) -> tuple[QuantConfig | None, QuantConfig | None]:
        if block_size != AUTO_BLOCK:
            return weight, activation
        return fit_block(weight, linear.in_features), fit_block(activation, linear.in_features)

    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    prepared = [(name, m) for name, m in model.named_modules() if isinstance(m, QATLinear)]
    if not linears and not prepared:
        raise ValueError(
            f"prepare_qat: the model ({type(model).__name__}) has no nn.Linear layer to quantize; "
            "prepare_qat swaps nn.Linear modules only (not Conv1d, transformers' GPT-2 Conv1D or other layers)"
        )
    for name, layer in prepared:
        want = configs(layer)
        if (layer.weight_quant, layer.act_quant) != want:
            raise ValueError(
                f"prepare_qat: the model is already prepared: layer {name!r} is already a QATLinear with weight "
                f"{layer.weight_quant} and activation {layer.act_quant}, and this call asks for weight {want[0]} "
                f"and activation {want[1]}; prepare the original model again, or set the layer's weight_quant "
                "and act_quant"
            )
    targets = [(name, module) for name, module in linears if not should_skip(name, module)]
    if linears and not targets and not prepared:
        warnings.warn(
            f"prepare_qat: every nn.Linear of the model is skipped ({', '.join(repr(n) for n, _ in linears[:4])}"
            f"{', ...' if len(linears) > 4 else ''}): nothing is quantized; see skip=", UserWarning, stacklevel=2,
        )
    # Every replacement is built (and so validated) before the first swap: a layer that
    # fails leaves the model exactly as it was, not half converted.
    replacements = []
    for name, linear in targets:
        wq, aq = configs(linear)
        try:
            new = QATLinear.from_linear(linear, weight_quant=wq, act_quant=aq, backend=backend, matmul=matmul)
        except (TypeError, ValueError) as err:
            hint = "; or prepare_qat(..., block_size='auto') to fit the block to each layer" if (
                "block_size" in str(err) and block_size is None) else ""
            raise type(err)(f"prepare_qat: layer {name!r}: {err}{hint}") from None
        replacements.append((name, new))
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    if replacements or prepared:
        _attach_hf_quantizer(model)
    return model


def _attach_hf_quantizer(model: nn.Module) -> None:
    """A transformers PreTrainedModel gets the ``"cage"`` quantizer (``cage.hf.attach_quantization_config``),
    so that ``save_pretrained`` and Trainer checkpoints write its quantization_config. transformers is
    never imported here: a model is a PreTrainedModel only if it already is. A model quantized by
    another method is left as it is."""
    modeling = sys.modules.get("transformers.modeling_utils")
    pretrained = getattr(modeling, "PreTrainedModel", None)
    if pretrained is None or not isinstance(model, pretrained):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(getattr(quantizer, "quantization_config", None), "quant_method", None) != "cage":
        return
    from . import hf

    hf.attach_quantization_config(model)


def quantized_weights(model: nn.Module) -> dict[int, tuple[nn.Parameter, QuantConfig]]:
    """``id(weight) -> (weight, QuantConfig)`` for every QATLinear weight of ``model`` that
    is quantized, each Parameter once (a weight tied between layers is one entry).

    A Parameter shared by two layers with different weight QuantConfigs is an error: CAGE
    would have to pull it towards two grids at once.
    """
    found: dict[int, tuple[nn.Parameter, QuantConfig]] = {}
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        if not (isinstance(module, QATLinear) and module.weight_quant is not None):
            continue
        w, cfg = module.weight, module.weight_quant
        if id(w) in found and found[id(w)][1] != cfg:
            raise ValueError(
                f"tied weights: the weight of {name!r} is tied to the weight of {owner[id(w)]!r} "
                f"but their weight_quant differ ({cfg} vs {found[id(w)][1]}); a shared weight "
                "needs one QuantConfig"
            )
        found.setdefault(id(w), (w, cfg))
        owner.setdefault(id(w), name)
    return found


def qat_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups for a prepared model.

    One group per distinct weight QuantConfig (the quantized linear weights, with
    ``"quant"`` set so CAGE applies to them), one for the other matrices (decayed) and
    one for vectors such as norms and biases (no decay). Empty groups are left out.
    Every Parameter is listed once, tied weights included; frozen ones
    (``requires_grad=False``) are not listed.
    """
    quantized: dict[QuantConfig, list[nn.Parameter]] = {}
    frozen = set()
    for w, cfg in quantized_weights(model).values():
        if w.requires_grad:
            quantized.setdefault(cfg, []).append(w)
        else:  # a frozen weight is not trained: a stale .grad must not step it
            frozen.add(id(w))
    seen = {id(w) for ws in quantized.values() for w in ws} | frozen
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": ps, "weight_decay": weight_decay, "quant": cfg} for cfg, ps in quantized.items()]
    groups.append({"params": decay, "weight_decay": weight_decay, "quant": None})
    groups.append({"params": no_decay, "weight_decay": 0.0, "quant": None})
    return [g for g in groups if g["params"]]
