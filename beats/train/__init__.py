"""Training BEATs: fine-tuning, self-supervised pre-training and tokenizer distillation.

Everything here builds on the inference package (`beats.model`, `beats.encoder`, ...)
without changing its layers; nothing in ``beats`` outside this subpackage imports it.
"""
