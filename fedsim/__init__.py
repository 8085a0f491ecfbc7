"""fedsim: a simulator for federated fine-tuning of multimodal LLMs (4-bit backbones, LoRA adapters)."""

__version__ = "0.1.0"  # setup.cfg and CITATION.cff read or repeat it (tests/test_cli.py checks they agree)
