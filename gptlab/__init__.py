"""gptlab: raw text -> tokenizer -> pretraining -> sampling -> SFT -> reward model -> RLHF -> eval -> serving."""

__version__ = "0.1.0"
