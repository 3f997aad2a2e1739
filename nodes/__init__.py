"""ComfyUI adapters (V3 schema). Imported only inside ComfyUI; the engine lives in `dco_train/`.

Only the V3 subset that works on both ComfyUI v0.3.64 and v0.8.0 is used
(research/v3-both-versions.md section 6): one registration style (`comfy_entrypoint`, never
`NODE_CLASS_MAPPINGS`), lowercase `io`/`ui`, always `io.NodeOutput`, distinct input/output ids.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


class DCOExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from . import registry

        return registry.node_classes()


async def comfy_entrypoint() -> DCOExtension:
    from . import routes

    routes.register()  # the page's GET /dco/embeddings; a no-op without a running server
    return DCOExtension()
