"""lumen: fault-tolerant distributed LLM serving with coordinated failure recovery."""

__version__ = "0.1.0"
