"""The Hugging Face path: MixLoRA in a transformers vision-language model, trained with the Trainer (finetune_vlm.py).

Needs requirements.txt and hf/requirements.txt; run from the repository root: python -m hf.finetune_vlm.
"""
