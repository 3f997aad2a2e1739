"""ComfyUI-DCO: Direct Consistency Optimization (arXiv 2402.12004) for SDXL in ComfyUI.

ComfyUI loads this file when the folder sits in `ComfyUI/custom_nodes/`. It has no side effects:
outside ComfyUI (the command line, the tests) it only names the web folder, so the engine in
`dco_train/` can be imported and tested on its own.
"""

WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY"]

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    pass
else:
    # ComfyUI imports this folder as a package. pytest may import this file on its own when the
    # checkout's folder name is not a valid module name (ComfyUI-DCO); then there are no nodes.
    if __package__:
        from .nodes import comfy_entrypoint  # noqa: F401

        __all__.append("comfy_entrypoint")
