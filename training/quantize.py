"""CPU inference in int8: dynamic quantization of the large `nn.Linear` layers of an mm-fusion model.

Dynamic int8 (`torch.ao.quantization.quantize_dynamic`) stores a Linear's weight in int8 and quantizes its input on
the fly, per call. That pays where the matmul dominates: measured at batch 1 on a 2-core AVX2 CPU (10 to 50 tokens),
a 384x384 Linear runs 1.6-2x faster in int8 and a 384x1536 one 1.8-2.5x, while a 64x64 or 128x128 one runs 1.2-2.5x
*slower* (quantizing the input costs more than the small matmul saves). So only layers with at least
`min_weights` weights are quantized: every Linear of a base-size tower or fusion (width 768), the MiniLM text tower
of the built-in sample, but not the sample's 64-wide vision/audio towers or its 128-wide fusion.
`benchmarks/cpu_quantized.py` measures this choice against quantizing every Linear and the fusion only.

    >>> import modeling_mm  # registers mm_fusion with the Auto classes
    >>> from transformers import AutoModelForSequenceClassification
    >>> from training.quantize import quantize_for_cpu
    >>> model = quantize_for_cpu(AutoModelForSequenceClassification.from_pretrained("outputs/sample/model"))

A quantized model is for inference on the CPU: it has no backward, and it is not saved (quantize after loading).
Activations are quantized with one scale per tensor, that is per batch: at batch size > 1 a sample's int8 logits
depend slightly on the other samples of its batch (mm-eval at batch 32 on the sample: accuracy 0.817 against 0.820
at batch 1), where the float32 model's do not.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

MIN_QUANTIZED_WEIGHTS = 2**17
"""Smallest Linear (in_features * out_features) that `quantize_for_cpu` quantizes by default: 384x384 is above it,
128x512 below (see the module docstring for the measurement)."""


def quantize_for_cpu(
    model: nn.Module, min_weights: int = MIN_QUANTIZED_WEIGHTS, skip: Sequence[str] = ()
) -> nn.Module:
    """Quantize `model`'s `nn.Linear` layers with at least `min_weights` weights to dynamic int8 (per-tensor weight
    scale, the x86/fbgemm kernels), in place, and return it in eval mode. `min_weights=0` quantizes every Linear;
    Linears under the module names in `skip` (e.g. `"model.text_model"`) stay in float32. A peft model is merged
    first (`merge_and_unload`), so the LoRA update is quantized with the weight it belongs to.

    Raises `ValueError` when a parameter of `model` is not on the CPU (int8 dynamic kernels are CPU-only) or not
    float32 (cast a bf16/fp16 model with `.float()` first), or when `min_weights` is negative.
    """
    if min_weights < 0:
        raise ValueError(f"min_weights: must be >= 0; got {min_weights}")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "cpu":
            raise ValueError(f"model: {name} is on {tensor.device}; quantize_for_cpu quantizes for the CPU only "
                             "(move the model with .to('cpu') first)")
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and parameter.dtype != torch.float32:
            raise ValueError(f"model: {name} is {parameter.dtype}; quantize_for_cpu takes a float32 model "
                             "(cast it with .float() first)")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module.in_features * module.out_features >= min_weights
               and not any(name == s or name.startswith(s + ".") for s in skip)]
    if not targets:
        return model
    with warnings.catch_warnings():
        # torch deprecates torch.ao.quantization in favour of torchao, which this project does not depend on; the
        # eager dynamic path still works in 2.14.1, the newest torch pyproject.toml allows (tests/test_quantize.py)
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                                category=UserWarning)
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {name: default_dynamic_qconfig for name in targets}, dtype=torch.qint8,
                                inplace=True)


def quantized_linear_count(model: nn.Module) -> int:
    """How many Linear layers of `model` run in dynamic int8."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return sum(isinstance(module, DynamicQuantizedLinear) for module in model.modules())
