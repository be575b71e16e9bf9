"""The Hugging Face path: MixLoRA in a transformers LLaVA, trained with the Trainer (finetune_llava.py).

Needs requirements.txt and hf/requirements.txt; run from the repository root: python -m hf.finetune_llava.
"""
