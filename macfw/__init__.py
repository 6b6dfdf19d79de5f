"""macfw: train, ablate and extend MAC (Model-Based RL with Action Chunks) on OGBench."""

__version__ = "0.1.0"

# Headless machines: pick MuJoCo's EGL backend before anything imports mujoco (no GLFW warnings).
from macfw._mujoco_gl import default_mujoco_gl  # noqa: E402

default_mujoco_gl()

# Random bits on the CPU: JAX's written-out threefry lowering (identical bits, no loop; macfw/_threefry.py).
from macfw._threefry import apply_default as _threefry_default  # noqa: E402

_threefry_default()

# Importing the component modules registers them.
import macfw.agents  # noqa: F401,E402  (registers every agent: macfw/agents/__init__.py)
from macfw import loggers as _loggers  # noqa: F401,E402  (CSV, TensorBoard, Weights & Biases: train.loggers)
from macfw import registry  # noqa: E402
from macfw import samplers as _samplers  # noqa: F401,E402
from macfw.data import ogbench_data as _ogbench_data  # noqa: F401,E402
from macfw.nn import actors as _actors  # noqa: F401,E402
from macfw.nn import ensemble as _ensemble  # noqa: F401,E402
from macfw.nn import flow as _flow  # noqa: F401,E402
from macfw.nn import gaussian as _gaussian  # noqa: F401,E402  (MAC-Gau ablation)
from macfw.nn import models as _models  # noqa: F401,E402
from macfw.registry import register  # noqa: E402

__all__ = ["register", "registry", "__version__"]

# Gin configurables outside the component registry (must exist before a config is parsed).
from macfw import parallel as _parallel  # noqa: F401,E402
from macfw import train as _train  # noqa: F401,E402
