"""A served request's unset sampling fields take the checkpoint's generation_config.json defaults, which
GetModelInfo and GET /v1/models show (vLLM's --generation-config auto). The replica here keeps an FP8 KV cache,
which GetModelInfo reports."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.engine.test_generation_config import QWEN3_STYLE
from tests.serving import ENGINE_KWARGS, RouterThread

PROMPT = [5, 6, 7, 8]


def test_unset_fields_take_the_checkpoints_defaults_shown_by_both_front_doors(
    start_router: Callable[..., RouterThread], model_dir: Path, tmp_path: Path
) -> None:
    qwen3_style = shutil.copytree(model_dir, tmp_path / "m")
    (qwen3_style / "generation_config.json").write_text(json.dumps(QWEN3_STYLE))
    router = start_router(num_replicas=1, model=str(qwen3_style), http_port=0,
                          engine_kwargs={**ENGINE_KWARGS, "kv_cache_dtype": "fp8"})
    with router.client() as client:
        info = client.model_info(timeout=10)
        assert (info.dtype, info.kv_cache_dtype) == (ENGINE_KWARGS["dtype"], "float8_e4m3fn")
        defaults = info.sampling_defaults
        assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.6, 0.95, 20)
        assert not defaults.HasField("min_p") and not defaults.HasField("max_tokens")

        def tokens(**params: object) -> list[int]:
            return list(client.complete(PROMPT, max_tokens=12, ignore_eos=True, seed=7, timeout=60, **params).token_ids)

        by_default = tokens()
        assert by_default == tokens(temperature=0.6, top_p=0.95, top_k=20)
        assert by_default != tokens(temperature=1.0, top_p=1.0, top_k=-1)  # the control: set fields win
    with urllib.request.urlopen(f"http://127.0.0.1:{router.router.http_port}/v1/models", timeout=10) as answer:
        [model] = json.loads(answer.read())["data"]
    assert model["sampling_defaults"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
