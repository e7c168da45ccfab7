"""nanoserve's offline engine: `LLMEngine(model).generate("Hello", max_tokens=32)["text"]`; `LLMEngine()` runs the
embedded tiny Qwen3 with random weights (gibberish text), a check that the engine works here.

Heavy modules (torch) load lazily, so torch-free users such as the router can import
`engine.block_hash`, `engine.tokenizer` and `engine.sampling_params` without pulling torch in.
"""

from typing import TYPE_CHECKING

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

__all__ = ["LLMEngine", "SamplingParams"]


def __getattr__(name: str) -> object:
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
