"""opensora: the library (models, diffusion, data, distributed, accounting, checkpointing).

Importing it has no side effects: nothing is downloaded, no CLI is parsed, no process group is created.
"""

__version__ = "0.1.0"

__all__ = ["STDiTPipeline", "STDiTPipelineOutput"]


def __getattr__(name: str):
    # Lazy (PEP 562): the pipeline imports torch and diffusers, and `import opensora` stays light for the data
    # pipeline's spawned workers.
    if name in __all__:
        from opensora import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'opensora' has no attribute {name!r}")
