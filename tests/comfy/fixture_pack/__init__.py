"""Test-only ComfyUI node pack (never shipped): a loader for the tiny in-process SDXL.

The server test links this folder into a temporary `custom_nodes/` next to the pack under test,
so real graphs (stock nodes + DCO nodes) run through ComfyUI's own executor in about a second.
It is V3 like the pack, and imports `harness` from its parent folder.
"""

from __future__ import annotations

import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from comfy_api.latest import ComfyExtension, io  # noqa: E402

import harness  # noqa: E402


class DCOTestTinySDXL(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCOTestTinySDXL",
            display_name="DCO Test Tiny SDXL",
            category="DCO/testing",
            description="Test fixture: a tiny random-weight SDXL (MODEL, CLIP, VAE) built in-process.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=1000, tooltip="Seed of the random weights.")],
            outputs=[io.Model.Output("model_out", tooltip="MODEL"), io.Clip.Output("clip_out", tooltip="CLIP"),
                     io.Vae.Output("vae_out", tooltip="VAE")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        import folder_paths

        model, clip, vae = harness.build_tiny_sdxl(seed, embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(model, clip, vae)


class FixtureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [DCOTestTinySDXL]


async def comfy_entrypoint() -> FixtureExtension:
    return FixtureExtension()
