"""opensora: the library (models, diffusion, data, distributed, accounting, checkpointing).

Importing it has no side effects: nothing is downloaded, no CLI is parsed, no process group is created.
"""

__version__ = "0.1.0"
