"""Adapters that put the L2R router into third-party MoE models.

``l2r_cuda.integrations.hf``: Hugging Face ``transformers`` OLMoE, Qwen3-MoE, Qwen2-MoE, Mixtral and
GPT-OSS (and blocks with the same gate contract): replacement, checkpoints, upcycling and
distillation (optional dependency: imported only when that submodule is).
"""

__all__ = ["hf"]
