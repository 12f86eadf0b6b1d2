"""Backdoor attacks: BadEncoder (fine-tunes an encoder), CorruptEncoder (poisons data)."""
