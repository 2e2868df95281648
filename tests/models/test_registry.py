"""The registry's adapters loaded while serving, on a real engine process of the bundled
model: a load whose caller hangs up still ends with the adapter served (the engine and the
list agree), and an unload refuses it at once."""

from __future__ import annotations

import asyncio

import pytest
from lora import write_gguf_lora

from llmserve.config import Settings
from llmserve.errors import ModelNotFound
from llmserve.models import bundled_model_path
from llmserve.models.entries import ModelEntry
from llmserve.models.loading import load_model
from llmserve.models.registry import ModelRegistry


def test_a_load_whose_caller_hangs_up_still_ends_served(tmp_path):
    settings = Settings(threads=2, context_length=512, max_sequences=2)
    base = ModelEntry(("base",), bundled_model_path())
    adapter = ModelEntry(("a",), write_gguf_lora(tmp_path / "a.gguf", bundled_model_path(),
                                                  seed=1), base="base")
    registry = ModelRegistry([base], lambda e: load_model(e, settings), keep_alive=None)

    async def main():
        await registry.start()
        try:
            (await registry.acquire("base", "chat")).release()  # loaded
            caller = asyncio.create_task(registry.add_adapter(adapter))
            for _ in range(2):  # into the engine's load, which takes milliseconds
                await asyncio.sleep(0)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            for _ in range(1000):
                if "a" in registry.names():
                    break
                await asyncio.sleep(0.01)
            assert "a" in registry.names()
            lease = await registry.acquire("a", "chat")
            try:
                assert lease.served.engine.adapters == {"a": None}
            finally:
                lease.release()
            await registry.remove_adapter("a")
            assert "a" not in registry.names()
            with pytest.raises(ModelNotFound):
                await registry.acquire("a", "chat")
            assert registry.get("base").engine.adapters == {}
        finally:
            await registry.stop()

    asyncio.run(main())
