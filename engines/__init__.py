"""Signal-model engines: the Engine interface, its manifest, and the inference backends.

Nothing here imports the rest of tradingd. Heavy or GPU-only modules (tensorrt, cuda, pynvml,
torch) are imported only inside the backend or tool that needs them.
"""

from engines.base import Engine, EngineHealth, EngineSpec
from engines.errors import EngineError, ManifestError, ModelMismatchError
from engines.manifest import Manifest, load_manifest

__all__ = [
    "Engine",
    "EngineError",
    "EngineHealth",
    "EngineSpec",
    "Manifest",
    "ManifestError",
    "ModelMismatchError",
    "load_manifest",
]
