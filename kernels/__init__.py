"""Triton kernels of qwen35_lab, installed as ``qwen35_lab._kernels``.

Never import this folder as a top-level package named ``kernels``: that is the
name of HF's kernel-hub package, which transformers probes for. Use the ops in
``qwen35_lab.ops``; they dispatch CUDA tensors here.
"""
