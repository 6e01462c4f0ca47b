"""PEFT folders in: LoRA, the LoRA family and the sequence kinds, as delta files pinned to a base."""
