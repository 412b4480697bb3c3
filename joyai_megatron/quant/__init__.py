"""Quantization-aware training with NVIDIA ModelOpt, and quantized Hugging Face export.

* :mod:`~joyai_megatron.quant.formats`: recipe ``qat.*`` -> ModelOpt quantization config, and the
  checks (block size vs layer widths, backend, layout) that run before any process group exists.
* :mod:`~joyai_megatron.quant.modelopt_state`: insert, calibrate, toggle, save and restore the
  quantizers of Megatron-Core model chunks.
* :mod:`~joyai_megatron.quant.export`: ``python -m joyai_megatron.quant.export`` (ModelOpt unified
  HF checkpoint, compressed-tensors INT4 for vLLM/SGLang, or a dequantized BF16 one) straight from a
  QAT ``torch_dist`` checkpoint.
* :mod:`~joyai_megatron.quant.compressed`: the compressed-tensors ``pack-quantized`` tensors and
  config, through the ``compressed-tensors`` package, with the QAT quantizer's integers and scales.
* :mod:`~joyai_megatron.quant.qat_model`: a QAT checkpoint rebuilt on one process, quantizers and all
  (what export and reload load).
* :mod:`~joyai_megatron.quant.reload`: read an export back without ModelOpt (INT4/FP8 dequantized)
  and compare its logits in transformers with the fake-quantized checkpoint.

The ``qat`` stage itself (the quantizers enter the shared trainer through its hooks) is
``stages/qat.py``; the comparison of eval losses (unquantized, PTQ, QAT) runs that stage, beside it:
``python -m joyai_megatron.stages.qat_compare``.

See docs/qat.md.
"""
