"""What the Slicer module decides, without Qt: which actions are enabled, what each button does and in what
order (packages installed with consent, licences, downloads asked first, the size question before loading),
the stages a progress bar shows, cancel, and one task at a time. ``SimilarPatients.py`` only wires Qt
widgets to a :class:`ModuleController` and shows what it asks; pytest drives the same controller with a
recording view, on ``slicer-core``'s scene.

It sits above every stage and imports nothing of Slicer's at import time (``slicer`` and ``vtk`` only inside
the functions that need them, as ``scene`` does), and only the standard library until a function needs
more: the module imports it before pandas and the rest are installed.
"""

from .controller import Inputs, ModuleController, View
from .logic import ModuleLogic
from .settings import MemorySettings, ModuleSettings

__all__ = ["Inputs", "MemorySettings", "ModuleController", "ModuleLogic", "ModuleSettings", "View"]
