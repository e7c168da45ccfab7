"""The engine's heartbeat beats through a step, after every layer: a long step is not a silent one."""

from __future__ import annotations

import time
from pathlib import Path

from engine import LLMEngine, SamplingParams


def test_a_step_beats_after_every_layer_and_says_how_many_tokens_it_holds(model_dir: Path) -> None:
    with LLMEngine(model_dir, device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=64) as engine:
        heartbeat = engine.heartbeat
        seen: list[tuple[float, float | None, int]] = []  # at each layer's end: (last beat, step start, tokens)
        for layer in engine.model_runner.model.model.layers:
            layer.register_forward_hook(
                lambda *_: seen.append((heartbeat.beat_at, heartbeat.step_started_at, heartbeat.step_num_tokens)))
        engine.add_request(list(range(1, 301)), SamplingParams(max_tokens=1, temperature=0))
        before = time.monotonic()
        engine.step()
        assert len(seen) == len(engine.model_runner.model.model.layers) >= 2
        beats = [beat for beat, _, _ in seen]
        assert beats == sorted(beats) and len(set(beats)) == len(beats)  # a new beat after each layer
        assert all(started is not None and started >= before and tokens == 300 for _, started, tokens in seen)
        assert heartbeat.step_started_at is None and heartbeat.beat_at >= beats[-1]  # between steps
