"""MuJoCo rendering backend for headless machines (chosen before mujoco is imported)."""

import os
import sys


def default_mujoco_gl() -> None:
    """Pick MUJOCO_GL=egl on headless Linux if nothing was chosen and mujoco is not imported yet.

    MuJoCo picks its OpenGL backend at import time; GLFW (the default) needs a display, while EGL
    works headless (GPU driver or Mesa's software EGL). A backend whose library is missing makes
    ``import mujoco`` itself fail, so EGL is only chosen when libEGL can be found.
    """
    if (
        sys.platform.startswith("linux")
        and "MUJOCO_GL" not in os.environ
        and not os.environ.get("DISPLAY")
        and "mujoco" not in sys.modules
    ):
        import ctypes.util

        if ctypes.util.find_library("EGL"):
            os.environ["MUJOCO_GL"] = "egl"
