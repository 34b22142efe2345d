"""Adapters that put the L2R router into third-party MoE models.

``l2r_cuda.integrations.hf``: Hugging Face ``transformers`` OLMoE, Qwen3-MoE, Qwen2-MoE, Mixtral,
GPT-OSS, DeepSeek-V3 and DeepSeek-V2 (and blocks with the same gate contract): replacement with the
gates' routing policies, checkpoints, upcycling and distillation (optional dependency: imported
only when that submodule is).
"""

__all__ = ["hf"]
